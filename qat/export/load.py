"""load_quantized: rebuild a runnable model from a native export (see pack.py for the directory layout).

The architecture is built on the meta device (no memory, no random init), each quantized linear is swapped for a
PackedLinear whose buffers have the shapes the format's pack() produces for that layer, then every tensor is
materialized and filled from model.safetensors with strict checks: a missing, unexpected or mis-shaped tensor is one
ValueError line naming it, so a tampered or truncated file never yields a silently wrong model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.config import QuantSpec
from qat.export.pack import EXPORT_VERSION, QUANT_METHOD, WEIGHTS_FILE, act_runtime_params, parse_dtype
from qat.export.runtime import PackedLinear


def read_export_config(path) -> tuple[Path, dict[str, Any]]:
    """(directory, quantization_config) of a native export, or one clear error."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"export directory {str(path)!r} does not exist or is not a directory")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{p}: missing config.json; not a qat export directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: corrupt JSON ({e})") from None
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(  # noqa: TRY004 - a data problem in the directory, reported like the others
            f"{cfg_file}: no quantization_config; not a quantized export (load FP models with "
            f"qat.models.loading.load_fp_model)")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        hint = " (load compressed-tensors exports with transformers' from_pretrained)" \
            if method == "compressed-tensors" else ""
        raise ValueError(f"{cfg_file}: quant_method {method!r} is not {QUANT_METHOD!r}{hint}")
    if int(qc.get("version", 0)) > EXPORT_VERSION:
        raise ValueError(f"{cfg_file}: export version {qc.get('version')} is newer than this code reads "
                         f"({EXPORT_VERSION})")
    for key in ("spec", "modules"):
        if key not in qc:
            raise ValueError(f"{cfg_file}: quantization_config has no {key!r}")
    if not (p / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{p}: missing {WEIGHTS_FILE}")
    return p, qc


def is_native_export(path) -> bool:
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return qc.get("quant_method") == QUANT_METHOD


def _linear_shape(mod: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored [in, out])."""
    if type(mod).__name__ == "Conv1D":
        return mod.weight.shape[1], mod.weight.shape[0]
    if isinstance(mod, nn.Linear):
        return mod.out_features, mod.in_features
    raise ValueError(f"quantized module is a {type(mod).__name__}, not a linear layer")


_SHAPE_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def expected_runtime_tensors(spec: QuantSpec, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
    """Meta tensors shaped like what the export holds for one [out, in] layer (packed weight + act params),
    taken from the format's own pack() of a random weight, so every format is checked the same way."""
    from qat.quantizers import make_act_quantizer, make_weight_quantizer

    key = (json.dumps(spec.to_dict(), sort_keys=True), out_f, in_f)
    if key not in _SHAPE_CACHE:
        with torch.device("cpu"), torch.no_grad():  # real tensors even when called under a meta-device context
            wq = make_weight_quantizer(spec.weight, out_f, in_f)
            w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
            try:
                packed = wq.pack(w)
            except Exception:  # noqa: BLE001 - a format that can only pack after its PTQ init
                wq.init_from(w)
                packed = wq.pack(w)
            shapes = {k: v.to("meta") for k, v in packed.items()}
            act = make_act_quantizer(spec.act, in_f)
            if act is not None:
                shapes.update({f"act_quantizer.{k}": v.to("meta") for k, v in act_runtime_params(act).items()})
        _SHAPE_CACHE[key] = shapes
    return _SHAPE_CACHE[key]


def _fmt_shape(t) -> str:
    return "[" + ", ".join(str(int(s)) for s in t) + "]"


def load_quantized(path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> nn.Module:
    """A runnable model (eval mode) from a native qat export; dtype defaults to the export's own dtype."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models import get_adapter

    p, qc = read_export_config(path)
    spec = QuantSpec.from_dict(qc["spec"])
    dtype = parse_dtype(dtype if dtype is not None else qc.get("dtype", "float16"))
    wfile = p / WEIGHTS_FILE
    try:
        handle = safe_open(str(wfile), framework="pt", device="cpu")
        file_keys = set(handle.keys())
    except (SafetensorError, OSError) as e:  # truncated / not a safetensors file
        raise ValueError(f"{wfile}: truncated or corrupt safetensors file ({str(e).splitlines()[0]})") from None

    cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    if hasattr(cfg, "quantization_config"):  # ours, not a transformers quantizer's: keep transformers out of it
        del cfg.quantization_config
    get_adapter(cfg.model_type)  # an unsupported architecture fails with the list of supported ones
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        packed_names: set[str] = set()
        for name in qc["modules"]:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{p / 'config.json'}: quantized module {name!r} does not exist in "
                                 f"{cfg.model_type}") from None
            out_f, in_f = _linear_shape(mod)
            exp = expected_runtime_tensors(spec, out_f, in_f)
            packed = {k: torch.empty_like(v) for k, v in exp.items() if not k.startswith("act_quantizer.")}
            act = {k.split(".", 1)[1]: torch.empty_like(v) for k, v in exp.items() if k.startswith("act_quantizer.")}
            bias = torch.empty(out_f, dtype=dtype) if getattr(mod, "bias", None) is not None else None
            signs = torch.empty(in_f, dtype=torch.int8) if spec.act.enabled and spec.act.hadamard else None
            runtime = PackedLinear(spec, out_f, in_f, packed, bias, act or None, signs)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, runtime)
            packed_names.update(f"{name}.{k}" for k in packed)

    # what the file must hold, with the dtype/shape each needs (packed tensors: exact dtype)
    wanted: dict[str, torch.Tensor] = dict(model.named_parameters())
    wanted.update(model.named_buffers())
    missing = sorted(set(wanted) - file_keys)
    unexpected = sorted(file_keys - set(wanted))
    if missing:
        raise ValueError(f"{wfile}: missing tensor {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ValueError(f"{wfile}: unexpected tensor {unexpected[0]!r} (config.json and the weights disagree)")
    for name in sorted(wanted):
        sl = handle.get_slice(name)
        shape, want = sl.get_shape(), wanted[name]
        if list(shape) != list(want.shape):
            raise ValueError(f"{wfile}: tensor {name!r} has shape {_fmt_shape(shape)}, expected "
                             f"{_fmt_shape(want.shape)} for {spec.describe()}")
        if name in packed_names and _st_dtype(sl.get_dtype()) != want.dtype:
            raise ValueError(f"{wfile}: tensor {name!r} has dtype {sl.get_dtype()}, expected {want.dtype}")

    model.to_empty(device=device)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty gives each module its own copy; re-share the embedding with lm_head
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(model.named_buffers())
    with torch.no_grad():
        for name, t in targets.items():
            try:
                src = handle.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{wfile}: cannot read tensor {name!r} ({str(e).splitlines()[0]})") from None
            t.copy_(src)
    return model.eval()


_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "BOOL": torch.bool}


def _st_dtype(name: str) -> torch.dtype | None:
    return _ST_DTYPES.get(name)
