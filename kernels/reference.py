"""Plain-torch dequantization and matmul for every packed format: the ground truth for the Triton kernels and the
CPU runtime path. Functions take the packed tensors exactly as they are stored in an exported checkpoint.

Layouts (codes are bit-streams from qat_kernels.packing; g = group size; ng = in // g):
  uniform   qweight uint8 [out, ceil(in*bits/8)], scales fp16 [out, ng], zeros uint8 [out, ng]
            w[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g]
  binary11  signs uint8 [out, ceil(in/8)] (bit 1 = +1), bitmap uint8 [out, ceil(in/8)] (bit k picks pair k),
            alpha fp16 [out, ng, 2], mu fp16 [out, ng, 2]
            w[o, i] = alpha[o, i // g, G] * (+1 | -1) + mu[o, i // g, G],  G = bitmap bit
  vq        see dequant_vq
Dequantization computes in float32, so it is bit-exact with the fake-quant training forward.
"""
from __future__ import annotations

import torch

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
