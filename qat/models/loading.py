"""Loading models from local directories (no hub access at run time): one loader for every kind of directory the
commands accept, chosen by what the directory holds, and every load checked.

    kind                 recognised by                                       loaded by
    fp                   config.json + weights, no quantization_config       transformers (+ its loading info)
    student              qat_student.json / student.safetensors              qat.checkpoint.load_student
    native               quantization_config.quant_method == "qat-distill"   qat.export.load.load_quantized
    compressed-tensors   quantization_config.quant_method == "compressed-tensors"   qat.export.load.load_compressed_tensors

Every load checks that the weights cover the architecture exactly (no missing, unexpected or mis-shaped tensor; a
truncated file is named) and, for students and exports, that the quant spec agrees with the tensors (see
qat/verify.py). A problem is one ValueError / FileNotFoundError line naming the file and the tensor.
"""
from __future__ import annotations

import json
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

KINDS = {
    "fp": "an FP model directory",
    "student": "a qat student checkpoint",
    "native": "a native qat export",
    "compressed-tensors": "a compressed-tensors export",
}
ALL_KINDS = tuple(KINDS)


def resolve_model_dir(path: str | os.PathLike, what: str = "model path") -> Path:
    p = Path(path)
    if not p.is_dir():
        hint = " (hub names cannot be downloaded here: pass a local Hugging Face model directory, e.g. one written" \
               " by `qat convert-gguf`)" if "/" in str(path) and not p.exists() else ""
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist or is not a directory{hint}")
    return p


def read_config(p: Path) -> dict[str, Any]:
    f = p / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"model directory {str(p)!r} has no config.json; not a Hugging Face model directory")
    try:
        cfg = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: corrupt JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f}: not a JSON object")  # noqa: TRY004 - a data problem, reported like the others
    return cfg


def detect_kind(path: str | os.PathLike, what: str = "model path") -> str:
    """Which kind of directory `path` is (see the table above), from what it holds; reads no weights."""
    from qat.checkpoint import STUDENT_META, STUDENT_WEIGHTS

    p = resolve_model_dir(path, what)
    if (p / STUDENT_META).exists() or (p / STUDENT_WEIGHTS).exists():
        return "student"
    qc = read_config(p).get("quantization_config")
    if qc is None:
        return "fp"
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "qat-distill":
        return "native"
    if method == "compressed-tensors":
        return "compressed-tensors"
    raise ValueError(f"{p / 'config.json'}: quantization method {method!r} is not one qat reads (FP models, qat "
                     "students, native qat exports and compressed-tensors exports)")


def check_kind(path, accept: tuple[str, ...], what: str) -> str:
    kind = detect_kind(path, what)
    if kind not in accept:
        wanted = " or ".join(KINDS[k] for k in accept)
        raise ValueError(f"{what} {str(path)!r} is {KINDS[kind]}; this needs {wanted}")
    return kind


def resolve_device(name: str | torch.device | None, what: str = "--device") -> torch.device:
    """'auto'/None -> cuda when available; an explicit cuda device that this machine lacks is one clear error."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what} {name!r}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            hint = f"{what} cpu" if what.startswith("--") else f"{what}='cpu'"
            raise ValueError(f"{what} {name}: CUDA is not available on this machine (use {hint})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"{what} {name!r}: only cpu and cuda are supported")
    return dev


# ---- weight files ---------------------------------------------------------------------------------------------------

def weight_files(p: Path) -> list[Path]:
    """The weight files of an HF directory (shards listed by an index included); missing ones are one clear error."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = p / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ValueError(f"{index}: corrupt weight index") from None
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{p}: weight shard {missing[0]} listed in {index_name} is missing")
            return [p / s for s in shards]
        if (p / single).is_file():
            return [p / single]
    raise FileNotFoundError(f"model directory {str(p)!r} has no weights (model.safetensors or pytorch_model.bin)")


