"""Random-sign block-Hadamard transforms (QuIP#/QuaRot incoherence processing), plain torch.

A width n is split into blocks of size b = the largest power of two that divides n and is <= max_block; each block
is multiplied by the orthonormal Sylvester Hadamard matrix H_b / sqrt(b) after an elementwise sign flip. The whole
transform T = diag(signs) · blockdiag(H_b) / sqrt(b) is orthogonal, so x W^T = (x T)(W T)^T.
"""
from __future__ import annotations

import functools

import torch


def hadamard_block_size(n: int, max_block: int = 128) -> int:
    b = 1
    while b * 2 <= max_block and n % (b * 2) == 0:
        b *= 2
    return b


@functools.lru_cache(maxsize=32)
def _sylvester(b: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < b:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / b**0.5


def hadamard_matrix(b: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of size b (a power of two)."""
    if b & (b - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {b}")
    return _sylvester(b).to(dtype=dtype, device=device)


def random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8)


def block_hadamard(x: torch.Tensor, signs: torch.Tensor | None, block: int) -> torch.Tensor:
    """x [..., n] -> (x ⊙ signs) @ blockdiag(H_block), along the last dim."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"block_hadamard: block {block} does not divide width {n}")
    if signs is not None:
        x = x * signs.to(x.dtype)
    H = hadamard_matrix(block, dtype=x.dtype, device=x.device)
    return (x.reshape(*x.shape[:-1], n // block, block) @ H).reshape(x.shape)


def block_hadamard_inverse(y: torch.Tensor, signs: torch.Tensor | None, block: int) -> torch.Tensor:
    """Inverse of block_hadamard (H is symmetric and orthonormal, so H^-1 = H)."""
    n = y.shape[-1]
    H = hadamard_matrix(block, dtype=y.dtype, device=y.device)
    x = (y.reshape(*y.shape[:-1], n // block, block) @ H).reshape(y.shape)
    return x * signs.to(x.dtype) if signs is not None else x
