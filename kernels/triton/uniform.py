"""Uniform intN group-wise dequant-matmul: y = x W_hat^T, W_hat[o, i] = (q[o, i] - zeros[o, g]) * scales[o, g].

Consumes the stored layout as is (kernels/reference.py): qweight uint8 [N, K*bits/8] read as int32 words, scales
[N, K/g] (fp16), zeros uint8 [N, K/g]. Bits 1, 2, 4, 8 unpack whole codes from each word; other widths (3, 5, 6, 7)
gather the one or two words holding each code (correct, slower). One kernel body serves the batch-1..4 GEMV
(broadcast-multiply, fp32), batch 5..64 (tl.dot, split-K) and large-batch GEMM (tl.dot, grouped tiles) configs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from qat_kernels.triton.common import (
    MAGIC,
    Config,
    accumulate,
    codes_as_float,
    finish_rows,
    gather_codes,
    k_per_split,
    launch_grid,
    output_buffer,
    pick_config,
    store_output,
    tile_ids,
    unpack_words,
    words,
)


@triton.jit
def _uniform_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, n_words, n_groups, k_split, stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # A K tile covers GPT whole groups (group <= BLOCK_K) or lies inside one group (group a multiple of BLOCK_K).
    SUB: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K  # noqa: FURB136 (constexpr arithmetic)
    GPT: tl.constexpr = BLOCK_K // SUB
    WORDS_PER_TILE: tl.constexpr = BLOCK_K * BITS // 32

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    ROWS_K: tl.constexpr = BLOCK_K if BLOCK_M == 1 else 1  # GEMV's elementwise partial sums
    acc_rows = tl.zeros([BLOCK_N, ROWS_K], dtype=tl.float32)
    k_begin = tl.program_id(1) * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        if (BITS & (BITS - 1)) == 0:
            offs_w = k0 * BITS // 32 + tl.arange(0, WORDS_PER_TILE)
            packed = tl.load(w_ptr + offs_n[:, None] * n_words + offs_w[None, :],
                             mask=mask_n[:, None] & (offs_w < n_words)[None, :], other=0)
            codes = unpack_words(packed, BITS, BLOCK_N, WORDS_PER_TILE)
        else:
            codes = gather_codes(w_ptr, offs_n, mask_n, n_words, offs_k, BITS)
        offs_g = k0 // GROUP + tl.arange(0, GPT)
        gmask = mask_n[:, None] & (offs_g < n_groups)[None, :]
        gidx = offs_n[:, None] * n_groups + offs_g[None, :]
        scale = tl.load(s_ptr + gidx, mask=gmask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + gidx, mask=gmask, other=0).to(tl.float32) + MAGIC
        w = tl.reshape(codes_as_float(codes), [BLOCK_N, GPT, SUB])
        w = (w - zero[:, :, None]) * scale[:, :, None]  # (q - z) exactly, times s: the reference's float32 W_hat
        acc, acc_rows = accumulate(acc, acc_rows, x, tl.reshape(w, [BLOCK_N, BLOCK_K]), USE_DOT)
    acc = finish_rows(acc, acc_rows)
    store_output(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, SPLIT_K)


def unsupported_reason(spec: dict) -> str | None:
    if spec["in_features"] % 32:
        return f"in_features {spec['in_features']} is not a multiple of 32"
    if pick_config(1, spec["out_features"], spec["in_features"], spec["group_size"], spec["bits"], None) is None:
        return f"group_size {spec['group_size']} has no power-of-two divisor >= 32"
    return None


def linear(x: torch.Tensor, spec: dict, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype. `config` overrides the heuristic (tests, benchmark sweeps)."""
    M, K = x.shape
    N, bits, group = spec["out_features"], spec["bits"], spec["group_size"]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or pick_config(M, N, K, group, bits, x.device.index if x.is_cuda else None)
    y = output_buffer(M, N, x, cfg)
    _uniform_matmul_kernel[launch_grid(M, N, cfg)](
        x, words(packed["qweight"]), packed["scales"], packed["zeros"], bias if bias is not None else x, y,
        M, N, K, K * bits // 32, K // group, k_per_split(K, cfg), x.stride(0), y.stride(0),
        BITS=bits, GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        USE_DOT=cfg.use_dot, GROUP_M=cfg.group_m, HAS_BIAS=bias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x.dtype)
