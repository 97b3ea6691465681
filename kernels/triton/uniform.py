"""Uniform intN group-wise dequant-matmul: y = x W_hat^T, W_hat[o, i] = (q[o, i] - zeros[o, g]) * scales[o, g].

Consumes the stored layout as is (kernels/reference.py): qweight uint8 [N, K*bits/8] read as int32 words, scales
[N, K/g] (fp16), zeros uint8 [N, K/g]. Bits 1, 2, 4, 8 unpack whole codes from each word; other widths (3, 5, 6, 7)
gather the one or two words holding each code (correct, slower). Two kernels:
- `_uniform_gemv_kernel` (batch 1): dequantize W_hat = (q - z) * s per element in float32, multiply-add in float32.
- `_uniform_mma_kernel` (tensor cores): per group, tl.dot of the integer-valued (q - z) -- exact in fp16/bf16 --
  with x, then one float32 rescale of the [rows x tokens] partial by the group's scale. No per-element scale math,
  and fp16/bf16 products are exact (the reference rounds W_hat to x's dtype first, so this is the more accurate one).
  Batch <= 64 runs it swapped (weights as the MMA's 64/128-row operand), larger batches as a plain GEMM tile.
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
    dot,
    finish_rows,
    gather_codes,
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
def _uniform_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, n_words, n_groups, k_split, stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
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
        acc, acc_rows = accumulate(acc, acc_rows, x, tl.reshape(w, [BLOCK_N, BLOCK_K]), False, False)
    acc = finish_rows(acc, acc_rows)
    store_output(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, SPLIT_K)


@triton.jit
def _uniform_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, n_words, n_groups, k_split, stride_xm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, SEGMENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    SWAP: tl.constexpr, GROUP_M: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """SEGMENT divides GROUP and is a multiple of BLOCK_K, k_split a multiple of SEGMENT: every segment of K lies in
    one group (one rescale per segment) and no tile is ragged (GROUP divides K)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    WORDS_PER_TILE: tl.constexpr = BLOCK_K * BITS // 32

    acc = new_accumulator(BLOCK_M, BLOCK_N, SWAP)
    k_begin = tl.program_id(1) * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    for s0 in range(k_begin, k_end, SEGMENT):
        gidx = offs_n * n_groups + s0 // GROUP
        zero = tl.load(z_ptr + gidx, mask=mask_n, other=0).to(tl.float32) + MAGIC
        acc_seg = new_accumulator(BLOCK_M, BLOCK_N, SWAP)
        for k0 in range(s0, s0 + SEGMENT, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            if (BITS & (BITS - 1)) == 0:
                offs_w = k0 * BITS // 32 + tl.arange(0, WORDS_PER_TILE)
                packed = tl.load(w_ptr + offs_n[:, None] * n_words + offs_w[None, :], mask=mask_n[:, None], other=0)
                codes = unpack_words(packed, BITS, BLOCK_N, WORDS_PER_TILE)
            else:
                codes = gather_codes(w_ptr, offs_n, mask_n, n_words, offs_k, BITS)
            q = (codes_as_float(codes) - zero[:, None]).to(x.dtype)  # q - z: an integer, |q - z| < 256, exact
            acc_seg = dot(acc_seg, x, q, SWAP)
        scale = tl.load(s_ptr + gidx, mask=mask_n, other=0.0).to(tl.float32)
        if SWAP:
            acc += acc_seg * scale[:, None]
        else:
            acc += acc_seg * scale[None, :]
    store_output(unswap(acc, SWAP), y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, SPLIT_K)


def segment(group: int) -> int:
    """K columns rescaled at once by the MMA kernel: the largest power of two <= 1024 that divides the group."""
    seg = 1
    while seg < 1024 and group % (seg * 2) == 0:
        seg *= 2
    return seg


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
    N, bits, group = spec["out_features"], spec["bits"], spec["group_size"]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or pick_config(M, N, K, group, bits, x.device.index if x.is_cuda else None)
    y = output_buffer(M, N, x, cfg)
    args = (x, words(packed["qweight"]), packed["scales"], packed["zeros"], bias if bias is not None else x, y,
            M, N, K, K * bits // 32, K // group)
    if cfg.use_dot:
        seg = segment(group)
        block_k = min(cfg.block_k, seg)
        k_split = triton.cdiv(triton.cdiv(K, seg), cfg.split_k) * seg
        _uniform_mma_kernel[launch_grid(M, N, cfg)](
            *args, k_split, x.stride(0), y.stride(0),
            BITS=bits, GROUP=group, SEGMENT=seg, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
            SPLIT_K=cfg.split_k, SWAP=cfg.swap, GROUP_M=cfg.group_m, HAS_BIAS=bias is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        _uniform_gemv_kernel[launch_grid(M, N, cfg)](
            *args, k_per_split(K, cfg), x.stride(0), y.stride(0),
            BITS=bits, GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            SPLIT_K=cfg.split_k, GROUP_M=cfg.group_m, HAS_BIAS=bias is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.to(x.dtype)
