"""One entry point for every packed format: y = x W_hat^T (+ bias), Triton on GPU, plain torch elsewhere.

    linear(x, fmt, packed, meta, bias=None, backend="auto")

fmt     a key of FORMATS: "uniform" | "binary11" | "vq"  (packed layouts: kernels/reference.py); the name the
        quantizer class of qat/quantizers registered and the export stores (tests/test_kernels.py checks the two agree)
packed  the tensors of one exported layer, exactly as stored (no repacking)
meta    plain ints/bools/floats describing the layer:
          in_features, out_features, group_size (-1 = whole row), bits (uniform: 1..8; binary11: 1 if given)
          act_bits (16 = no activation quantization, default), act_sym (default False),
          act_clip_hi, act_clip_lo (per-token clipping factors, default 1.0)
          vq: no group_size/bits needed; block_in, block_out (Hadamard block sizes; when absent they are read from
              packed["hadamard_blocks"], a device->host copy per call on GPU), the vector length d is A's size
backend "auto"      Triton when x is a CUDA tensor and the kernels support the layer, reference otherwise
        "reference" dequantize in float32 with kernels/reference.py, then F.linear (the ground truth)
        "triton"    the Triton kernels (on CPU only under TRITON_INTERPRET=1); an unsupported layer is a ValueError

x may have any number of leading dims (flattened into the batch); the output has x's dtype. With activation
quantization the reference quantizes x per token with kernels/act_quant.py and multiplies in float32.
Triton is imported only when a kernel runs, so the reference path works with torch alone.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from qat_kernels import reference
from qat_kernels.packing import packed_width

BACKENDS = ("auto", "reference", "triton")


# ---- validation -------------------------------------------------------------------------------------------------
def _int_meta(meta: dict, key: str, fmt: str) -> int:
    if key not in meta:
        raise ValueError(f"linear({fmt}): meta is missing {key!r}")
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"linear({fmt}): meta[{key!r}] must be an int, got {value!r}")  # noqa: TRY004 (bad data)
    return value


def _check_tensor(packed: dict, name: str, shape: tuple, dtypes: tuple, fmt: str) -> torch.Tensor:
    if name not in packed:
        raise ValueError(f"linear({fmt}): packed is missing {name!r} (has {sorted(packed)})")
    t = packed[name]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"linear({fmt}): packed[{name!r}] has shape {tuple(t.shape)}, meta implies {tuple(shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"linear({fmt}): packed[{name!r}] has dtype {t.dtype}, expected one of {dtypes}")
    return t


_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def layer_spec(fmt: str, packed: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Validate (fmt, packed, meta) and return the normalized layer description used by both backends.

    Raises a one-line ValueError naming the bad value (unknown fmt, missing key, shape/dtype that does not match)."""
    if fmt not in FORMATS:
        raise ValueError(f"linear: unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    n_in, n_out = _int_meta(meta, "in_features", fmt), _int_meta(meta, "out_features", fmt)
    g = _int_meta(meta, "group_size", fmt) if FORMATS[fmt].grouped or "group_size" in meta else -1
    g = n_in if g == -1 else g
    if n_in <= 0 or n_out <= 0 or g <= 0 or n_in % g:
        raise ValueError(f"linear({fmt}): group_size {g} must divide in_features {n_in} (both positive)")
    spec: dict[str, Any] = {"fmt": fmt, "in_features": n_in, "out_features": n_out, "group_size": g}
    FORMATS[fmt].check(spec, packed, meta)
    act_bits = meta.get("act_bits", 16)
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or not (2 <= act_bits <= 8 or act_bits == 16):
        raise ValueError(f"linear({fmt}): act_bits must be an int in 2..8 or 16 (off), got {act_bits!r}")
    spec["act_bits"] = act_bits
    spec["act_sym"] = bool(meta.get("act_sym", False))
    spec["act_clip_hi"] = float(meta.get("act_clip_hi", 1.0))
    spec["act_clip_lo"] = float(meta.get("act_clip_lo", 1.0))
    return spec


def _uniform_spec(spec: dict, packed: dict, meta: dict) -> None:
    n_in, n_out, ng = spec["in_features"], spec["out_features"], spec["in_features"] // spec["group_size"]
    bits = _int_meta(meta, "bits", "uniform")
    if not 1 <= bits <= 8:
        raise ValueError(f"linear(uniform): bits must be in 1..8, got {bits}")
    spec["bits"] = bits
    _check_tensor(packed, "qweight", (n_out, packed_width(n_in, bits)), (torch.uint8,), "uniform")
    _check_tensor(packed, "scales", (n_out, ng), _FLOATS, "uniform")
    _check_tensor(packed, "zeros", (n_out, ng), (torch.uint8,), "uniform")


def _binary11_spec(spec: dict, packed: dict, meta: dict) -> None:
    n_in, n_out, ng = spec["in_features"], spec["out_features"], spec["in_features"] // spec["group_size"]
    if meta.get("bits", 1) != 1:
        raise ValueError(f"linear(binary11): bits must be 1 (sign + bitmap bit), got {meta['bits']!r}")
    spec["bits"] = 1
    for name in ("signs", "bitmap"):
        _check_tensor(packed, name, (n_out, packed_width(n_in, 1)), (torch.uint8,), spec["fmt"])
    for name in ("alpha", "mu"):
        _check_tensor(packed, name, (n_out, ng, 2), _FLOATS, spec["fmt"])


def _vq_block(packed: dict, meta: dict, key: str, index: int, width: int) -> int:
    """Hadamard block size from meta[key], else from packed['hadamard_blocks'] (a read-back: put it in meta on GPU)."""
    if key in meta:
        block = _int_meta(meta, key, "vq")
    elif "hadamard_blocks" in packed and packed["hadamard_blocks"].numel() == 2:
        block = int(packed["hadamard_blocks"][index])
    else:
        raise ValueError(f"linear(vq): meta is missing {key!r} (and packed has no 'hadamard_blocks' [2])")
    if block < 1 or block & (block - 1) or width % block:
        raise ValueError(f"linear(vq): Hadamard {key} {block} must be a power of two dividing {width}")
    return block


def _vq_spec(spec: dict, packed: dict, meta: dict) -> None:
    n_in, n_out = spec["in_features"], spec["out_features"]
    if "A" not in packed or packed["A"].dim() != 2 or packed["A"].shape[0] != packed["A"].shape[1]:
        raise ValueError(f"linear(vq): packed['A'] must be a square [d, d] matrix, got "
                         f"{tuple(packed['A'].shape) if 'A' in packed else 'nothing'}")
    d = packed["A"].shape[0]
    if n_in % d:
        raise ValueError(f"linear(vq): vector length {d} (A is {d}x{d}) does not divide in_features {n_in}")
    _check_tensor(packed, "codes", (n_out, packed_width(n_in, 2)), (torch.uint8,), spec["fmt"])
    _check_tensor(packed, "A", (d, d), _FLOATS, spec["fmt"])
    _check_tensor(packed, "b", (d,), _FLOATS, spec["fmt"])
    _check_tensor(packed, "s_u", (n_in,), _FLOATS, spec["fmt"])
    _check_tensor(packed, "s_v", (n_out,), _FLOATS, spec["fmt"])
    _check_tensor(packed, "signs_in", (n_in,), (torch.int8,), spec["fmt"])
    _check_tensor(packed, "signs_out", (n_out,), (torch.int8,), spec["fmt"])
    spec["bits"] = 2
    spec["vq_dim"] = d
    spec["block_in"] = _vq_block(packed, meta, "block_in", 0, n_in)
    spec["block_out"] = _vq_block(packed, meta, "block_out", 1, n_out)


# ---- reference path ---------------------------------------------------------------------------------------------
def dequantize(fmt: str, packed: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    """W_hat [out, in] in float32 with kernels/reference.py (validates first)."""
    spec = layer_spec(fmt, packed, meta)
    return _dequantize(spec, packed)


def _dequantize(spec: dict, packed: dict) -> torch.Tensor:
    return FORMATS[spec["fmt"]].dequantize(spec, packed)


class _Format(NamedTuple):
    """What the dispatcher knows of one packed format: whether meta carries group_size, the layout check (fills the
    normalized layer description), and the reference dequantization. The Triton kernels are kernels/triton/<name>.py."""

    grouped: bool
    check: Callable[[dict, dict, dict], None]
    dequantize: Callable[[dict, dict], torch.Tensor]


FORMATS: dict[str, _Format] = {
    "uniform": _Format(True, _uniform_spec, lambda s, p: reference.dequant_uniform(
        p["qweight"], p["scales"], p["zeros"], bits=s["bits"], group_size=s["group_size"],
        in_features=s["in_features"])),
    "binary11": _Format(True, _binary11_spec, lambda s, p: reference.dequant_binary11(
        p["signs"], p["bitmap"], p["alpha"], p["mu"], group_size=s["group_size"], in_features=s["in_features"])),
    "vq": _Format(False, _vq_spec, lambda s, p: reference.dequant_vq(
        p["codes"], p["A"], p["b"], p["s_u"], p["s_v"], p["signs_in"], p["signs_out"], block_in=s["block_in"],
        block_out=s["block_out"], in_features=s["in_features"])),
}


def quantize_activations(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """x_hat (float32) = per-token fake-quantized x, with the reference quantizer of kernels/act_quant.py."""
    try:
        from qat_kernels.act_quant import quantize_per_token
    except ImportError as e:  # written by another part of the project; say so plainly if it is missing
        raise ValueError(f"linear: act_bits={spec['act_bits']} needs qat_kernels.act_quant ({e})") from e
    q, scale, zero = quantize_per_token(x.float(), spec["act_bits"], spec["act_clip_hi"], spec["act_clip_lo"],
                                        spec["act_sym"])
    return (q.float() - zero.float()) * scale.float()


def _reference_linear(x2: torch.Tensor, spec: dict, packed: dict, bias: torch.Tensor | None) -> torch.Tensor:
    w = _dequantize(spec, packed)
    if spec["act_bits"] < 16:
        y = torch.nn.functional.linear(quantize_activations(x2, spec), w, None if bias is None else bias.float())
        return y.to(x2.dtype)
    return reference.linear_dense(x2, w, bias)


# ---- dispatch ---------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel_module(spec: dict):
    """The kernels/triton module that runs this layer's weight format."""
    return importlib.import_module(f"qat_kernels.triton.{spec['fmt']}")


def triton_support(spec: dict, x: torch.Tensor) -> str | None:
    """None when the Triton kernels can run this layer on x, else the reason they cannot (one line)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (x.is_cuda or _interpreting()):
        return "x is not a CUDA tensor (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"x dtype {x.dtype} is not float16/bfloat16/float32"
    return _kernel_module(spec).unsupported_reason(spec)


def _triton_linear(x2: torch.Tensor, spec: dict, packed: dict, bias: torch.Tensor | None) -> torch.Tensor:
    module = _kernel_module(spec)
    if spec["act_bits"] < 16:
        from qat_kernels.triton import w4a4

        if w4a4.unsupported_reason(spec) is None:  # integer GEMM with in-kernel per-token quantization
            return w4a4.linear(x2, spec, packed, bias)
        # No integer path for this combination: fake-quantize x per token (reference, float32), weight kernel after.
        return module.linear(quantize_activations(x2, spec), spec, packed, bias).to(x2.dtype)
    return module.linear(x2, spec, packed, bias)


def linear(x: torch.Tensor, fmt: str, packed: dict[str, torch.Tensor], meta: dict[str, Any],
           bias: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """y = x W_hat^T (+ bias) for a packed layer; see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"linear: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    spec = layer_spec(fmt, packed, meta)
    if x.shape[-1] != spec["in_features"]:
        raise ValueError(f"linear({fmt}): x has {x.shape[-1]} features, the layer takes {spec['in_features']}")
    if bias is not None and tuple(bias.shape) != (spec["out_features"],):
        raise ValueError(f"linear({fmt}): bias has shape {tuple(bias.shape)}, expected ({spec['out_features']},)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, spec["in_features"])
    if backend == "reference" or (backend == "auto" and not x2.is_cuda):
        use_triton = False
    else:
        reason = triton_support(spec, x2)
        if backend == "triton" and reason is not None:
            raise ValueError(f"linear({fmt}): backend='triton' cannot run this layer: {reason}")
        use_triton = reason is None
    if use_triton:
        y = _triton_linear(x2, spec, packed, bias)
    else:
        y = _reference_linear(x2, spec, packed, bias)
    return y.reshape(*lead, spec["out_features"])
