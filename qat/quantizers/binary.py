"""W(1+1) binary weights (LBLLM, docs/METHODS.md §5): one sign bit + one bitmap bit per weight.

Per output row i and column group b (spec.group_for(in_features) columns) there are two (alpha, mu) pairs, k = 0, 1.
Each weight has a bitmap bit G selecting its pair and a sign B = sign(W - mu_G) (sign(0) = +1):

    W_hat = alpha_G * B + mu_G

Pair index == bitmap bit value == round(G_FP) everywhere (forward, pack, kernels/reference.py). The relaxed bitmap
G_FP is the weight of pair 1 (not of pair 0), so hardening G_FP gives the stored bit directly:

    soft      W_q = (1 - G_FP) * (alpha_0 B_0 + mu_0) + G_FP * (alpha_1 B_1 + mu_1),  B_k = sign(W - mu_k)
    hard      W_q = pair G,  G = 1[G_FP >= 0.5]       (after harden(), or bitmap_forward="hard_ste" while training,
                                                        where G_FP gets the soft mix's gradient straight through)

G_FP = clamp(bitmap_fp, 0, 1). Clamp rather than sigmoid because it reaches 0 and 1 exactly (the soft mix then *is*
the hard forward, bit for bit, so hardening a polarized bitmap changes nothing), it keeps G_FP in its own units (a
learning rate means the same thing everywhere in [0, 1]), and a saturated entry is a decided bit, which is what the polarization regularizer asks for anyway. The latent W gets a straight-through gradient through
sign() (optionally clipped to |W - mu_k| <= ste_clip * alpha_k); mu gets its gradient from the "+ mu" term only.
alpha (clamped positive) and mu are rounded to fp16 in the forward pass, as they are stored, so that
unpack(pack(w)) == forward(w) bit for bit in hard mode.

PTQ init: a 2-pair code is a 4-level codebook {mu_k +- alpha_k} per group with nearest-level assignment, so the
EM of docs/METHODS.md §5.2 (E: pick the pair with the smaller error; M: weighted least squares for (alpha_k, mu_k)
with the signs fixed) is weighted Lloyd on 4 levels, run for all (row, group) at once. With a Hessian it runs inside GPTQ
(qat.ptq.gptq.gptq_sequential), by default one whole group per step (chunk = group size), importance diag(H).
"""
from __future__ import annotations

import torch
from torch import nn

from typing import TYPE_CHECKING

from qat.config import QuantConfigError
from qat.ptq.gptq import gptq_sequential
from qat.quantizers.base import WeightQuantizer, check_finite, register_weight_format
from qat.speed import LEVERS
from qat_kernels.packing import pack_bits
from qat_kernels.reference import dequant_binary11

if TYPE_CHECKING:
    from qat.config import WeightSpec

_MIN_ALPHA = 1e-5  # keeps degenerate (constant) groups finite; representable in fp16 (subnormal)
BITMAP_FORWARDS = ("soft", "hard_ste")
IMPORTANCES = ("diag", "inv_diag", "uniform")
GPTQ_CHUNKS = ("group", "column")


def _fp16(t: torch.Tensor) -> torch.Tensor:
    """Round to the stored fp16 value (the cast passes gradients straight through)."""
    return t.to(torch.float16).to(torch.float32)


def _sign(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d >= 0, 1.0, -1.0).to(d.dtype)


