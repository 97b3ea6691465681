"""LC-QAT 2-bit vector quantization: a learned affine map over discrete vectors (docs/METHODS.md §6).

Representation (d = spec.vq_dim consecutive input columns form one vector):

    W_eff = diag(s_V) · T_outᵀ · Ŵ · T_inᵀ · diag(s_U),    Ŵ[o, d·j : d·j+d] = A·z + b,   z ∈ {0..3}^d

T = diag(signs) · blockdiag(H_block) is the random-sign block-Hadamard transform of qat_kernels.hadamard, so
F.linear(x, W_eff) = s_V ⊙ H_out(H_in(x ⊙ s_U) · Ŵᵀ). The codebook is the affine image of the integer box, so in
z-coordinates quantization is an elementwise round+clamp (no codebook lookup in training).

Latent (§6.2): QuantLinear's `weight` holds U with z = clamp(round(c·U + q/2), 0, q), c = sqrt(m+n)/2, q = 3, so the
latent has the scale of an ordinary weight and the QAT model starts bit-identical to the PTQ model.
Backward (§6.3): DGE, dẑ/dv = min(|2r − 1|^(1/k − 1) / k, g_max) with v = c·U + q/2, r = v − clamp(floor(v), 0, q).
A, b, s_U, s_V are rounded to fp16 in the forward (gradient straight through the cast) because that is how they are
stored, so pack() -> unpack() is bit-identical to the training forward.

PTQ init (§6.4, UniSVQ-style): Sinkhorn row/column balancing gives s_U, s_V; the balanced weight and the Hessian are
rotated; a scale search picks the codebook step; BlockLDLQ (qat.ptq.gptq, chunk = d) assigns codes by nearest
codeword over the 4^d affine codewords; optionally A, b are refitted by Hessian-weighted least squares given the
codes and the codes re-assigned (kept only while the proxy loss drops).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from typing import TYPE_CHECKING

from qat.config import QuantConfigError
from qat.ptq.gptq import gptq_sequential
from qat.quantizers.base import SpecOption, WeightQuantizer, check_finite, register_weight_format
from qat.speed import LEVERS
from qat_kernels.hadamard import (block_hadamard, block_hadamard_inverse, hadamard_block_size, hadamard_matrix,
                                  random_signs)
from qat_kernels.packing import pack_bits
from qat_kernels.reference import dequant_vq, vq_affine_decode, vq_untransform

if TYPE_CHECKING:
    from qat.config import WeightSpec

DGE_K = 5.0
DGE_GMAX = 3.0
_CODE_VAR = 1.25  # Var(Uniform{0,1,2,3}): A = Q / sqrt(1.25) maps z to unit-variance coordinates
_MAX_EXHAUSTIVE = 4096  # codebooks up to this size are searched exhaustively (4^6); larger d round in z-space
_MAX_TABLE = 65536  # the fused forward gathers from a table of every codeword up to this size (4^8)
_MIN_SCALE = 1e-4


# ---- DGE rounding ---------------------------------------------------------------------------------------------------
def dge_derivative(v: torch.Tensor, qmax: int = 3, k: float = DGE_K, g_max: float = DGE_GMAX) -> torch.Tensor:
    """d round(v) / dv under DGE: derivative of floor(v) + ½(1 + sign(2r−1)|2r−1|^(1/k)), capped at g_max."""
    r = v - torch.clamp(torch.floor(v), 0, qmax)
    return torch.clamp((2 * r - 1).abs().pow(1.0 / k - 1.0) / k, max=g_max)


class _DGERound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, qmax: int, k: float, g_max: float):
        ctx.save_for_backward(v)
        ctx.qmax, ctx.k, ctx.g_max = qmax, k, g_max
        return torch.clamp(torch.round(v), 0, qmax)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad * dge_derivative(v, ctx.qmax, ctx.k, ctx.g_max), None, None, None


def dge_round(v: torch.Tensor, qmax: int = 3, k: float = DGE_K, g_max: float = DGE_GMAX) -> torch.Tensor:
    """clamp(round(v), 0, qmax) with the DGE backward."""
    return _DGERound.apply(v, qmax, k, g_max)


class _CodebookDecode(torch.autograd.Function):
    """latent U -> rotated-space weight Ŵ = vq_affine_decode(dge_round(c·U + q/2), A, b) in a few passes, with the
    gradients autograd gives that composition.

    Value: each d-vector of codes z is one of (q+1)^d codewords; the table C = vq_affine_decode(every z, A, b) holds
    them, computed by the very ops (and order) vq_affine_decode applies per weight, so gathering row
    idx(z) = Σ_j z_j (q+1)^j of C is the elementwise decode bit for bit. Gradients (N vectors, g the upstream [N, d]):
        A: gᵀ z   b: Σ_n g   U: (g A) ⊙ DGE'(v) · c
    The DGE derivative is computed in the forward (only when U needs a gradient) and saved with z.
    """

    @staticmethod
    def forward(ctx, weight, A, b, c: float, qmax: int, k: float, g_max: float):
        d = A.shape[0]
        out_f, n = weight.shape
        v = weight.float() * c + qmax / 2  # the reference's two ops, in its order
        z = torch.clamp(torch.round(v), 0, qmax).contiguous()
        zv = z.view(-1, d)
        radix = (qmax + 1) ** torch.arange(d, dtype=torch.float32, device=z.device)
        grid = torch.stack(torch.meshgrid(*[torch.arange(qmax + 1, dtype=torch.float32, device=z.device)] * d,
                                          indexing="ij")[::-1], -1).reshape(1, -1)  # row i = the digits of i
        C = vq_affine_decode(grid, A, b).reshape(-1, d)
        w_rot = C.index_select(0, (zv @ radix).long()).view(out_f, n)
        dge = dge_derivative(v, qmax, k, g_max) if ctx.needs_input_grad[0] else None
        ctx.c = c
        ctx.save_for_backward(A, z, dge)
        return w_rot

    @staticmethod
    def backward(ctx, g):
        A, z, dge = ctx.saved_tensors
        d = A.shape[0]
        gv, zv = g.reshape(-1, d), z.view(-1, d)
        gw = gA = gb = None
        if ctx.needs_input_grad[0]:
            gw = (gv @ A).view(z.shape).mul_(dge).mul_(ctx.c)
        if ctx.needs_input_grad[1]:
            gA = gv.t() @ zv
        if ctx.needs_input_grad[2]:
            gb = gv.sum(0)
        return gw, gA, gb, None, None, None, None


# ---- transforms (all in float, T = diag(signs) blockdiag(H)) ---------------------------------------------------------
def _rotate_weight(w, signs_in, signs_out, block_in, block_out):
    """Ŵ = T_out · w · T_in (the inverse of vq_untransform without scales)."""
    x = block_hadamard(w, signs_in, block_in)  # w T_in
    return block_hadamard_inverse(x.t(), signs_out, block_out).t()  # T_out (w T_in)


def _rotate_hessian(h, signs_in, block_in):
    """T_inᵀ · H · T_in: the Hessian of the rotated-space weight (x T_in is what Ŵ multiplies)."""
    x = block_hadamard(h, signs_in, block_in)
    return block_hadamard(x.t().contiguous(), signs_in, block_in).t()


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def _proxy_loss(err: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """tr(E H Eᵀ) (output error of the layer up to a constant), or ||E||² without a Hessian."""
    if hessian is None:
        return float(err.square().sum())
    return float(((err @ hessian) * err).sum())


@register_weight_format
class VQQuantizer(WeightQuantizer):
    """LC-QAT 2-bit VQ."""

    format = "vq"
    default_bits = 2
    uses_groups = False  # one affine codebook per layer
    options = (
        SpecOption("vq_dim", int, 4, "vector length (the codebook is the affine image of {0..3}^vq_dim)"),
        SpecOption("hadamard_block", int, 128, "largest block of the random-sign block-Hadamard incoherence "
                   "transform"),
    )

    @classmethod
    def validate_spec(cls, spec: WeightSpec) -> None:
        if spec.bits != 2:
            raise QuantConfigError(f"format vq codes {{0..3}} per coordinate (bits=2), got bits={spec.bits}")
        if spec.vq_dim < 1:
            raise QuantConfigError(f"vq_dim must be >= 1, got {spec.vq_dim}")

    @classmethod
    def describe(cls, spec: WeightSpec) -> str:
        return f"VQ{spec.bits}"

    @classmethod
    def kernel_meta(cls, spec: WeightSpec, out_features: int, in_features: int) -> dict:
        return {**super().kernel_meta(spec, out_features, in_features), "bits": spec.bits, "vq_dim": spec.vq_dim,
                "hadamard_block": spec.hadamard_block}

    @classmethod
    def meta_from_packed(cls, packed: dict) -> dict:
        block_in, block_out = (int(v) for v in packed["hadamard_blocks"].tolist())  # ints: no read-back per call
        return {"block_in": block_in, "block_out": block_out}

    @classmethod
    def check_packed(cls, spec: WeightSpec, packed: dict, expected: dict) -> list[tuple[str, str]]:
        problems = [(k, "holds values other than -1/+1") for k in ("signs_in", "signs_out")
                    if not ((packed[k] == 1) | (packed[k] == -1)).all()]
        if not torch.equal(packed["hadamard_blocks"].cpu(), expected["hadamard_blocks"].cpu()):
            problems.append(("hadamard_blocks", "differ from the block sizes the spec builds"))
        return problems

    def __init__(self, spec: WeightSpec, out_features: int, in_features: int):
        super().__init__(spec, out_features, in_features)
        d = self.vq_dim = spec.vq_dim
        self.qmax = 2**spec.bits - 1
        self.latent_scale = math.sqrt(out_features + in_features) / 2  # c of docs/METHODS.md §6.2
        self.block_in = hadamard_block_size(in_features, spec.hadamard_block)
        self.block_out = hadamard_block_size(out_features, spec.hadamard_block)
        A0 = self._base_rotation(d) / math.sqrt(_CODE_VAR)
        self.A = nn.Parameter(A0)
        self.b = nn.Parameter(-A0.sum(1) * self.qmax / 2)
        self.s_u = nn.Parameter(torch.ones(in_features))
        self.s_v = nn.Parameter(torch.ones(out_features))
        self.register_buffer("signs_in", random_signs(in_features, 0))
        self.register_buffer("signs_out", random_signs(out_features, 1))

    @classmethod
    def check_shape(cls, spec: WeightSpec, out_features: int, in_features: int) -> None:
        if in_features % spec.vq_dim:
            raise QuantConfigError(
                f"vq_dim {spec.vq_dim} does not divide in_features {in_features}; pick a divisor (e.g. 4 or 2)")
        if spec.hadamard_block < 1:
            raise QuantConfigError(f"hadamard_block must be >= 1, got {spec.hadamard_block}")

    @staticmethod
    def _base_rotation(d: int) -> torch.Tensor:
        """The fixed orthogonal Q of A = Q / σ: a Sylvester Hadamard matrix when d is a power of two, else I."""
        return hadamard_matrix(d) if d & (d - 1) == 0 else torch.eye(d)

    def cache_state(self) -> tuple:
        return (self.block_in, self.block_out)

    # ---- forward --------------------------------------------------------------------------------------------------
    def fp16_params(self):
        """(A, b, s_U, s_V) as used in the forward and stored: fp16-rounded, float32, gradient straight through."""
        return _fp16(self.A), _fp16(self.b), _fp16(self.s_u), _fp16(self.s_v)

    def latent_to_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """ẑ = clamp(round(c·U + q/2), 0, q) (float, DGE backward)."""
        return dge_round(weight.float() * self.latent_scale + self.qmax / 2, self.qmax)

    def codes_to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self.qmax / 2) / self.latent_scale

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        A, b, s_u, s_v = self.fp16_params()
        return vq_untransform(vq_affine_decode(z, A, b), s_u, s_v, self.signs_in, self.signs_out,
                              block_in=self.block_in, block_out=self.block_out)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not LEVERS.fused_quant or (self.qmax + 1) ** self.vq_dim > _MAX_TABLE:
            return self._decode(self.latent_to_codes(weight))
        A, b, s_u, s_v = self.fp16_params()
        w_rot = _CodebookDecode.apply(weight, A, b, self.latent_scale, self.qmax, DGE_K, DGE_GMAX)
        return vq_untransform(w_rot, s_u, s_v, self.signs_in, self.signs_out, block_in=self.block_in,
                              block_out=self.block_out)

    # ---- storage --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def pack(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.latent_to_codes(weight)
        A, b, s_u, s_v = self.fp16_params()
        return {
            "codes": pack_bits(z.to(torch.int32), 2),
            "A": A.to(torch.float16),
            "b": b.to(torch.float16),
            "s_u": s_u.to(torch.float16),
            "s_v": s_v.to(torch.float16),
            "signs_in": self.signs_in.to(torch.int8).clone(),
            "signs_out": self.signs_out.to(torch.int8).clone(),
            "hadamard_blocks": torch.tensor([self.block_in, self.block_out], dtype=torch.int32),
        }

    def unpack(self, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        block_in, block_out = (int(v) for v in packed["hadamard_blocks"])
        return dequant_vq(packed["codes"], packed["A"], packed["b"], packed["s_u"], packed["s_v"],
                          packed["signs_in"], packed["signs_out"], block_in=block_in, block_out=block_out,
                          in_features=self.in_features)

    @property
    def bits_per_weight(self) -> float:
        d, m, n = self.vq_dim, self.out_features, self.in_features
        # A, b, s_U, s_V in fp16; the sign vectors as stored (int8: the kernels read them so); two int32 block sizes
        meta = 16 * (d * d + d) + 16 * (m + n) + 8 * (m + n) + 2 * 32
        return self.spec.bits + meta / (m * n)

    # ---- PTQ init -------------------------------------------------------------------------------------------------
    def _z_grid(self) -> torch.Tensor:
        """Every z in {0..q}^d [4^d, d]; row i is the vector stored as byte i (z_j = (i >> 2j) & 3)."""
        i = torch.arange((self.qmax + 1) ** self.vq_dim)
        return torch.stack([(i >> (2 * j)) & self.qmax for j in range(self.vq_dim)], 1).float()

    def _codebook(self, A: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        """The 4^d codewords for (A, b), bit-identical to the forward's values (same vq_affine_decode), plus what the
        exhaustive search needs; None-grid marks codebooks too large to search (d > 6)."""
        if (self.qmax + 1) ** self.vq_dim > _MAX_EXHAUSTIVE:
            return {"A": A, "b": b, "grid": None}
        grid = self._z_grid().to(A.device)
        C = vq_affine_decode(grid.reshape(1, -1), A, b).reshape(-1, self.vq_dim)
        return {"A": A, "b": b, "grid": grid, "C": C, "C2t": 2 * C.t(), "neg_norm": -C.square().sum(1)}

    def _nearest(self, w: torch.Tensor, cb: dict[str, torch.Tensor], exhaustive: bool = True):
        """Nearest codeword of every d-vector of w [m, k·d] -> (codes z, codewords), both [m, k·d]. Exhaustive
        argmax 2 wᵀc − ||c||²; otherwise (or for huge codebooks) round A⁻¹(w − b) in z-space, which is the nearest
        codeword exactly when A ∝ orthogonal."""
        m, k = w.shape
        d = self.vq_dim
        if not exhaustive or cb["grid"] is None:
            zc = torch.linalg.solve(cb["A"], (w.reshape(m, -1, d) - cb["b"]).reshape(-1, d).t()).t()
            z = torch.clamp(torch.round(zc), 0, self.qmax).reshape(m, k)
            return z, vq_affine_decode(z, cb["A"], cb["b"])
        wv = w.reshape(-1, d)
        idx = torch.cat([torch.argmax(torch.addmm(cb["neg_norm"], part, cb["C2t"]), dim=1) for part in wv.split(16384)])
        return cb["grid"][idx].reshape(m, k), cb["C"][idx].reshape(m, k)

    def _assign(self, target, cb, hess_rot, damp, block_size):
        """Codes for the rotated target: BlockLDLQ with a Hessian, plain nearest codeword without."""
        if hess_rot is None:
            return self._nearest(target, cb)[0]
        z_all = torch.empty_like(target)

        def quantize_chunk(w_cols, col, _peek):
            z, q = self._nearest(w_cols, cb)
            z_all[:, col : col + self.vq_dim] = z
            return q

        gptq_sequential(target, hess_rot, quantize_chunk, chunk=self.vq_dim, block_size=block_size, damp=damp)
        return z_all

    def _refit_affine(self, target, z, hess_rot, scalar: bool):
        """(A, b) minimising tr(E H Eᵀ) (||E||² without H), E = target − decode(z), for fixed codes.
        With z_aug = [z_vec, 1] and θ[k, l] (θ[:, :d] = A, θ[:, d] = b): What[r, j, k] = Σ_l θ[k, l] z_aug[r, j, l]."""
        m, n = target.shape
        d = self.vq_dim
        nv = n // d
        za = torch.cat([z.reshape(m, nv, d), torch.ones(m, nv, 1, device=z.device)], 2)  # [m, nv, d+1]
        if scalar:  # What = a·z + b0: two unknowns
            basis = [z, torch.ones_like(z)]
            hb = [bm if hess_rot is None else bm @ hess_rot for bm in basis]
            G = torch.tensor([[float((hb[p] * basis[q]).sum()) for q in range(2)] for p in range(2)],
                             dtype=torch.float64)
            r = torch.tensor([float((hb[p] * target).sum()) for p in range(2)], dtype=torch.float64)
            a, b0 = torch.linalg.solve(G + 1e-9 * G.diagonal().mean() * torch.eye(2, dtype=G.dtype), r).tolist()
            return a * torch.eye(d, device=z.device), torch.full((d,), b0, device=z.device)
        zf = za.reshape(m, nv * (d + 1)).double()
        if hess_rot is None:
            G1 = torch.einsum("rjl,rjc->lc", za.double(), za.double())  # same system for every output coord k
            R = torch.einsum("rjk,rjl->lk", target.reshape(m, nv, d).double(), za.double())
            theta = torch.linalg.solve(G1, R).t()  # [d, d+1]
        else:
            gram = (zf.t() @ zf).reshape(nv, d + 1, nv, d + 1)
            hs = hess_rot.double().reshape(nv, d, nv, d)
            M = torch.einsum("akbc,albf->klcf", hs, gram).reshape(d * (d + 1), d * (d + 1))
            th = (target.double() @ hess_rot.double()).reshape(m, nv, d)
            R = torch.einsum("rjk,rjl->kl", th, za.double()).reshape(-1)
            M = M + 1e-9 * M.diagonal().mean() * torch.eye(M.shape[0], dtype=M.dtype)
            theta = torch.linalg.solve(M, R).reshape(d, d + 1)
        return theta[:, :d].float(), theta[:, d].float()

    @staticmethod
    def _balance(w: torch.Tensor, iters: int = 8):
        """Per-channel scales with w = diag(s_v) · w_bal · diag(s_u): Sinkhorn-style alternating geometric row/column
        RMS updates, so w_bal has (nearly) unit row and column RMS; then s_u, s_v rescaled to equal norms
        (docs/METHODS.md §6.4). (Measured on SmolLM2 layers: better than QuIP's Hessian-based column rescale and than no balancing.)"""
        s_u = torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
        s_v = torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
        for _ in range(iters):
            s_v = s_v * (w / s_v[:, None] / s_u).square().mean(1).sqrt().clamp_min(1e-12)
            s_u = s_u * (w / s_v[:, None] / s_u).square().mean(0).sqrt().clamp_min(1e-12)
        r = (s_u.norm() * s_v.norm()).sqrt()
        return s_u * r / s_u.norm(), s_v * r / s_v.norm()

    @torch.no_grad()
    def init_from(self, weight, *, hessian=None, seed: int = 0, affine: str = "full", damp: float = 0.01,
                  block_size: int = 128, refine_iters: int = 0,
                  scale_grid: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2), **_):
        """PTQ init; returns the latent U (QuantLinear's new `weight`) with forward(U) = the PTQ weight exactly.

        hessian       H = 2 XᵀX [in, in] from calibration: BlockLDLQ (Hessian-weighted refit); None: nearest codeword
        seed          sign vectors = random_signs(in, 2·seed), random_signs(out, 2·seed + 1)
        affine        "full" (learned 4×4 A and b, paper) | "scalar" (A = a·I, b = b0·1, frozen: released code)
        refine_iters  alternations of (Hessian-weighted least-squares A, b | BlockLDLQ re-assignment, kept if
                      better than the old codes), stopped when the proxy loss stops dropping. Off by default: on SmolLM2 layers it lowers the calibration proxy by 0.1-1.3%
                      per pass but not the held-out output error, and each pass costs one more BlockLDLQ sweep.
        scale_grid    codebook step candidates, as multiples of the Gaussian-optimal step for the target's RMS
        """
        if affine not in ("full", "scalar"):
            raise QuantConfigError(f"vq affine must be 'full' or 'scalar', got {affine!r}")
        check_finite("vq.init_from", weight)
        m, n = self.out_features, self.in_features
        w = weight.detach().float()
        self.to(w.device)
        self.signs_in.copy_(random_signs(n, 2 * seed))
        self.signs_out.copy_(random_signs(m, 2 * seed + 1))
        s_u, s_v = self._balance(w.double())
        s_u, s_v = _fp16(s_u.float().clamp_min(_MIN_SCALE)), _fp16(s_v.float().clamp_min(_MIN_SCALE))
        target = _rotate_weight(w / s_v[:, None] / s_u, self.signs_in, self.signs_out, self.block_in, self.block_out)
        hess_rot = None
        if hessian is not None:
            if hessian.shape != (n, n):
                raise ValueError(f"vq.init_from: hessian shape {tuple(hessian.shape)} != ({n}, {n})")
            h = hessian.detach().to(w.device, torch.float32) * s_u[:, None] * s_u
            hess_rot = _rotate_hessian(h, self.signs_in, self.block_in)
            hess_rot = (hess_rot + hess_rot.t()) / 2
        Q = (torch.eye(self.vq_dim) if affine == "scalar" else self._base_rotation(self.vq_dim)).to(w.device)
        rms = float(target.square().mean().sqrt().clamp_min(1e-8))

        def affine_for(step: float):
            A = _fp16(Q * step)
            return A, _fp16(-A.sum(1) * self.qmax / 2)

        # codebook step: the Gaussian-optimal uniform step (≈ 0.996 σ for 4 levels) times the best grid factor,
        # judged on z-space rounding (cheap, and the nearest codeword while A ∝ orthogonal) under the rotated Hessian
        best = None
        for f in scale_grid:
            A, b = affine_for(0.996 * rms * f)
            z = self._nearest(target, {"A": A, "b": b, "grid": None}, exhaustive=False)[0]
            loss = _proxy_loss(target - vq_affine_decode(z, A, b), hess_rot)
            if best is None or loss < best[0]:
                best = (loss, A, b)
        _, A, b = best
        z = self._assign(target, self._codebook(A, b), hess_rot, damp, block_size)
        loss = _proxy_loss(target - vq_affine_decode(z, A, b), hess_rot)
        self.init_trace = [loss]
        for _ in range(refine_iters):
            # the refit is optimal for the current codes; the greedy re-assignment need not be, so keep the better
            A2, b2 = self._refit_affine(target, z, hess_rot, scalar=affine == "scalar")
            A2, b2 = _fp16(A2), _fp16(b2)
            z2 = self._assign(target, self._codebook(A2, b2), hess_rot, damp, block_size)
            loss_same = _proxy_loss(target - vq_affine_decode(z, A2, b2), hess_rot)
            loss_new = _proxy_loss(target - vq_affine_decode(z2, A2, b2), hess_rot)
            loss2, z2 = (loss_new, z2) if loss_new < loss_same else (loss_same, z)
            self.init_trace.append(loss2)
            if loss2 >= loss * (1 - 1e-6):
                break
            A, b, z, loss = A2, b2, z2, loss2
        self.A.copy_(A)
        self.b.copy_(b)
        self.s_u.copy_(s_u)
        self.s_v.copy_(s_v)
        self.A.requires_grad_(affine == "full")
        self.b.requires_grad_(affine == "full")
        return self.codes_to_latent(z).to(weight.dtype)
