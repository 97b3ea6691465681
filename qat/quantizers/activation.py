"""Dynamic per-token activation quantizer for a linear layer's input (LBLLM stage 3 "AAR", docs/METHODS.md §7).

QuantLinear applies it after its optional Hadamard rotation (docs/METHODS.md §7.4), so it sees the rotated input. The
scale/zero of every token are computed on the fly from that token's range; what is learned is per layer:

  mode="uniform"  (default, maps to INT4/INT8 GEMMs) two scalar logits, clip_hi = sigmoid(clip_max_logit) and
                  clip_lo = sigmoid(clip_min_logit), that shrink the token's max and min (sym: max|x| only) before the
                  INT grid is laid over it (OmniQuant-LWC style, but on activations).
  mode="knee"     (research) two-region non-uniform grid: dense body [-k, k] with L_in levels, sparse tails (k, c]
                  with L_out/2 levels each side, c = clip * max, k = knee * c; the body/tail mask is a sigmoid with
                  temperature `temperature` (relative to c) in training and a hard step in eval. No integer-GEMM
                  kernel: its inference form is the fake-quant before an FP matmul.

The math lives in qat_kernels.act_quant (plain torch, shared with the runtime and the W4A4 kernel's reference):
forward() calls it with a straight-through round in training (gradients reach the logits and x) and with torch.round
in eval, which gives the same values, so eval forward == act_fake_quant(x, export_params()) bit for bit.
Quantization is computed in float32; the output has x's dtype.
"""
from __future__ import annotations

import math

import torch
from qat_kernels.act_quant import fake_quant_knee_per_token, fake_quant_per_token, knee_levels, per_token_scale_zero
from torch import nn

from qat.config import ActSpec, QuantConfigError
from qat.quantizers.base import fake_quant, ste_round
from qat.speed import LEVERS

