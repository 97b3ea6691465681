"""W(1+1) binary dequant-matmul: y = x W_hat^T, W_hat[o, i] = alpha[o, g, G] * (+1 | -1) + mu[o, g, G].

Consumes the stored layout as is (kernels/reference.py): signs and bitmap are two 1-bit streams uint8 [N, K/8]
(read as int32 words, 32 weights per word), alpha and mu fp16 [N, K/g, 2]. Per weight: two selects pick the pair
the bitmap bit names, a third applies the sign -- the same float32 values the reference computes (alpha * (+-1) is
exact, so one rounding in "+ mu" as there). Same loop and configs as the uniform kernel (kernels/triton/common.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from qat_kernels.triton.common import (
    Config,
    accumulate,
    finish_rows,
    k_per_split,
    launch_grid,
    new_accumulator,
    output_buffer,
    pick_config,
    store_output,
    tile_ids,
    unpack_words,
    unswap,
    words,
)


@triton.jit
def _binary11_matmul_kernel(
    x_ptr, sign_ptr, map_ptr, a_ptr, mu_ptr, b_ptr, y_ptr,
    M, N, K, n_words, n_groups, k_split, stride_xm, stride_ym,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, SWAP: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    SUB: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K  # noqa: FURB136 (constexpr arithmetic)
    GPT: tl.constexpr = BLOCK_K // SUB
    WORDS_PER_TILE: tl.constexpr = BLOCK_K // 32

    acc = new_accumulator(BLOCK_M, BLOCK_N, SWAP)
    ROWS_K: tl.constexpr = BLOCK_K if BLOCK_M == 1 else 1  # GEMV's elementwise partial sums
    acc_rows = tl.zeros([BLOCK_N, ROWS_K], dtype=tl.float32)
    k_begin = tl.program_id(1) * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        offs_w = k0 // 32 + tl.arange(0, WORDS_PER_TILE)
        widx = offs_n[:, None] * n_words + offs_w[None, :]
        wmask = mask_n[:, None] & (offs_w < n_words)[None, :]
        positive = unpack_words(tl.load(sign_ptr + widx, mask=wmask, other=0), 1, BLOCK_N, WORDS_PER_TILE) != 0
        pair1 = unpack_words(tl.load(map_ptr + widx, mask=wmask, other=0), 1, BLOCK_N, WORDS_PER_TILE) != 0
        offs_g = k0 // GROUP + tl.arange(0, GPT)
        gmask = mask_n[:, None] & (offs_g < n_groups)[None, :]
        pidx = (offs_n[:, None] * n_groups + offs_g[None, :]) * 2  # pair 0 of (row, group); pair 1 follows it
        a0 = tl.load(a_ptr + pidx, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        a1 = tl.load(a_ptr + pidx + 1, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        m0 = tl.load(mu_ptr + pidx, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        m1 = tl.load(mu_ptr + pidx + 1, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
        pair1 = tl.reshape(pair1, [BLOCK_N, GPT, SUB])
        alpha = tl.where(pair1, a1, a0)
        w = tl.where(tl.reshape(positive, [BLOCK_N, GPT, SUB]), alpha, -alpha) + tl.where(pair1, m1, m0)
        acc, acc_rows = accumulate(acc, acc_rows, x, tl.reshape(w, [BLOCK_N, BLOCK_K]), USE_DOT, SWAP)
    acc = finish_rows(unswap(acc, SWAP), acc_rows)
    store_output(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, SPLIT_K)


def unsupported_reason(spec: dict) -> str | None:
    if spec["in_features"] % 32:
        return f"in_features {spec['in_features']} is not a multiple of 32"
    if spec["group_size"] % 32:
        return f"group_size {spec['group_size']} is not a multiple of 32"
    return None


def linear(x: torch.Tensor, spec: dict, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype. `config` overrides the heuristic (tests, benchmark sweeps)."""
    M, K = x.shape
    N, group = spec["out_features"], spec["group_size"]
    if x.stride(-1) != 1:
        x = x.contiguous()
    # 2 bits per weight: the GEMV heuristic of 2-bit uniform weights fits
    cfg = config or pick_config(M, N, K, group, 2, x.device.index if x.is_cuda else None)
    y = output_buffer(M, N, x, cfg)
    _binary11_matmul_kernel[launch_grid(M, N, cfg)](
        x, words(packed["signs"]), words(packed["bitmap"]), packed["alpha"].contiguous(), packed["mu"].contiguous(),
        bias if bias is not None else x, y,
        M, N, K, K // 32, K // group, k_per_split(K, cfg), x.stride(0), y.stride(0),
        GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        USE_DOT=cfg.use_dot, SWAP=cfg.swap, GROUP_M=cfg.group_m, HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x.dtype)
