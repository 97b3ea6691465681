"""Uniform intN group-wise weight quantizer (RTN / GPTQ init; LSQ+ or OmniQuant-LWC learnable parameters).

    w_hat = s * (clamp(round(w / s) + z, 0, 2^b - 1) - z)        per group of `group_size` input columns

Two parametrisations of (s, z), picked by spec.lwc:
  - LSQ+/EfficientQAT (default): s and z are free learnable tensors [out, n_groups]; z is rounded with a
    straight-through estimator, so d w_hat / d s = round(w/s) - w/s inside the range and q_min|q_max - z outside.
  - OmniQuant LWC: s and z are recomputed from the latent weight every step from learnable clipping factors,
    max_c = sigmoid(gamma) * max(w), min_c = sigmoid(beta) * min(w).
Scales are rounded to fp16 in the forward pass (gradient passes straight through the cast) because that is how they
are stored: pack() -> unpack() is then bit-identical to the training forward. Symmetric mode fixes z = 2^(b-1)
(GPTQ convention: grid [-2^(b-1), 2^(b-1)-1] * s, s = 2 max|w| / (2^b - 1)).
With spec.float_zero the dequantization uses z - zero_shift (a float32 buffer [out, n_groups]) while the codes keep the
integer z: w_hat = s * (q - (z - zero_shift)). `qat merge` folds a QA-LoRA adapter (constant within each group) into
zero_shift; pack() then stores the float zeros z - zero_shift as float32.
"""
from __future__ import annotations

import torch
from torch import nn

from typing import TYPE_CHECKING

from qat.config import QuantConfigError
from qat.ptq.gptq import gptq_sequential
from qat.quantizers.base import SpecOption, WeightQuantizer, check_finite, fake_quant, register_weight_format, ste_round
from qat.speed import LEVERS
from qat_kernels.packing import pack_bits
from qat_kernels.reference import dequant_uniform

if TYPE_CHECKING:
    from qat.config import WeightSpec

_MIN_SCALE = 1e-5  # keeps all-zero groups finite; representable in fp16 (subnormal)
_LWC_INIT = 4.0  # OmniQuant's init: sigmoid(4) = 0.982 of the min/max range


class _FrozenAffine(torch.autograd.Function):
    """(q - z) * s for fixed integer codes q, with d/ds = q - z and d/dz = -s summed over each group; saves nothing
    but q (held by FrozenCodes anyway), s and z."""

    @staticmethod
    def forward(ctx, q, s, z):
        ctx.save_for_backward(q, s, z)
        return torch.sub(q, z).mul_(s)

    @staticmethod
    def backward(ctx, g):
        q, s, z = ctx.saved_tensors
        gs = torch.sub(q, z).mul_(g).sum_to_size(s.shape) if ctx.needs_input_grad[1] else None
        gz = g.sum_to_size(z.shape) * -s if ctx.needs_input_grad[2] else None
        return None, gs, gz