def _assign(w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Bitmap G [N, g] (long) for pairs alpha, mu [N, 2]: the pair whose level alpha_k * sign(w - mu_k) + mu_k is
    nearer, computed exactly as the forward computes the levels (ties go to pair 0)."""
    d = w.unsqueeze(-1) - mu.unsqueeze(1)  # [N, g, 2]
    err = (d - alpha.unsqueeze(1) * _sign(d)) ** 2
    return (err[..., 1] < err[..., 0]).long()


@torch.no_grad()
def em_binary11(w: torch.Tensor, importance: torch.Tensor | None = None, iters: int = 10):
    """Weighted 2-pair EM (docs/METHODS.md §5.2) for many groups at once.

    w [N, g] (one row per (output row, column group)); importance [g] or [N, g] (None = uniform).
    Returns (alpha, mu, G): alpha, mu [N, 2] fp16-representable with alpha[:, 0] <= alpha[:, 1], and the hard bitmap
    G [N, g] (long) that is optimal for exactly those rounded parameters.

    The two pairs are 4 levels mu_k +- alpha_k and the E-step (pair with the smaller error, sign w.r.t. mu_k) is a
    nearest-level assignment, so each cluster is a contiguous run of the sorted row: the EM runs on sorted rows with
    prefix sums, O(N) per iteration. Sorted levels l0 <= l1 <= l2 <= l3 pair up inner (l1, l2) -> pair 0 and
    outer (l0, l3) -> pair 1, as the median split starts them; Lloyd keeps that order, and it makes pair 0 the
    one with the smaller alpha (the canonical form).
    """
    w = w.float()
    h = torch.ones_like(w) if importance is None else importance.float().expand_as(w)
    ws, order = w.sort(1)
    hs = h.gather(1, order)
    zero = ws.new_zeros(ws.shape[0], 1)
    csum_hw = torch.cat([zero, (hs * ws).cumsum(1)], 1)  # [N, g + 1]
    csum_h = torch.cat([zero, hs.cumsum(1)], 1)
    full = torch.full_like(zero, w.shape[1], dtype=torch.long)

    def cluster_means(bounds: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """h-weighted mean of the 4 sorted runs split at bounds [N, 3]; an empty run keeps its previous level."""
        edges = torch.cat([torch.zeros_like(full), bounds, full], 1)  # [N, 5]
        sums, mass = csum_hw.gather(1, edges).diff(dim=1), csum_h.gather(1, edges).diff(dim=1)
        levels = torch.where(mass > 0, sums / mass.clamp_min(torch.finfo(w.dtype).tiny), prev)
        return levels.sort(1).values

    # init (docs/METHODS.md §5.2): split by the median of |w - mean|: inner half -> pair 0, outer -> pair 1, sign
    # w.r.t. the mean
    mean = w.mean(1, keepdim=True)
    med = (w - mean).abs().median(1, keepdim=True).values
    bounds = torch.cat([torch.searchsorted(ws, mean - med), torch.searchsorted(ws, mean),
                        torch.searchsorted(ws, mean + med, right=True)], 1)
    levels = cluster_means(bounds, mean.expand(-1, 4))
    for _ in range(iters):
        new = torch.searchsorted(ws, (levels[:, 1:] + levels[:, :-1]) / 2)  # E-step: nearest level; ties go up
        if torch.equal(new, bounds):
            break
        bounds = new
        levels = cluster_means(bounds, levels)  # M-step: weighted least squares = weighted run means
    inner, outer = levels[:, [1, 2]], levels[:, [0, 3]]
    alpha = torch.stack([inner.diff(dim=1)[:, 0], outer.diff(dim=1)[:, 0]], 1) / 2
    mu = torch.stack([inner.sum(1), outer.sum(1)], 1) / 2
    alpha, mu = _fp16(alpha.clamp_min(_MIN_ALPHA)), _fp16(mu)
    return alpha, mu, _assign(w, alpha, mu)  # final bitmap for the stored (rounded) parameters


class _PairMix(torch.autograd.Function):
    """Binary11Quantizer's forward without a graph over [out, in, 2] tensors: the same values bit for bit and the
    gradients autograd gives _reference_forward (plain STE through sign, ste_clip None).

    Pair k of a weight is p_k = alpha_k * B_k + mu_k with B_k = sign(W - mu_k) (sign(0) = +1): B_k is copysign(1, W -
    mu_k), and B_k * alpha_k + mu_k is exactly the reference's alpha_k * (B_k + 0) + mu_k. The mix is the
    reference's (1 - G) * p0 + G * p1: G = clamp(bitmap_fp, 0, 1) ("soft"), or the hard bit as 0./1. ("hard",
    "hard_ste"), for which that sum is exactly p0 or p1, i.e. torch.where(bit, p1, p0). Gradients, with u1 = g * G,
    u0 = g - u1 (upstream g):
        W        u0 * alpha_0 + u1 * alpha_1     (STE through the signs)
        alpha_k  sum over the group of u_k * B_k;   mu_k: sum of u_k
        G_FP     g * (p1 - p0) * 1[0 <= G_FP <= 1]    ("soft" and "hard_ste"; none once hardened)
    Float 0/1 masks throughout: torch's bool kernels are scalar loops on CPU. a_k, m_k are [out, ng, 1], the rest
    [out, ng, g].
    """

    @staticmethod
    def forward(ctx, w, a0, a1, m0, m1, bitmap_fp, mode: str):
        one = w.new_ones(())
        b0 = torch.copysign(one, torch.sub(w, m0))  # sign(W - mu_k) with sign(+0) = +1, as _sign()
        b1 = torch.copysign(one, torch.sub(w, m1))
        p0, p1 = torch.addcmul(m0, b0, a0), torch.addcmul(m1, b1, a1)
        if mode == "soft":
            G = bitmap_fp.clamp(0, 1)
        else:
            G = torch.ge(bitmap_fp, 0.5, out=torch.empty_like(w))  # the hard bit as 1. / 0.
        w_hat = torch.rsub(G, 1).mul_(p0).add_(G * p1)
        cm = None
        if mode != "hard" and ctx.needs_input_grad[5]:  # clamp mask of the relaxed bitmap, as a float
            rel = G if mode == "soft" else bitmap_fp.clamp(0, 1)
            cm = torch.eq(rel, bitmap_fp, out=torch.empty_like(w))
        ctx.mode = mode
        ctx.save_for_backward(a0, a1, m0, m1, b0, b1, G, cm)
        return w_hat

    @staticmethod
    def backward(ctx, g):
        a0, a1, m0, m1, b0, b1, G, cm = ctx.saved_tensors
        need = ctx.needs_input_grad
        u1 = g * G
        u0 = g - u1
        gw = ga0 = ga1 = gm0 = gm1 = gbm = None
        if need[0]:
            gw = torch.mul(u0, a0).add_(torch.mul(u1, a1))
        if need[1]:
            ga0 = torch.mul(u0, b0).sum_to_size(a0.shape)
        if need[2]:
            ga1 = torch.mul(u1, b1).sum_to_size(a1.shape)
        if need[3]:
            gm0 = u0.sum_to_size(m0.shape)
        if need[4]:
            gm1 = u1.sum_to_size(m1.shape)
        if need[5] and cm is not None:
            gbm = torch.addcmul(m1, b1, a1).sub_(torch.addcmul(m0, b0, a0)).mul_(g).mul_(cm)
        return gw, ga0, ga1, gm0, gm1, gbm, None


@register_weight_format
class Binary11Quantizer(WeightQuantizer):
    """W(1+1): sign + group bitmap."""

    format = "binary11"
    default_bits = 2

    @classmethod
    def validate_spec(cls, spec: WeightSpec) -> None:
        if spec.bits != 2:
            raise QuantConfigError(
                f"format binary11 stores 1 sign bit + 1 bitmap bit per weight (bits=2), got bits={spec.bits}")

    @classmethod
    def describe(cls, spec: WeightSpec) -> str:
        return f"W(1+1){cls.group_label(spec)}"

    @classmethod
    def check_packed(cls, spec: WeightSpec, packed: dict, expected: dict) -> list[tuple[str, str]]:
        return [] if (packed["alpha"] > 0).all() else [("alpha", "is not all positive")]

    def __init__(self, spec: WeightSpec, out_features: int, in_features: int, *, bitmap_forward: str = "soft",
                 ste_clip: float | None = None):
        super().__init__(spec, out_features, in_features)
        self.group_size = spec.group_for(in_features)
        self.n_groups = in_features // self.group_size
        pairs = (out_features, self.n_groups, 2)
        self.alpha = nn.Parameter(torch.ones(pairs))
        self.mu = nn.Parameter(torch.zeros(pairs))
        self.bitmap_fp = nn.Parameter(torch.full((out_features, in_features), 0.5))  # G_FP = clamp(., 0, 1)
        self.register_buffer("hardened", torch.zeros((), dtype=torch.bool))
        self._hard = False  # python mirror of `hardened`: no device sync per forward
        self.register_load_state_dict_post_hook(lambda module, _keys: module._sync_hardened())
        self.bitmap_forward = bitmap_forward
        self.ste_clip = ste_clip  # clipped STE: d B_k / d W = 1[|W - mu_k| <= ste_clip * alpha_k]; None = plain STE

    # ---- options and state ------------------------------------------------------------------------------------
    @property
    def bitmap_forward(self) -> str:
        return self._bitmap_forward

    @bitmap_forward.setter
    def bitmap_forward(self, mode: str) -> None:
        if mode not in BITMAP_FORWARDS:
            raise QuantConfigError(f"bitmap_forward must be one of {BITMAP_FORWARDS}, got {mode!r}")
        self._bitmap_forward = mode

    def _sync_hardened(self) -> None:
        self._hard = bool(self.hardened)

    def cache_state(self) -> tuple:
        return (self._hard, self._bitmap_forward, self.ste_clip)

    @property
    def is_hard(self) -> bool:
        return self._hard

    @torch.no_grad()
    def harden(self) -> None:
        """Snap G_FP to {0, 1} (G = 1[G_FP >= 0.5]) and use the hard bitmap from now on (docs/METHODS.md §5.3)."""
        self.bitmap_fp.copy_(self.hard_bitmap().float())
        self.hardened.fill_(True)
        self._hard = True

    def relaxed_bitmap(self) -> torch.Tensor:
        """G_FP in [0, 1], [out, in]: the weight of pair 1."""
        return self.bitmap_fp.clamp(0, 1)

    def hard_bitmap(self) -> torch.Tensor:
        """The stored bitmap bit (= pair index) of every weight, bool [out, in]."""
        return self.bitmap_fp >= 0.5

    def polarization_loss(self, beta: float) -> torch.Tensor:
        """mean(1 - |2 G_FP - 1|^beta)^2: 1 at G_FP = 0.5, 0 at {0, 1} (docs/METHODS.md §5.3; mean over elements)."""
        u = (2 * self.relaxed_bitmap() - 1).abs()
        return ((1 - u.pow(beta)) ** 2).mean()

    def pair_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, mu) [out, n_groups, 2] as used in the forward: alpha clamped positive, both fp16-rounded."""
        return _fp16(self.alpha.clamp_min(_MIN_ALPHA)), _fp16(self.mu)

    # ---- contract ---------------------------------------------------------------------------------------------
    def _pair_values(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_k * sign(W - mu_k) + mu_k for k = 0, 1, each [out, n_groups, g], with the sign's STE."""
        a, m = (t.unsqueeze(2) for t in self.pair_params())  # [out, ng, 1, 2]
        w = weight.float().reshape(self.out_features, self.n_groups, self.group_size, 1)
        d = w - m.detach()
        surrogate = d - d.detach()  # exactly 0 in the forward, d(W) in the backward
        if self.ste_clip is not None:
            surrogate = surrogate * (d.detach().abs() <= self.ste_clip * a.detach())
        pairs = a * (_sign(d.detach()) + surrogate) + m
        return pairs[..., 0], pairs[..., 1]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not LEVERS.fused_quant or self.ste_clip is not None:
            return self._reference_forward(weight)
        mode = "hard" if self._hard else self.bitmap_forward
        a, m = self.pair_params()
        w = weight.float().reshape(self.out_features, self.n_groups, self.group_size)
        w_hat = _PairMix.apply(w, a[..., 0:1], a[..., 1:2], m[..., 0:1], m[..., 1:2],
                               self.bitmap_fp.reshape(w.shape), mode)
        return w_hat.reshape(self.out_features, self.in_features)

    def _reference_forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The forward through autograd (what _PairMix reproduces; ste_clip runs here)."""
        p0, p1 = self._pair_values(weight)
        shape = p0.shape
        if self._hard or self.bitmap_forward == "hard_ste":
            w_hat = torch.where(self.hard_bitmap().reshape(shape), p1, p0)
            if not self._hard:  # hard_ste: the forward value stays exact, G_FP gets the soft mix's gradient
                g = self.relaxed_bitmap().reshape(shape)
                soft = (1 - g) * p0.detach() + g * p1.detach()
                w_hat = w_hat + (soft - soft.detach())
        else:
            g = self.relaxed_bitmap().reshape(shape)
            w_hat = (1 - g) * p0 + g * p1  # exact p0 / p1 where g is exactly 0 / 1
        return w_hat.reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def init_from(self, weight, *, hessian=None, importance: str = "diag", damp: float = 0.01, em_iters: int = 10,
                  bitmap_eps: float = 0.05, block_size: int = 128, gptq_chunk: str = "group", **_):
        """PTQ init (docs/METHODS.md §5.2). Without a Hessian: uniform-importance EM per (row, group); returns the
        weight itself. With one: importance-weighted EM (importance diag(H), 1/[H^-1]_jj or uniform) inside GPTQ; returns
        the error-compensated weight that was quantized, so the hard forward of the result reproduces the PTQ weight
        exactly. gptq_chunk="group" (the default) quantizes each group jointly and propagates its error as a block;
        "column" fits the group's pairs when GPTQ reaches the group, then assigns and propagates column by column.
        G_FP starts at 0.5 +- (0.5 - bitmap_eps) on the PTQ bitmap (inside (0, 1) so the clamp keeps a gradient): the
        hard forward (harden() or bitmap_forward="hard_ste") is the PTQ weight exactly, the *soft* forward at init is
        the (1 - eps, eps) blend of the chosen and the other pair (bitmap_eps=0 makes it the PTQ weight too).
        """
        check_finite("binary11.init_from", weight)
        if importance not in IMPORTANCES:
            raise QuantConfigError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
        if gptq_chunk not in GPTQ_CHUNKS:
            raise QuantConfigError(f"gptq_chunk must be one of {GPTQ_CHUNKS}, got {gptq_chunk!r}")
        if not 0 <= bitmap_eps < 0.5:
            raise QuantConfigError(f"bitmap_eps must be in [0, 0.5), got {bitmap_eps}")
        out_f, ng, g = self.out_features, self.n_groups, self.group_size
        if hessian is None:
            alpha, mu, G = em_binary11(weight.float().reshape(out_f * ng, g), None, em_iters)
            self.alpha.copy_(alpha.reshape(out_f, ng, 2))
            self.mu.copy_(mu.reshape(out_f, ng, 2))
            bitmap = G.reshape(out_f, self.in_features)
            latent = weight.detach().clone()
        else:
            latent, bitmap = self._gptq(weight, hessian, importance, damp, em_iters, block_size, gptq_chunk)
        self.bitmap_fp.copy_(0.5 + (bitmap.float() - 0.5) * (1 - 2 * bitmap_eps))
        self.hardened.fill_(False)
        self._hard = False
        return latent

    @torch.no_grad()
    def _gptq(self, weight, hessian, importance, damp, em_iters, block_size, gptq_chunk):
        g = self.group_size
        H = hessian.detach().double()
        if importance == "uniform":
            imp = torch.ones(self.in_features, dtype=H.dtype, device=H.device)
        elif importance == "diag":
            imp = torch.diag(H).clone()
        else:  # GPTQ's saliency 1/[H^-1]_jj of the damped Hessian
            Hd = H + damp * torch.diag(H).mean() * torch.eye(self.in_features, dtype=H.dtype, device=H.device)
            imp = 1 / torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(Hd)))
        imp = imp.clamp_min(1e-8 * float(imp.max().clamp_min(1e-30))).float()  # dead columns: tiny, not zero
        latent = torch.empty(self.out_features, self.in_features, device=weight.device)
        bitmap = torch.empty(self.out_features, self.in_features, dtype=torch.long, device=weight.device)

        def quantize(w_cols: torch.Tensor, col: int, peek) -> torch.Tensor:
            gi, n = col // g, w_cols.shape[1]
            if col % g == 0:  # a group starts: fit its pairs on its current (error-compensated) values
                w_fit = w_cols if n == g else peek(g)
                alpha, mu, _ = em_binary11(w_fit.to(weight.dtype).float(), imp[col : col + g], em_iters)
                self.alpha[:, gi], self.mu[:, gi] = alpha, mu
            w_cols = w_cols.to(weight.dtype).float()  # exactly what the latent will hold
            alpha, mu = self.alpha[:, gi], self.mu[:, gi]
            G = _assign(w_cols, alpha, mu)
            latent[:, col : col + n], bitmap[:, col : col + n] = w_cols, G
            a, m = alpha.gather(1, G), mu.gather(1, G)
            return a * _sign(w_cols - m) + m

        chunk = g if gptq_chunk == "group" else 1
        block = g * max(1, block_size // g)
        gptq_sequential(weight.detach().float(), hessian, quantize, chunk=chunk, block_size=block, damp=damp)
        return latent.to(weight.dtype), bitmap

    @torch.no_grad()
    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Storage form (layout in kernels/reference.py) of the *hard* bitmap, whatever bitmap_forward is."""
        alpha, mu = self.pair_params()
        G = self.hard_bitmap().reshape(self.out_features, self.n_groups, self.group_size)
        m_sel = torch.gather(mu, 2, G.long()).reshape(self.out_features, self.in_features)
        signs = weight.float() - m_sel >= 0
        return {
            "signs": pack_bits(signs.to(torch.int32), 1),
            "bitmap": pack_bits(G.reshape(self.out_features, self.in_features).to(torch.int32), 1),
            "alpha": alpha.to(torch.float16),
            "mu": mu.to(torch.float16),
        }

    def unpack(self, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequant_binary11(packed["signs"], packed["bitmap"], packed["alpha"], packed["mu"],
                                group_size=self.group_size, in_features=self.in_features)

    @property
    def bits_per_weight(self) -> float:
        # sign + bitmap bit, plus two fp16 (alpha, mu) pairs per group
        return 2 + 4 * 16 / self.group_size
