"""The weight-quantizer contract every number format implements (see docs/DESIGN.md, "Number format").

A quantizer is an nn.Module that owns the learnable quantization parameters of one linear layer (never the latent
weight itself: QuantLinear owns that, so checkpoints keep the original parameter names).

    init_from(weight, hessian=None, **opts) -> latent
                                     PTQ initialisation from the FP weight (+ optional H = 2 X^T X from calibration,
                                     which selects the Hessian-aware initializer: GPTQ / EM+GPTQ / LDLQ). Returns the
                                     latent weight QuantLinear should hold from now on: the input itself for RTN-like
                                     inits, the error-compensated weight for GPTQ-like ones, chosen so that
                                     forward(latent) reproduces the PTQ result exactly.
    forward(weight) -> weight_hat    differentiable fake-quantised *effective* weight, shape [out, in]
    pack(weight) -> dict[str, Tensor] the storage form (integer codes packed with qat_kernels.packing + metadata)
    unpack(packed) -> weight_hat     dequantize the storage form; unpack(pack(w)) == forward(w) bit for bit in eval
    bits_per_weight                  storage bits per weight, metadata included (scales, zeros, bitmaps, codebooks)

The class is also the single description of its format (docs/DESIGN.md, "Adding a format"): `format` (the name stored
in specs and checkpoints), `default_bits`, `options` (its fields of WeightSpec, with defaults and docs: the WeightSpec
dataclass, the recipe keys and the `qat ptq` flags are built from them), validate_spec(), describe(), kernel_meta()
(what qat_kernels.dispatch needs beside the packed tensors) and check_packed() (value ranges of a stored layer).
A format registers itself with @register_weight_format; every module of qat/quantizers is imported on first use.
"""
from __future__ import annotations

import functools
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from qat.config import QuantConfigError
from qat.speed import LEVERS

if TYPE_CHECKING:
    from qat.config import WeightSpec


@dataclass(frozen=True)
class SpecOption:
    """One format-specific field of WeightSpec (a recipe key quant.weight.<name>, a `qat ptq` flag).

    exclusive: a non-default value is an error under any other format (instead of being ignored)."""

    name: str
    type: Any
    default: Any
    doc: str
    exclusive: bool = False


# format name -> quantizer class, filled by @register_weight_format (qat.quantizers.registry imports every module)
WEIGHT_FORMATS: dict[str, type[WeightQuantizer]] = {}


def register_weight_format(cls: type[WeightQuantizer]) -> type[WeightQuantizer]:
    """Class decorator: make `cls.format` a weight format. Options of a format registered after WeightSpec was built
    (a format defined outside qat/quantizers, e.g. in a test) must be fields WeightSpec already has."""
    if not cls.format or cls.format in WEIGHT_FORMATS:
        raise QuantConfigError(f"weight format name {cls.format!r} is empty or already registered")
    config = sys.modules.get("qat.config")
    built = getattr(config, "WeightSpec", None) if config else None
    if built is not None:
        missing = sorted({o.name for o in cls.options} - set(built.__dataclass_fields__))
        if missing:
            raise QuantConfigError(f"format {cls.format!r}: options {missing} are not WeightSpec fields; a format "
                                   "with new options lives in a module of qat/quantizers")
    WEIGHT_FORMATS[cls.format] = cls
    return cls