def open_safetensors(f: Path):
    """A safe_open handle; a truncated or corrupt file (header, or data shorter than the header says) is one line."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{f}: truncated or corrupt safetensors file ({str(e).splitlines()[0]})") from None


def check_weight_file(f: Path) -> None:
    """Readable through to its end: safetensors header covering the whole file, or a .bin zip with intact CRCs."""
    if f.suffix == ".safetensors":
        open_safetensors(f)
        return
    problem = zip_problem(f)
    if problem:
        raise ValueError(f"{f}: {problem}")


def zip_problem(f: Path) -> str | None:
    """Why a torch.save zip file (a .bin or a Lightning .ckpt) cannot be read, or None. Reads the whole file: the
    central directory catches truncation, the CRC of every member catches corruption (torch.load checks neither)."""
    try:
        size = f.stat().st_size
    except OSError as e:
        return f"cannot read ({e.strerror})"
    if size == 0:
        return "empty file"
    try:
        with zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except zipfile.BadZipFile:
        return "truncated or not a torch checkpoint (no zip central directory)"
    except (OSError, EOFError, zipfile.LargeZipFile) as e:
        return f"truncated or corrupt ({type(e).__name__}: {e})"
    if bad is not None:
        return f"corrupt (checksum mismatch in {bad})"
    return None


def check_tensor_file(handle, wfile: Path, wanted: dict[str, torch.Tensor], *, optional: set[str] = frozenset(),
                      exact_dtype: set[str] = frozenset(), describe: str = "") -> None:
    """The file's tensors are exactly `wanted` (name -> tensor of the expected shape/dtype; `optional` ones may be
    absent): no missing, unexpected or mis-shaped tensor, and the tensors in `exact_dtype` have exactly that dtype."""
    file_keys = set(handle.keys())
    missing = sorted(set(wanted) - file_keys - set(optional))
    unexpected = sorted(file_keys - set(wanted))
    if missing:
        raise ValueError(f"{wfile}: missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1
                                                                      else ""))
    if unexpected:
        raise ValueError(f"{wfile}: unexpected tensor {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)"
                         if len(unexpected) > 1 else "") + " (config and weights disagree)")
    for name in sorted(file_keys):
        sl = handle.get_slice(name)
        shape, want = list(sl.get_shape()), wanted[name]
        if shape != list(want.shape):
            raise ValueError(f"{wfile}: tensor {name!r} has shape {fmt_shape(shape)}, expected "
                             f"{fmt_shape(want.shape)}" + (f" for {describe}" if describe else ""))
        if name in exact_dtype and ST_DTYPES.get(sl.get_dtype()) != want.dtype:
            raise ValueError(f"{wfile}: tensor {name!r} has dtype {sl.get_dtype()}, expected {want.dtype}")


ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
             "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "BOOL": torch.bool}


def fmt_shape(t) -> str:
    return "[" + ", ".join(str(int(s)) for s in t) + "]"


@contextmanager
def quiet_transformers():
    """transformers logs a multi-line load report before our one-line error; keep it out of the way."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def check_loading_info(p: Path, info: dict[str, Any]) -> None:
    """transformers' loading info must be empty: any missing, unexpected or mis-shaped tensor is an error."""
    if info.get("missing_keys"):
        k = sorted(info["missing_keys"])
        raise ValueError(f"{p}: the weights lack tensor {k[0]!r}" + (f" (+{len(k) - 1} more)" if len(k) > 1 else "")
                         + "; it would be randomly initialised")
    if info.get("unexpected_keys"):
        k = sorted(info["unexpected_keys"])
        raise ValueError(f"{p}: the weights hold tensor {k[0]!r} that the architecture in config.json does not have"
                         + (f" (+{len(k) - 1} more)" if len(k) > 1 else ""))
    if info.get("mismatched_keys"):
        name, got, want = sorted(info["mismatched_keys"], key=lambda t: t[0])[0]
        raise ValueError(f"{p}: tensor {name!r} has shape {fmt_shape(got)}, the architecture needs {fmt_shape(want)}")
    if info.get("error_msgs"):
        raise ValueError(f"{p}: cannot load the weights ({str(info['error_msgs'][0]).splitlines()[0]})")


# ---- loaders ----------------------------------------------------------------------------------------------------------

def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(path)), local_files_only=True)


def load_fp_model(path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A floating-point HF causal LM from a local directory, in eval mode, with every tensor read from its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models import get_adapter

    p = resolve_model_dir(path)
    cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    get_adapter(cfg.model_type)  # unsupported architectures fail before the weights are read
    for f in weight_files(p):
        check_weight_file(f)
    with quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    check_loading_info(p, info)
    return model.to(device).eval()


@dataclass
class Loaded:
    """What load_model returns: the model (eval mode), its tokenizer, the directory kind and what the kind records."""

    model: torch.nn.Module
    tokenizer: Any
    kind: str
    bits_per_weight: float = 16.0
    meta: dict[str, Any] = field(default_factory=dict)


def load_model(path, *, accept: tuple[str, ...] = ALL_KINDS, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", what: str = "--model", tokenizer: bool = True) -> Loaded:
    """The one loader: any directory kind in `accept`, chosen by what the directory holds, checked as it loads."""
    kind = check_kind(path, accept, what)
    device = resolve_device(device, what="device")
    meta: dict[str, Any] = {}
    if kind == "student":
        from qat.checkpoint import load_student
        from qat.nn import model_bits_per_weight

        model, meta = load_student(path, dtype=dtype, device=device)
        bpw = model_bits_per_weight(model)["bits_per_weight"]
    elif kind == "native":
        from qat.export.load import load_quantized, native_bits_per_weight

        model = load_quantized(path, device=device, dtype=dtype)
        if device.type == "cpu":  # no packed CPU kernels: dequantize each layer once (the same values)
            from qat.export.runtime import set_dense_cache

            set_dense_cache(model, True)
        bpw = native_bits_per_weight(path)
    elif kind == "compressed-tensors":
        from qat.export.load import load_compressed_tensors

        model, bpw = load_compressed_tensors(path, dtype=dtype, device=device)
    else:
        model, bpw = load_fp_model(path, dtype=dtype, device=device), 16.0
    tok = None
    if tokenizer:
        try:
            tok = load_tokenizer(path)
        except (OSError, ValueError):
            raise FileNotFoundError(f"{what} {str(path)!r} has no tokenizer files") from None
    return Loaded(model, tok, kind, bpw, meta)


def load_any(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, tokenizer) for any directory kind (FP model, student, native or compressed-tensors export)."""
    loaded = load_model(path, dtype=dtype, device=device)
    return loaded.model, loaded.tokenizer


def meta_model(path):
    """The architecture of a local model directory, built on the meta device (no weights read, no memory used)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models import get_adapter

    p = resolve_model_dir(path)
    read_config(p)
    cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    get_adapter(cfg.model_type)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)
