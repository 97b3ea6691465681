"""PackedLinear: the inference module that replaces a QuantLinear in a loaded export.

It holds only the packed weight tensors (buffers named exactly as in model.safetensors), the bias, the activation
quantizer's runtime parameters and the input-rotation signs, and computes what QuantLinear computes in eval mode:

    x -> block-Hadamard rotation (if any) -> activation fake-quant (if any) -> qat_kernels linear on the packed weight

On the kernels' path (CUDA inputs) a uniform per-token activation quantizer is not applied here but handed to the
dispatcher, whose integer W4A4/W8A8 kernel quantizes x itself with the same math (kernels/act_quant.py).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from qat_kernels.hadamard import block_hadamard, hadamard_block_size
from torch import nn

from qat.config import ActSpec, QuantSpec

KernelLinear = Callable[[torch.Tensor, str, dict, dict, "torch.Tensor | None"], torch.Tensor]


def kernel_meta(spec: QuantSpec, out_features: int, in_features: int) -> dict[str, Any]:
    """The static description of one packed layer that qat_kernels.dispatch.linear needs next to its tensors.
    act_bits is left at 16 here: PackedLinear either applies its activation quantizer itself (reference path, knee
    mode) or adds the act_* entries per call (PackedLinear.fused_act) for the integer kernels."""
    return spec.weight.quantizer_class().kernel_meta(spec.weight, out_features, in_features)


def dispatch_linear() -> KernelLinear | None:
    """qat_kernels.dispatch.linear when that module is importable (Triton on GPU, reference on CPU)."""
    try:
        from qat_kernels.dispatch import linear
    except ImportError:
        return None
    return linear


def dispatch_supports(fmt: str, packed: dict[str, torch.Tensor], meta: dict[str, Any]) -> bool:
    """Whether the dispatcher knows this format/layout (checked on shapes only, so meta tensors work)."""
    try:
        from qat_kernels.dispatch import layer_spec
    except ImportError:
        return False
    try:
        layer_spec(fmt, packed, meta)
    except ValueError:
        return False
    return True


_UNPACKERS: dict[tuple, nn.Module] = {}


def unpack_linear(x: torch.Tensor, spec: QuantSpec, out_features: int, in_features: int,
                  packed: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """Fallback for a format the dispatcher does not handle yet: dequantize with the format's own unpack()
    (bit-exact with the training forward), then the reference dense matmul."""
    from qat_kernels.reference import linear_dense

    from qat.quantizers import make_weight_quantizer

    key = (json.dumps(spec.weight.__dict__, sort_keys=True), out_features, in_features)
    q = _UNPACKERS.get(key)
    if q is None:
        with torch.device("meta"):  # unpack() uses only the static shape information
            q = make_weight_quantizer(spec.weight, out_features, in_features)
        _UNPACKERS[key] = q
    return linear_dense(x, q.unpack(packed), bias)


class PackedLinear(nn.Module):
    """Inference-only linear over a packed weight; built from tensors (real or meta) keyed as in the export."""

    def __init__(self, spec: QuantSpec, out_features: int, in_features: int, packed: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, act_params: dict[str, torch.Tensor] | None = None,
                 rotation_signs: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.out_features, self.in_features = spec, out_features, in_features
        self.format = spec.weight.format
        self.meta = kernel_meta(spec, out_features, in_features)
        self.packed_names = sorted(packed)
        for k, v in packed.items():
            self.register_buffer(k, v)
        self.use_dispatch: bool | None = None  # decided on the first forward, once the tensors hold data
        # "auto": Triton kernels for CUDA inputs, reference math elsewhere; "triton" forces the kernels (on CPU under
        # TRITON_INTERPRET=1: how the fused W4A4 path is tested without a GPU)
        self.backend = "auto"
        self.fused_act: dict[str, Any] | None = None  # activation meta for the integer W4A4 kernel, set by prepare()
        # CPU generation: dequantize once and keep the dense weight (same values; the packed kernels are GPU-only)
        self.cache_dense = False
        self._dense: torch.Tensor | None = None
        self.register_buffer("bias", bias)
        self.act_quantizer = PackedActQuantizer(spec.act, act_params or {}) if spec.act.enabled else None
        if spec.act.enabled and spec.act.hadamard:
            self.rotation_block = hadamard_block_size(in_features, 128)  # as QuantLinear chooses it
            if rotation_signs is None:
                raise ValueError("PackedLinear: input rotation needs rotation_signs")
            self.register_buffer("rotation_signs", rotation_signs)
        else:
            self.rotation_block = 0

    def packed(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.packed_names}

    def prepare(self) -> None:
        """Complete the kernel meta from the loaded tensors and pick the path: the dispatcher (Triton on GPU) when it
        knows this layout, else the format's own unpack()."""
        packed = self.packed()
        self.meta.update(self.spec.weight.quantizer_class().meta_from_packed(packed))
        self.use_dispatch = dispatch_supports(self.format, packed, self.meta)
        self.fused_act = None
        act = self.spec.act
        if self.use_dispatch and self.act_quantizer is not None and act.mode == "uniform":
            # the kernel quantizes x per token itself (integer GEMM), with the learned clip factors as plain floats:
            # read once here, not per call (a device->host copy each); call prepare() again after replacing buffers
            self.fused_act = {"act_bits": act.bits, "act_sym": act.sym,
                              "act_clip_hi": float(self.act_quantizer.clip_hi),
                              "act_clip_lo": float(self.act_quantizer.clip_lo)}

    def dequantize(self) -> torch.Tensor:
        """The effective weight [out, in] in float32 (what QuantLinear's quantized_weight() gave the student)."""
        if self.use_dispatch is None:
            self.prepare()
        if self.use_dispatch:
            from qat_kernels.dispatch import dequantize

            return dequantize(self.format, self.packed(), self.meta)
        from qat.quantizers import make_weight_quantizer

        with torch.device("meta"):
            q = make_weight_quantizer(self.spec.weight, self.out_features, self.in_features)
        return q.unpack(self.packed()).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_dispatch is None:
            self.prepare()
        if self.rotation_block:
            x = block_hadamard(x, self.rotation_signs, self.rotation_block)
        kernels = self.use_dispatch and not self.cache_dense and (x.is_cuda or self.backend == "triton")
        if kernels and self.fused_act is not None:  # W4A4/W8A8: per-token quantization inside the integer kernel
            return dispatch_linear()(x, self.format, self.packed(), {**self.meta, **self.fused_act}, self.bias,
                                     backend="triton" if self.backend == "triton" else "auto")
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        if self.cache_dense:
            from qat_kernels.reference import linear_dense

            if self._dense is None or self._dense.dtype != x.dtype or self._dense.device != x.device:
                self._dense = self.dequantize().to(device=x.device, dtype=x.dtype)
            return linear_dense(x, self._dense, self.bias)
        if self.use_dispatch:
            # on CPU ask for the reference path directly ("auto" would probe the Triton interpreter first)
            backend = "triton" if self.backend == "triton" else "auto" if x.is_cuda else "reference"
            return dispatch_linear()(x, self.format, self.packed(), self.meta, self.bias, backend=backend)
        return unpack_linear(x, self.spec, self.out_features, self.in_features, self.packed(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.spec.describe()}"


def set_kernel_backend(model: nn.Module, backend: str) -> int:
    """'auto' (Triton for CUDA inputs) or 'triton' (always; on CPU only under TRITON_INTERPRET=1) for every
    PackedLinear; returns how many."""
    if backend not in ("auto", "triton"):
        raise ValueError(f"kernel backend must be 'auto' or 'triton', got {backend!r}")
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in layers:
        m.backend = backend
    return len(layers)


def set_dense_cache(model: nn.Module, enabled: bool) -> int:
    """Turn dequantize-once on/off for every PackedLinear (off frees the dense copies); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for m in layers:
        m.cache_dense, m._dense = enabled, None
    return len(layers)


def act_static_params(act: ActSpec) -> dict[str, Any]:
    """The non-learned entries of ActQuantizer.export_params() for this spec (knee levels at their default split)."""
    from qat_kernels.act_quant import knee_levels

    out: dict[str, Any] = {"mode": act.mode, "bits": act.bits, "sym": act.sym}
    if act.mode == "knee":
        out["levels_in"], out["levels_out"] = knee_levels(act.bits)
    return out


class PackedActQuantizer(nn.Module):
    """Inference form of ActQuantizer: its learned factors as float32 0-d buffers, applied with
    qat_kernels.act_quant exactly as ActQuantizer's eval forward does."""

    def __init__(self, act: ActSpec, params: dict[str, torch.Tensor]):
        super().__init__()
        self.static = act_static_params(act)
        need = ["clip_hi", "clip_lo"] + (["knee_hi", "knee_lo"] if act.mode == "knee" else [])
        missing = [k for k in need if k not in params]
        if missing:
            raise ValueError(f"activation quantizer parameters missing {missing}")
        for k in need:
            self.register_buffer(k, params[k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from qat_kernels.act_quant import fake_quant_knee_per_token, fake_quant_per_token

        st = self.static
        if st["mode"] == "uniform":
            return fake_quant_per_token(x, st["bits"], self.clip_hi, self.clip_lo, st["sym"])
        return fake_quant_knee_per_token(x, st["bits"], self.clip_hi, self.clip_lo, self.knee_hi, self.knee_lo,
                                         st["sym"], levels_out=st["levels_out"])

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.static.items())