_CLIP_INIT = 4.0  # sigmoid(4) = 0.982: nearly unclipped, with a gradient that still moves (OmniQuant's LWC init)
_KNEE_INIT = 0.0  # sigmoid(0) = 0.5 of the clip value until init_from() calibrates it
_FACTOR_RANGE = (0.01, 0.999)  # calibrated factors are kept inside this, so their logits stay finite and trainable
_MAX_CALIB_ELEMENTS = 2**24  # torch.quantile's input limit; calibration tokens are subsampled to fit


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class ActQuantizer(nn.Module):
    def __init__(self, spec: ActSpec, in_features: int, *, knee_levels_out: int | None = None,
                 temperature: float = 0.1):
        super().__init__()
        if not spec.enabled:
            raise QuantConfigError(
                f"ActQuantizer needs act bits 4 or 8, got {spec.bits} (16 = no activation quantization)")
        self.spec = spec
        self.in_features = in_features
        self.bits, self.mode, self.sym = spec.bits, spec.mode, spec.sym
        self._qmax_sym = 2 ** (spec.bits - 1) - 1  # symmetric codes lie in [-qmax, qmax] (qat_kernels.act_quant)
        # per-layer scalars; the *_min_* logits (negative side) exist only for asymmetric grids
        self.clip_max_logit = nn.Parameter(torch.tensor(_CLIP_INIT))
        self.clip_min_logit = None if self.sym else nn.Parameter(torch.tensor(_CLIP_INIT))
        self.levels_in = self.levels_out = 0
        if self.mode == "knee":
            try:
                self.levels_in, self.levels_out = knee_levels(self.bits, knee_levels_out)
            except ValueError as e:
                raise QuantConfigError(str(e)) from None
            self.knee_max_logit = nn.Parameter(torch.tensor(_KNEE_INIT))
            self.knee_min_logit = None if self.sym else nn.Parameter(torch.tensor(_KNEE_INIT))
        self.temperature = temperature

    # ---- parameters -------------------------------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        """Knee soft-mask temperature, relative to the token's clip value (annealed: docs/METHODS.md §7.2)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not value > 0:
            raise ValueError(f"temperature must be > 0, got {value}")
        self._temperature = float(value)

    def clip_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(clip_hi, clip_lo) as float32 0-d tensors in (0, 1); clip_lo == clip_hi for symmetric grids."""
        hi = torch.sigmoid(self.clip_max_logit.float())
        return hi, hi if self.clip_min_logit is None else torch.sigmoid(self.clip_min_logit.float())

    def knee_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(knee_hi, knee_lo): the knee as a fraction of the clip value (knee mode only)."""
        hi = torch.sigmoid(self.knee_max_logit.float())
        return hi, hi if self.knee_min_logit is None else torch.sigmoid(self.knee_min_logit.float())

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ActQuantizer: input width {x.shape[-1]} != in_features {self.in_features}")
        round_fn = ste_round if self.training else torch.round
        clip_hi, clip_lo = self.clip_factors()
        if self.mode == "uniform":
            if not LEVERS.fused_quant:
                return fake_quant_per_token(x, self.bits, clip_hi, clip_lo, self.sym, round_fn=round_fn)
            # fake_quant_per_token's ops with the elementwise part fused (qat.quantizers.base.fake_quant): the
            # per-token scale/zero stay in autograd, so gradients still reach x through the token's range
            scale, zero = per_token_scale_zero(x, self.bits, clip_hi, clip_lo, self.sym, round_fn)
            lo, hi = (-self._qmax_sym, self._qmax_sym) if self.sym else (0, 2**self.bits - 1)
            return fake_quant(x.float(), scale, zero, lo, hi).to(x.dtype)
        knee_hi, knee_lo = self.knee_factors()
        return fake_quant_knee_per_token(
            x, self.bits, clip_hi, clip_lo, knee_hi, knee_lo, self.sym, levels_out=self.levels_out,
            temperature=self.temperature if self.training else None, round_fn=round_fn)

    # ---- calibration / export ---------------------------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, x_samples: torch.Tensor, *, clip_pct: float = 0.999, knee_pct: float = 0.95) -> None:
        """Set the clip (and knee) factors from calibration inputs [..., in_features], as this quantizer sees them
        (i.e. after QuantLinear's rotation). Per token: clip = pct_clip / max, knee = pct_knee / (clip * max), each
        averaged over tokens (docs/METHODS.md §7.3). Symmetric grids use percentiles of |x|; asymmetric ones use each
        side's tail of x at half the probability (pct of |x| for a symmetric token), over the tokens that have
        that side. Factors are clamped to [0.01, 0.999]."""
        if x_samples.shape[-1] != self.in_features:
            raise ValueError(f"init_from: sample width {x_samples.shape[-1]} != in_features {self.in_features}")
        if not 0 < knee_pct < clip_pct < 1:
            raise ValueError(f"need 0 < knee_pct < clip_pct < 1, got knee_pct={knee_pct}, clip_pct={clip_pct}")
        x = x_samples.detach().reshape(-1, self.in_features).float()
        if not torch.isfinite(x).all():
            raise ValueError("init_from: activation samples contain NaN or inf")
        max_tokens = max(1, _MAX_CALIB_ELEMENTS // self.in_features)
        if x.shape[0] > max_tokens:  # evenly spaced subsample
            x = x[torch.linspace(0, x.shape[0] - 1, max_tokens).long()]

        def side_factors(v: torch.Tensor) -> tuple[float, float] | None:
            """(clip, knee) for one side; v holds that side's values as magnitudes in the upper tail."""
            p_clip, p_knee = (clip_pct, knee_pct) if self.sym else (1 - (1 - clip_pct) / 2, 1 - (1 - knee_pct) / 2)
            vmax = v.amax(-1)
            keep = vmax > 0
            if not keep.any():
                return None
            qs = torch.quantile(v[keep], torch.tensor([p_clip, p_knee]), dim=-1)  # [2, tokens]
            clip = (qs[0] / vmax[keep]).clamp(*_FACTOR_RANGE).mean()
            knee = (qs[1] / (clip * vmax[keep])).clamp(*_FACTOR_RANGE).mean()
            return float(clip), float(knee)

        sides = [side_factors(x.abs())] if self.sym else [side_factors(x), side_factors(-x)]
        logits = [(self.clip_max_logit, getattr(self, "knee_max_logit", None)),
                  (self.clip_min_logit, getattr(self, "knee_min_logit", None))]
        for factors, (clip_logit, knee_logit) in zip(sides, logits):
            if factors is None:  # no token has values on this side: leave its init alone
                continue
            clip_logit.fill_(_logit(factors[0]))
            if self.mode == "knee":
                knee_logit.fill_(_logit(factors[1]))

    @torch.no_grad()
    def export_params(self) -> dict:
        """What the runtime needs (qat_kernels.act_quant.act_fake_quant(x, params) reproduces eval forward exactly):
        mode, bits, sym, clip_hi, clip_lo (floats holding the exact float32 factors) and, for knee mode, knee_hi,
        knee_lo, levels_in, levels_out."""
        clip_hi, clip_lo = self.clip_factors()
        out = {"mode": self.mode, "bits": self.bits, "sym": self.sym, "clip_hi": float(clip_hi),
               "clip_lo": float(clip_lo)}
        if self.mode == "knee":
            knee_hi, knee_lo = self.knee_factors()
            out.update(knee_hi=float(knee_hi), knee_lo=float(knee_lo), levels_in=self.levels_in,
                       levels_out=self.levels_out)
        return out

    def extra_repr(self) -> str:
        p = self.export_params()
        s = f"{self.mode}, A{self.bits}{'-sym' if self.sym else ''}, clip=({p['clip_hi']:.3f}, {p['clip_lo']:.3f})"
        if self.mode == "knee":
            s += f", knee=({p['knee_hi']:.3f}, {p['knee_lo']:.3f}), levels={self.levels_in}+{self.levels_out}"
        return s