class WeightQuantizer(nn.Module, ABC):
    format: str = ""  # the name stored in specs, checkpoints and exports
    default_bits: int = 4  # WeightSpec.bits when not given
    options: tuple[SpecOption, ...] = ()  # this format's own WeightSpec fields
    uses_groups: bool = True  # group_size applies (False: the kernels get group_size -1)

    def __init__(self, spec: WeightSpec, out_features: int, in_features: int):
        super().__init__()
        self.check_shape(spec, out_features, in_features)
        self.spec = spec
        self.out_features = out_features
        self.in_features = in_features

    @classmethod
    def check_shape(cls, spec: WeightSpec, out_features: int, in_features: int) -> None:
        """Raise QuantConfigError if this format cannot quantize a [out, in] weight with this spec."""
        spec.group_for(in_features)

    # ---- the format's description (class level: no layer needed) -------------------------------------------------
    @classmethod
    def validate_spec(cls, spec: WeightSpec) -> None:
        """Raise QuantConfigError (one line naming the field) for a spec this format cannot realise."""

    @classmethod
    def describe(cls, spec: WeightSpec) -> str:
        """Short display name, e.g. W2g64 (QuantSpec.describe() appends the activation part)."""
        return f"{cls.format}{spec.bits}"

    @classmethod
    def group_label(cls, spec: WeightSpec) -> str:
        return "ch" if spec.group_size == -1 else f"g{spec.group_size}"

    @classmethod
    def kernel_meta(cls, spec: WeightSpec, out_features: int, in_features: int) -> dict[str, Any]:
        """The plain-int description qat_kernels.dispatch.linear needs next to the packed tensors of one layer."""
        group = spec.group_for(in_features) if cls.uses_groups else -1
        return {"in_features": in_features, "out_features": out_features, "group_size": group}

    @classmethod
    def meta_from_packed(cls, packed: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Kernel meta that is data in the packed tensors (read once when an export is loaded)."""
        return {}

    @classmethod
    def check_packed(cls, spec: WeightSpec, packed: dict[str, torch.Tensor],
                     expected: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
        """Value-range problems of a stored layer as (tensor name, what is wrong); `expected` is what this spec's own
        pack() gives for a layer of that shape. Finiteness is checked by the caller."""
        return []

    def check_state(self) -> list[tuple[str, str]]:
        """Value-range problems of a loaded student's quantizer parameters, as (parameter name, what is wrong)."""
        return []

    @abstractmethod
    def init_from(self, weight: torch.Tensor, *, hessian: torch.Tensor | None = None, **opts) -> torch.Tensor: ...

    @abstractmethod
    def forward(self, weight: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def unpack(self, packed: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @property
    @abstractmethod
    def bits_per_weight(self) -> float:
        """Stored bits per weight including every piece of metadata."""

    def cache_state(self) -> tuple:
        """Non-tensor state the forward depends on (modes, overrides); QuantLinear's eval-mode weight cache keys on it
        together with the parameters' and buffers' version counters."""
        return ()

    def extra_repr(self) -> str:
        return f"{self.format}, bits={self.spec.bits}, bpw={self.bits_per_weight:.3f}"


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def fake_quant_reference(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """(clamp(ste_round(x / s) + z, lo, hi) - z) * s through autograd: the reference fake_quant() must match."""
    return (torch.clamp(ste_round(x / s) + z, lo, hi) - z) * s


class _FakeQuant(torch.autograd.Function):
    """fake_quant_reference() with the gradients autograd gives it, in a few in-place passes over x.

    Value: the reference's own ops in its order (ste_round(v) == round(v) bit for bit), so the result is identical.
    Gradients, with inside = (lo <= round(x / s) + z <= hi), summed over what s and z broadcast over:
        d/dx = inside                                   (straight-through round, clamp mask)
        d/ds = (out - inside * x) / s                   (= (q - z) - inside * x / s: LSQ)
        d/dz = -s * (1 - inside)
    Saved for backward: the inside mask as float32 (torch's bool kernels are scalar loops on CPU, 10-20x slower than
    a float multiply) and the output; x is the caller's (usually the latent weight itself).
    """

    @staticmethod
    def forward(ctx, x, s, z, lo: int, hi: int):
        t = torch.div(x, s).round_().add_(z)
        q = torch.clamp(t, lo, hi)
        inside = torch.eq(q, t, out=t)  # float 1/0, reusing t's memory
        out = q.sub_(z).mul_(s)
        ctx.save_for_backward(x, s, z, inside, out)
        return out

    @staticmethod
    def backward(ctx, g):
        x, s, z, inside, out = ctx.saved_tensors
        need_x, need_s, need_z = ctx.needs_input_grad[:3]
        g_in = g * inside if (need_x or need_z) else None
        gs = gz = None
        if need_s:  # out - x is exact where they are close (Sterbenz), so no cancellation in the group sum
            gs = torch.addcmul(out, inside, x, value=-1).mul_(g).sum_to_size(s.shape).div_(s)
        if need_z:  # sum(g) - sum(g_in) is exactly 0 for a group with nothing clamped, as in the reference
            gz = (g.sum_to_size(z.shape) - g_in.sum_to_size(z.shape)).mul_(-s)
        return g_in if need_x else None, gs, gz, None, None


def fake_quant(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Uniform fake quantization (clamp(round(x / s) + z, lo, hi) - z) * s with a straight-through round: the fused
    path (qat.speed lever fused_quant), or the autograd reference. x, s, z float32; s and z broadcast over x; z
    integer-valued (the callers round it)."""
    if not LEVERS.fused_quant:
        return fake_quant_reference(x, s, z, lo, hi)
    if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad or z.requires_grad)):
        return torch.div(x, s).round_().add_(z).clamp_(lo, hi).sub_(z).mul_(s)
    if LEVERS.compile_quant:
        return _compiled_reference()(x, s, z, lo, hi)
    return _FakeQuant.apply(x, s, z, lo, hi)


@functools.cache
def _compiled_reference():
    """fake_quant_reference through torch.compile (dynamic shapes: one compile serves every layer shape)."""
    return torch.compile(fake_quant_reference, dynamic=True)


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise QuantConfigError(f"{name}: weight contains NaN or inf")
