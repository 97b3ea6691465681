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
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from qat.config import QuantConfigError, WeightSpec


class WeightQuantizer(nn.Module, ABC):
    format: str = ""

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

    def extra_repr(self) -> str:
        return f"{self.format}, bits={self.spec.bits}, bpw={self.bits_per_weight:.3f}"


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round() in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        raise QuantConfigError(f"{name}: weight contains NaN or inf")