def frozen_affine(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(q - z) * s (s, z broadcast over q): the fused path (qat.speed lever fused_quant) or plain autograd."""
    if not LEVERS.fused_quant or not (torch.is_grad_enabled() and (s.requires_grad or z.requires_grad)):
        return (q - z) * s
    return _FrozenAffine.apply(q, s, z)


@register_weight_format
class UniformQuantizer(WeightQuantizer):
    """intN, group-wise scale/zero."""

    format = "uniform"
    default_bits = 4
    options = (
        SpecOption("sym", bool, False, "symmetric grid with a fixed mid-point zero (GPTQ convention)"),
        SpecOption("lwc", bool, False, "learnable weight clipping (OmniQuant) instead of free learnable scale/zero "
                   "(LSQ+)"),
        SpecOption("float_zero", bool, False, "the dequantization zero point is a float per group, z - zero_shift, "
                   "while the codes keep the integer z; stored as float32 zeros (32 bits per group instead of 8). "
                   "Written by `qat merge`, which folds a QA-LoRA adapter into zero_shift exactly (docs/FINETUNE.md)",
                   exclusive=True),
    )

    @classmethod
    def validate_spec(cls, spec: WeightSpec) -> None:
        if not 1 <= spec.bits <= 8:
            raise QuantConfigError(f"uniform weights need bits in 1..8, got {spec.bits}")
        if spec.sym and spec.bits < 2:
            raise QuantConfigError("symmetric uniform quantization needs bits >= 2 (use --format binary11 for 1-bit)")

    @classmethod
    def describe(cls, spec: WeightSpec) -> str:
        return f"W{spec.bits}{cls.group_label(spec)}{'-sym' if spec.sym else ''}{'-fz' if spec.float_zero else ''}"

    @classmethod
    def kernel_meta(cls, spec: WeightSpec, out_features: int, in_features: int) -> dict:
        return {**super().kernel_meta(spec, out_features, in_features), "bits": spec.bits}

    @classmethod
    def check_packed(cls, spec: WeightSpec, packed: dict, expected: dict) -> list[tuple[str, str]]:
        qmax, z, problems = 2**spec.bits - 1, packed["zeros"], []
        if spec.sym and not (z == 2 ** (spec.bits - 1)).all():
            problems.append(("zeros", f"are not the symmetric mid-point {2 ** (spec.bits - 1)}"))
        if not spec.float_zero and int(z.max()) > qmax:  # float zero points (a merged QA-LoRA adapter) may leave the grid
            problems.append(("zeros", f"reach {int(z.max())}, outside the {spec.bits}-bit grid [0, {qmax}]"))
        if not (packed["scales"] > 0).all():
            problems.append(("scales", "are not all positive"))
        return problems

    def check_state(self) -> list[tuple[str, str]]:
        if self.spec.lwc:
            return []
        z, bits = self.zero.detach(), self.spec.bits
        if self.spec.sym:
            if not (z == 2 ** (bits - 1)).all():
                return [("zero", f"is not the symmetric mid-point {2 ** (bits - 1)} everywhere (max {float(z.max()):g})")]
        elif z.min() < -1 or z.max() > self.qmax + 1:
            return [("zero", f"ranges over [{float(z.min()):g}, {float(z.max()):g}], outside the {bits}-bit grid "
                     f"[0, {self.qmax}]")]
        return []

    def __init__(self, spec: WeightSpec, out_features: int, in_features: int):
        super().__init__(spec, out_features, in_features)
        self.group_size = spec.group_for(in_features)
        self.n_groups = in_features // self.group_size
        self.qmax = 2**spec.bits - 1
        shape = (out_features, self.n_groups)
        if spec.lwc:
            self.clip_max_logit = nn.Parameter(torch.full(shape, _LWC_INIT))
            self.clip_min_logit = nn.Parameter(torch.full(shape, _LWC_INIT))
        else:
            self.scale = nn.Parameter(torch.ones(shape))
            self.zero = nn.Parameter(torch.zeros(shape), requires_grad=not spec.sym)
            if spec.sym:
                self.zero.data.fill_(2 ** (spec.bits - 1))
        # integer codes [out, n_groups, group_size] held fixed by qat.distill.codes.FrozenCodes (None: LSQ forward)
        self.frozen_codes: torch.Tensor | None = None
        self.register_buffer("zero_shift", torch.zeros(shape) if spec.float_zero else None)

    # ---- parameters -------------------------------------------------------------------------------------------
    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(self.out_features, self.n_groups, self.group_size)

    def _minmax_params(self, wg: torch.Tensor, shrink_max=None, shrink_min=None):
        """(scale, zero) from the range of each group; the range always includes 0 (as GPTQ/llm-compressor do)."""
        if self.spec.sym:
            amax = wg.abs().amax(-1)
            if shrink_max is not None:
                amax = amax * shrink_max
            scale = (2 * amax / self.qmax).clamp_min(_MIN_SCALE)
            return scale, torch.full_like(scale, 2 ** (self.spec.bits - 1))
        wmax = wg.amax(-1).clamp_min(0)
        wmin = wg.amin(-1).clamp_max(0)
        if shrink_max is not None:
            wmax, wmin = wmax * shrink_max, wmin * shrink_min
        scale = ((wmax - wmin) / self.qmax).clamp_min(_MIN_SCALE)
        zero = -wmin / scale
        return scale, zero

    def scale_zero(self, weight: torch.Tensor):
        """Effective (scale, zero) [out, n_groups] as used in the forward: scale fp16-rounded, zero an integer."""
        if self.spec.lwc:
            s, z = self._minmax_params(
                self._grouped(weight), torch.sigmoid(self.clip_max_logit), torch.sigmoid(self.clip_min_logit))
        else:
            s, z = self.scale.clamp_min(_MIN_SCALE), self.zero
        s = s + (s.to(torch.float16).to(torch.float32) - s).detach()  # fp16 value, float32 straight-through gradient
        z = torch.clamp(ste_round(z), 0, self.qmax)
        return s, z

    def cache_state(self) -> tuple:
        c = self.frozen_codes
        return () if c is None else (id(c), c._version)

    # ---- contract ---------------------------------------------------------------------------------------------
    def _codes(self, weight: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.clamp(ste_round(self._grouped(weight.float()) / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, self.qmax)

    def dequant_zero(self, z: torch.Tensor) -> torch.Tensor:
        """The zero point the dequantization subtracts: z itself, or z - zero_shift with float_zero."""
        return z if self.zero_shift is None else z - self.zero_shift

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        s, z = self.scale_zero(weight)
        if self.frozen_codes is not None:  # qat.distill.codes.FrozenCodes: w_hat = (q - z) * s with q held fixed
            w_hat = frozen_affine(self.frozen_codes, s.unsqueeze(-1), self.dequant_zero(z).unsqueeze(-1))
        elif self.zero_shift is not None:  # float zero points (a merged QA-LoRA adapter): codes round on z, dequant on z - shift
            q = self._codes(weight, s, z)
            w_hat = (q - self.dequant_zero(z).unsqueeze(-1)) * s.unsqueeze(-1)
        else:  # == ((self._codes(weight, s, z) - z) * s) bit for bit, with a fused backward (base.fake_quant)
            w_hat = fake_quant(self._grouped(weight.float()), s.unsqueeze(-1), z.unsqueeze(-1), 0, self.qmax)
        return w_hat.reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def init_from(self, weight, *, hessian=None, act_order: bool = False, damp: float = 0.01, block_size: int = 128,
                  **_):
        """RTN (min/max) without a Hessian; GPTQ with one. Returns the latent weight to keep (see base.py)."""
        check_finite("uniform.init_from", weight)
        w = weight.detach().float()
        if self.spec.lwc:  # the clipping logits are the parameters; start from OmniQuant's init
            self.clip_max_logit.fill_(_LWC_INIT)
            self.clip_min_logit.fill_(_LWC_INIT)
            if hessian is None:
                return weight.detach().clone()
        else:
            s, z = self._minmax_params(self._grouped(w))
            self.scale.copy_(s)
            self.zero.copy_(z)
            if hessian is None:
                return weight.detach().clone()
        return self._gptq(w, hessian, act_order=act_order, damp=damp, block_size=block_size).to(weight.dtype)

    @torch.no_grad()
    def _gptq(self, w, hessian, *, act_order, damp, block_size):
        g = self.group_size
        perm = torch.argsort(torch.diag(hessian), descending=True) if act_order else None
        # Group parameters: with act-order the column order no longer follows groups, so they are fitted once on
        # the original weight ("static groups"); otherwise each group is fitted on its error-compensated values
        # when the sweep reaches it (GPTQ's default).
        static = act_order or self.spec.lwc
        if static:
            s_all, z_all = self.scale_zero(w)
        else:
            s_all = torch.empty(self.out_features, self.n_groups)
            z_all = torch.empty(self.out_features, self.n_groups)
        order = perm if perm is not None else torch.arange(self.in_features)

        def quantize_col(col_w: torch.Tensor, col: int, peek) -> torch.Tensor:
            orig = int(order[col])
            gi = orig // g
            if not static and orig % g == 0:
                s, z = self._minmax_params(peek(g).reshape(self.out_features, 1, g))
                s_all[:, gi] = s[:, 0].to(torch.float16).float()
                z_all[:, gi] = torch.clamp(torch.round(z[:, 0]), 0, self.qmax)
            s, z = s_all[:, gi : gi + 1], z_all[:, gi : gi + 1]
            q = torch.clamp(torch.round(col_w / s) + z, 0, self.qmax)
            return (q - z) * s

        Q = gptq_sequential(w, hessian, quantize_col, chunk=1, block_size=block_size, damp=damp, perm=perm)
        if not self.spec.lwc:
            self.scale.copy_(s_all)
            self.zero.copy_(z_all)
        return Q

    @torch.no_grad()
    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        s, z = self.scale_zero(weight)
        q = self._codes(weight, s, z).reshape(self.out_features, self.in_features)
        return {
            "qweight": pack_bits(q.to(torch.int32), self.spec.bits),
            "scales": s.to(torch.float16),
            "zeros": z.to(torch.uint8) if self.zero_shift is None else self.dequant_zero(z).float(),
        }

    def unpack(self, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequant_uniform(packed["qweight"], packed["scales"], packed["zeros"], bits=self.spec.bits,
                               group_size=self.group_size, in_features=self.in_features)

    @property
    def bits_per_weight(self) -> float:
        # payload + one fp16 scale and one uint8 zero per group (stored for symmetric grids too; float32 with float_zero)
        return self.spec.bits + (16 + (32 if self.spec.float_zero else 8)) / self.group_size
