"""Dynamic per-token activation quantization in plain torch: the ground truth for the W4A4/W8A8 kernels, the
runtime's CPU path, and the exact math of qat.quantizers.activation.ActQuantizer (whose eval forward is
fake_quant_per_token / fake_quant_knee_per_token, bit for bit). Needs torch only.

A token is one row of x along the last dim. Everything is computed in float32 whatever x's dtype; round is
round-half-to-even (torch.round); clip factors are in (0, 1] and multiply the token's own max / min.

Uniform (quantize_per_token / dequantize_per_token / fake_quant_per_token), b = bits:

  asymmetric (sym=False), qmax = 2^b - 1, codes uint8 in [0, qmax] (16 / 256 levels):
      max_c = clip_hi * max(max_i x_i, 0)        the range always contains 0, so 0 is exact and z is in [0, qmax]
      min_c = clip_lo * min(min_i x_i, 0)
      s     = max((max_c - min_c) / qmax, MIN_SCALE)
      z     = clamp(round(-min_c / s), 0, qmax)
      q     = clamp(round(x / s) + z, 0, qmax)
      x_hat = (q - z) * s
  symmetric (sym=True), qmax = 2^(b-1) - 1, codes int8 in [-qmax, qmax] (15 / 255 levels), clip_lo unused:
      s     = max(clip_hi * max_i |x_i| / qmax, MIN_SCALE),   z = 0
      q     = clamp(round(x / s), -qmax, qmax)
      x_hat = q * s

  Zero-width tokens: since the range contains 0, max_c == min_c only for an all-zero token; it gets s = MIN_SCALE,
  z = 0, q = z and x_hat = 0 exactly. MIN_SCALE also keeps x / s finite for tokens whose range underflows.
  With clip factors = 1 every |x - x_hat| <= s / 2 (up to float32 rounding of x / s).

Knee (fake_quant_knee_per_token; research mode, no integer GEMM: it is applied as a fake-quant before an FP matmul).
Two-region non-uniform grid (docs/METHODS.md §7.2), L_out = levels_out (default 2^b / 4), L_in = 2^b - L_out, h = L_out/2:

      hi = max|x|, lo = hi                     (sym)      hi = max(max x, 0), lo = max(-min x, 0)   (asym)
      c_hi = clip_hi * hi,  k_hi = knee_hi * c_hi,  c_lo = clip_lo * lo,  k_lo = knee_lo * c_lo   (sym: *_lo = *_hi)
      body  [bottom, top]: s_in = max((k_hi + k_lo) / (L_in - 1), MIN_SCALE), bottom = -k_lo,
                           top = bottom + (L_in - 1) * s_in,  Q_body = bottom + clamp(round((x - bottom)/s_in), 0, L_in-1) * s_in
      tails: s_up = max((c_hi - top) / h, MIN_SCALE),   Q_up = top + clamp(round((x - top) / s_up), 0, h) * s_up
             s_dn = max((c_lo + bottom) / h, MIN_SCALE), Q_dn = bottom - clamp(round((bottom - x) / s_dn), 0, h) * s_dn
             Q_tail = Q_up where 2x > top + bottom else Q_dn     (the nearer tail)
      d = max(x - top, bottom - x)   (> 0 outside the body)
      hard (eval, temperature=None): x_hat = Q_tail where d > 0 else Q_body
      soft (training):               m = sigmoid(d / (temperature * max(c_hi, c_lo) + MIN_SCALE)),
                                     x_hat = (1 - m) * Q_body + m * Q_tail
  The tails' first level coincides with the body's edge, so the hard quantizer has at most L_in + L_out = 2^b
  distinct levels per token.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

MIN_SCALE = 1e-10  # scale floor: all-zero tokens and underflowing ranges (a normal float32, far below real ranges)

ClipFactor = float | torch.Tensor
RoundFn = Callable[[torch.Tensor], torch.Tensor]


def _factor(c: ClipFactor, name: str, x: torch.Tensor) -> torch.Tensor:
    """A clip/knee factor as a float32 tensor on x's device (python floats are range-checked here)."""
    if isinstance(c, torch.Tensor):
        return c.to(device=x.device, dtype=torch.float32)
    if not 0.0 < float(c) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {c}")
    return torch.tensor(float(c), dtype=torch.float32, device=x.device)


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"per-token activation quantization supports 2..8 bits, got {bits}")


def per_token_scale_zero(x: torch.Tensor, bits: int, clip_hi: ClipFactor = 1.0, clip_lo: ClipFactor = 1.0,
                         sym: bool = False, round_fn: RoundFn = torch.round) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), float32 [..., 1], for the uniform grid described in the module docstring.
    round_fn = torch.round for inference; a straight-through round in training (gradients reach the clip factors)."""
    _check_bits(bits)
    x = x.float()
    hi = _factor(clip_hi, "clip_hi", x)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = (hi * x.abs().amax(-1, keepdim=True) / qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo = _factor(clip_lo, "clip_lo", x)
    qmax = 2**bits - 1
    max_c = hi * x.amax(-1, keepdim=True).clamp_min(0)
    min_c = lo * x.amin(-1, keepdim=True).clamp_max(0)
    scale = ((max_c - min_c) / qmax).clamp_min(MIN_SCALE)
    zero = torch.clamp(round_fn(-min_c / scale), 0, qmax)
    return scale, zero


def _code_range(bits: int, sym: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


def quantize_per_token(x: torch.Tensor, bits: int, clip_hi: ClipFactor = 1.0, clip_lo: ClipFactor = 1.0,
                       sym: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., n] -> (q, scale, zero): integer codes (uint8 asym / int8 sym, shape of x) and float32 [..., 1]."""
    scale, zero = per_token_scale_zero(x, bits, clip_hi, clip_lo, sym)
    lo, hi = _code_range(bits, sym)
    q = torch.clamp(torch.round(x.float() / scale) + zero, lo, hi)
    return q.to(torch.int8 if sym else torch.uint8), scale, zero


