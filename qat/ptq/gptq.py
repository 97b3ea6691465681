"""GPTQ-style sequential quantization with second-order error feedback (Frantar et al., 2022).

The column loop is format-agnostic: a format supplies `quantize_chunk(w_cols, col, peek) -> q_cols` that quantizes `d`
consecutive (permuted) columns at once (d = 1 for scalar formats, the vector length for VQ, a whole bitmap group for
W(1+1)), and the loop propagates the chunk's error to the not-yet-quantized columns through the upper Cholesky factor
of H^-1 (the LDLQ form of the update, exact for d = 1 and the block-LDL generalisation for d > 1).
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def prepare_hessian(hessian: torch.Tensor, weight: torch.Tensor, damp: float = 0.01):
    """Dead-column handling + damping + upper Cholesky of H^-1. Returns (weight_copy, U) in float64-safe float32."""
    W = weight.detach().clone().float()
    H = hessian.detach().clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    mean_diag = torch.mean(torch.diag(H))
    H += damp * mean_diag * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(6):  # grow the damping if H is numerically indefinite (tiny calibration sets)
        try:
            L = torch.linalg.cholesky(H)
            break
        except torch.linalg.LinAlgError:
            H += (10.0**attempt) * damp * mean_diag * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    else:  # pragma: no cover - only on pathological input
        raise ValueError("GPTQ: Hessian is not positive definite even after extra damping")
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    return W, U.float()


def gptq_sequential(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_chunk: Callable[[torch.Tensor, int, Callable[[int], torch.Tensor]], torch.Tensor],
    *,
    chunk: int = 1,
    block_size: int = 128,
    damp: float = 0.01,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize `weight` [out, in] column-chunk by column-chunk with error feedback.

    quantize_chunk(w_cols, col, peek) gets the current (error-compensated) columns col..col+chunk of the *permuted*
    weight and returns their quantized values; peek(m) returns the current values of columns col..col+m (for
    formats that fit group parameters when a group starts); `perm` (act-order) permutes columns, the result is un-permuted.
    Returns the quantized weight, same shape and order as `weight`.
    """
    n = weight.shape[1]
    if n % chunk or block_size % chunk:
        raise ValueError(f"GPTQ: chunk {chunk} must divide in_features {n} and block size {block_size}")
    if perm is not None:
        weight = weight[:, perm]
        hessian = hessian[perm][:, perm]
    W, U = prepare_hessian(hessian, weight, damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(0, i2 - i1, chunk):
            k = j + chunk
            w = W1[:, j:k]
            def peek(m: int, j=j, W1=W1, i2=i2) -> torch.Tensor:
                inside = W1[:, j : j + m]
                return inside if inside.shape[1] >= m else torch.cat([inside, W[:, i2 : i2 + m - inside.shape[1]]], 1)

            q = quantize_chunk(w, i1 + j, peek)
            Q[:, i1 + j : i1 + k] = q
            # err @ inv(U_jj): for chunk == 1 this is GPTQ's (w - q) / [H^-1]_jj (a plain division: the hot path)
            if chunk == 1:
                err = (w - q) / U1[j, j]
            else:
                err = torch.linalg.solve_triangular(U1[j:k, j:k], (w - q), upper=True, left=False)
            W1[:, k:] -= err @ U1[j:k, k:]
            Err1[:, j:k] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q
