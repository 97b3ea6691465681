"""Plain-torch dequantization and matmul for every packed format: the ground truth for the Triton kernels and the
CPU runtime path. Functions take the packed tensors exactly as they are stored in an exported checkpoint.

Layouts (codes are bit-streams from qat_kernels.packing; g = group size; ng = in // g):
  uniform   qweight uint8 [out, ceil(in*bits/8)], scales fp16 [out, ng], zeros uint8 [out, ng]
            w[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g]
  binary11  signs uint8 [out, ceil(in/8)] (bit 1 = +1), bitmap uint8 [out, ceil(in/8)] (bit k picks pair k),
            alpha fp16 [out, ng, 2], mu fp16 [out, ng, 2]
            w[o, i] = alpha[o, i // g, G] * (+1 | -1) + mu[o, i // g, G],  G = bitmap bit
  vq        codes uint8 [out, in*2/8] (2-bit stream: one byte per 4-vector = z0 | z1<<2 | z2<<4 | z3<<6),
            A fp16 [d, d], b fp16 [d], s_u fp16 [in], s_v fp16 [out], signs_in int8 [in], signs_out int8 [out]
            W = diag(s_v) T_out^T What T_in^T diag(s_u), What[o, d*j:d*j+d] = A z + b; see dequant_vq
Dequantization computes in float32, so it is bit-exact with the fake-quant training forward.
"""
from __future__ import annotations

import torch

from qat_kernels.hadamard import block_hadamard, block_hadamard_inverse
from qat_kernels.packing import unpack_bits


def _expand_groups(t: torch.Tensor, g: int) -> torch.Tensor:
    """[out, ng, ...] -> [out, ng*g, ...]: one row of group parameters per weight."""
    return t.repeat_interleave(g, dim=1)


def dequant_uniform(qweight, scales, zeros, *, bits: int, group_size: int, in_features: int) -> torch.Tensor:
    q = unpack_bits(qweight, bits, in_features).float()
    out = q.shape[0]
    ng = in_features // group_size
    qg = q.view(out, ng, group_size)
    w = (qg - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.view(out, in_features)


def dequant_binary11(signs, bitmap, alpha, mu, *, group_size: int, in_features: int) -> torch.Tensor:
    s = unpack_bits(signs, 1, in_features).float() * 2 - 1  # {0,1} -> {-1,+1}
    G = unpack_bits(bitmap, 1, in_features).long()  # which (alpha, mu) pair
    a = _expand_groups(alpha.float(), group_size)  # [out, in, 2]
    m = _expand_groups(mu.float(), group_size)
    a_sel = torch.gather(a, 2, G.unsqueeze(-1)).squeeze(-1)
    m_sel = torch.gather(m, 2, G.unsqueeze(-1)).squeeze(-1)
    return a_sel * s + m_sel


def linear_dense(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x w^T (+ bias) in x's dtype: the reference matmul every fused kernel is checked against."""
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def vq_affine_decode(z: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LC-QAT codeword map. z [out, in] holds integer-valued codes 0..3 (float); each run of d = A.shape[0]
    consecutive entries along a row is one vector z_vec, decoded to A @ z_vec + b. Evaluated elementwise in the
    fixed order ((z_0 A[:, 0] + z_1 A[:, 1]) + ... + z_{d-1} A[:, d-1]) + b, which is the bit-exact contract shared
    by the training forward, the 256-entry codebook and this reference (differentiable in z, A and b)."""
    d = A.shape[0]
    out, n = z.shape
    zv = z.reshape(out, n // d, d)
    acc = zv[..., 0:1] * A[:, 0]
    for j in range(1, d):
        acc = acc + zv[..., j : j + 1] * A[:, j]
    return (acc + b).reshape(out, n)


def vq_untransform(w_rot: torch.Tensor, s_u: torch.Tensor, s_v: torch.Tensor, signs_in: torch.Tensor,
                   signs_out: torch.Tensor, *, block_in: int, block_out: int) -> torch.Tensor:
    """Effective dense weight W = diag(s_v) T_out^T What T_in^T diag(s_u) [out, in] from the rotated-space weight
    What, where T = diag(signs) blockdiag(H_block) is the transform of qat_kernels.hadamard.block_hadamard.
    Then F.linear(x, W) == s_v * block_hadamard(block_hadamard(x * s_u, signs_in) @ What^T, signs_out), i.e.
    y = s_V (.) H_out(H_in(x (.) s_U) What^T). Differentiable."""
    x = block_hadamard_inverse(w_rot, signs_in, block_in)  # What T_in^T
    x = block_hadamard(x.t(), signs_out, block_out).t()  # T_out^T (What T_in^T)
    return (x * s_u) * s_v.unsqueeze(1)


def dequant_vq(codes, A, b, s_u, s_v, signs_in, signs_out, *, block_in: int, block_out: int,
               in_features: int) -> torch.Tensor:
    """LC-QAT 2-bit VQ -> effective dense weight [out, in] (float32).

    codes      uint8 [out, in/4]: the 2-bit stream of qat_kernels.packing; for d = 4 one byte per weight vector,
               byte j of row o = z[o,4j] | z[o,4j+1] << 2 | z[o,4j+2] << 4 | z[o,4j+3] << 6, z in {0..3}
    A, b       fp16 [d, d] and [d]: per-layer affine codebook, rotated weight What[o, d*j + k] = (A z_vec + b)[k]
               (the 4^d codewords are vq_affine_decode of every z_vec; a 256-entry fp16/fp32 LUT for d = 4)
    s_u, s_v   fp16 [in] and [out]: per-channel scales on the input and output side
    signs_in   int8 [in] (+-1), signs_out int8 [out] (+-1); block_in / block_out: Hadamard block sizes
    Returns W = diag(s_v) T_out^T What T_in^T diag(s_u) with T = diag(signs) blockdiag(H_block) (orthonormal
    Sylvester blocks), so y = x W^T = s_v (.) block_hadamard(block_hadamard(x (.) s_u, signs_in) What^T, signs_out).
    A fused kernel should skip W and run exactly that: scale, Hadamard, GEMM against decoded What, Hadamard, scale.
    """
    z = unpack_bits(codes, 2, in_features).float()
    w_rot = vq_affine_decode(z, A.float(), b.float())
    return vq_untransform(w_rot, s_u.float(), s_v.float(), signs_in, signs_out, block_in=block_in,
                          block_out=block_out)