def dequantize_per_token(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat = (q - zero) * scale in float32, then cast to dtype."""
    return ((q.float() - zero) * scale).to(dtype)


def fake_quant_per_token(x: torch.Tensor, bits: int, clip_hi: ClipFactor = 1.0, clip_lo: ClipFactor = 1.0,
                         sym: bool = False, round_fn: RoundFn = torch.round) -> torch.Tensor:
    """dequantize(quantize(x)) in one pass, returned in x's dtype; bit-identical to the two-step form (same float32
    ops in the same order). With a straight-through round_fn it is the differentiable training forward."""
    scale, zero = per_token_scale_zero(x, bits, clip_hi, clip_lo, sym, round_fn)
    lo, hi = _code_range(bits, sym)
    q = torch.clamp(round_fn(x.float() / scale) + zero, lo, hi)
    return ((q - zero) * scale).to(x.dtype)


def knee_levels(bits: int, levels_out: int | None = None) -> tuple[int, int]:
    """(L_in, L_out) for the knee quantizer: L_out defaults to a quarter of the 2^bits levels (12 + 4 at 4 bits)."""
    total = 2**bits
    l_out = total // 4 if levels_out is None else int(levels_out)
    if l_out < 2 or l_out % 2 or total - l_out < 2:
        raise ValueError(f"knee levels_out must be even, >= 2 and leave >= 2 body levels of {total}, got {l_out}")
    return total - l_out, l_out


def fake_quant_knee_per_token(x: torch.Tensor, bits: int, clip_hi: ClipFactor, clip_lo: ClipFactor,
                              knee_hi: ClipFactor, knee_lo: ClipFactor, sym: bool = False, *,
                              levels_out: int | None = None, temperature: float | None = None,
                              round_fn: RoundFn = torch.round) -> torch.Tensor:
    """Two-region (body + tails) per-token fake quantization, returned in x's dtype; see the module docstring.
    temperature=None is the hard mask (eval / runtime); a float gives the soft mask used in training."""
    _check_bits(bits)
    l_in, l_out = knee_levels(bits, levels_out)
    half = l_out // 2
    xf = x.float()
    c_hi_f, k_hi_f = _factor(clip_hi, "clip_hi", xf), _factor(knee_hi, "knee_hi", xf)
    if sym:
        hi = lo = xf.abs().amax(-1, keepdim=True)
        c_lo_f, k_lo_f = c_hi_f, k_hi_f
    else:
        hi = xf.amax(-1, keepdim=True).clamp_min(0)
        lo = (-xf.amin(-1, keepdim=True)).clamp_min(0)
        c_lo_f, k_lo_f = _factor(clip_lo, "clip_lo", xf), _factor(knee_lo, "knee_lo", xf)
    c_hi, c_lo = c_hi_f * hi, c_lo_f * lo
    k_hi, k_lo = k_hi_f * c_hi, k_lo_f * c_lo

    s_in = ((k_hi + k_lo) / (l_in - 1)).clamp_min(MIN_SCALE)
    bottom = -k_lo
    top = bottom + (l_in - 1) * s_in
    body = bottom + torch.clamp(round_fn((xf - bottom) / s_in), 0, l_in - 1) * s_in
    s_up = ((c_hi - top) / half).clamp_min(MIN_SCALE)
    s_dn = ((c_lo + bottom) / half).clamp_min(MIN_SCALE)
    up = top + torch.clamp(round_fn((xf - top) / s_up), 0, half) * s_up
    dn = bottom - torch.clamp(round_fn((bottom - xf) / s_dn), 0, half) * s_dn
    tail = torch.where(2 * xf > top + bottom, up, dn)
    d = torch.maximum(xf - top, bottom - xf)
    if temperature is None:
        out = torch.where(d > 0, tail, body)
    else:
        m = torch.sigmoid(d / (temperature * torch.maximum(c_hi, c_lo) + MIN_SCALE))
        out = (1 - m) * body + m * tail
    return out.to(x.dtype)


def act_fake_quant(x: torch.Tensor, params: dict) -> torch.Tensor:
    """Apply an exported activation quantizer (ActQuantizer.export_params()) at inference: the runtime's entry point."""
    mode = params.get("mode", "uniform")
    if mode == "uniform":
        return fake_quant_per_token(x, params["bits"], params["clip_hi"], params["clip_lo"], params["sym"])
    if mode == "knee":
        return fake_quant_knee_per_token(x, params["bits"], params["clip_hi"], params["clip_lo"], params["knee_hi"],
                                         params["knee_lo"], params["sym"], levels_out=params["levels_out"])
    raise ValueError(f"unknown activation quantization mode {mode!r}; supported: uniform, knee")
