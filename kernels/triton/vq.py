"""LC-QAT 2-bit VQ: y = x W^T with W = diag(s_v) T_out^T What T_in^T diag(s_u), What[o, d*j:d*j+d] = A z + b.

Consumes the stored layout as is (kernels/reference.py, dequant_vq): codes uint8 [N, K/4] (the 2-bit stream of z),
A [d, d], b [d], s_u [K], s_v [N], signs_in [K], signs_out [N], Hadamard blocks block_in / block_out.

The affine codebook is moved to the activation side, which is exact algebra and makes the weight decode as cheap as
int2 (no per-weight 4x4 matvec, no LUT gather):
    x_r  = block_hadamard(x * s_u, signs_in)                       (per token, blocks of block_in)
    x'[v*d + j] = sum_i x_r[v*d + i] A[i, j]                       (A applied to the activations, per d-vector)
    c    = sum_k x_r[k] * b'[k % d],   b' = b + 1.5 * A 1          (b and the code centring, a per-token constant)
    y_r  = x' (z - 1.5)^T + c                                      (z in {0..3}: centred 2-bit codes)
    y    = s_v * block_hadamard(y_r, signs_out) (+ bias)           (per token, blocks of block_out)
since What z-decoding is linear: x_r What^T = sum_v sum_j z[., v, j] x'[v, j] + sum_v sum_i x_r[v, i] b_i, and
centring z - 1.5 keeps the matmul's terms small (b' ~ 0 for the initial codebook b = -1.5 A 1).
Three launches: `_vq_input_kernel` (scale, sign, Hadamard block as a +-1 matmul, A-map, partial c per block),
`_vq_matmul_kernel` (the int2-style GEMV/GEMM of kernels/triton/common.py, + sum of partial c), `_vq_output_kernel`
(sign, Hadamard, s_v, bias). The Hadamard blocks are +-1 matrices (exact in fp16) scaled by 1/sqrt(block) after.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from qat_kernels.triton.common import (
    MAGIC,
    Config,
    accumulate,
    codes_as_float,
    finish_rows,
    k_per_split,
    launch_grid,
    new_accumulator,
    pick_config,
    store_output,
    tile_ids,
    unpack_words,
    unswap,
    words,
)

CENTER = tl.constexpr(1.5)  # middle of the 2-bit code range {0..3}
_NO_GROUPS = 1 << 30  # pick_config's group size for a format without groups (any power-of-two tile fits)


@functools.lru_cache(maxsize=16)
def _plus_minus_hadamard(block: int, device: str) -> torch.Tensor:
    """Sylvester H_block with entries +-1 (float32): hadamard_matrix(block) * sqrt(block)."""
    h = torch.ones(1, 1)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(device)


@triton.jit
def _block_transform(v, h_ptr, B: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """v [BM, B] float32 times the +-1 Hadamard block [B, B] (tensor cores from 16 up, in DOT_DTYPE)."""
    h = tl.load(h_ptr + tl.arange(0, B)[:, None] * B + tl.arange(0, B)[None, :])
    if B >= 16:
        if DOT_DTYPE == tl.float32:
            return tl.dot(v, h, input_precision="ieee")
        return tl.dot(v.to(DOT_DTYPE), h.to(DOT_DTYPE))
    return tl.sum(v[:, :, None] * h[None, :, :], axis=1)


@triton.jit
def _vq_input_kernel(x_ptr, su_ptr, sg_ptr, h_ptr, a_ptr, b_ptr, xo_ptr, c_ptr,
                     M, K, n_blocks, stride_xm, inv_sqrt_b,
                     B: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_DTYPE: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    blk = tl.program_id(1)
    offs_k = blk * B + tl.arange(0, B)
    mask_m = offs_m < M
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
    x = x.to(tl.float32) * tl.load(su_ptr + offs_k).to(tl.float32)[None, :]
    x = tl.where(tl.load(sg_ptr + offs_k)[None, :] < 0, -x, x)
    xr = _block_transform(x, h_ptr, B, DOT_DTYPE) * inv_sqrt_b
    # A-map per d-vector and the per-token constant of b and the code centring
    offs_d = tl.arange(0, D)
    A = tl.load(a_ptr + offs_d[:, None] * D + offs_d[None, :]).to(tl.float32)  # A[i, j]
    b_center = tl.load(b_ptr + offs_d).to(tl.float32) + CENTER * tl.sum(A, axis=1)
    xr3 = tl.reshape(xr, [BLOCK_M, B // D, D])
    xa = tl.sum(xr3[:, :, :, None] * A[None, None, :, :], axis=2)  # [BM, B/D, D]: x'[v, j] = sum_i x_r[v, i] A[i, j]
    c = tl.sum(tl.sum(xr3 * b_center[None, None, :], axis=2), axis=1)
    tl.store(xo_ptr + offs_m[:, None] * K + offs_k[None, :], tl.reshape(xa, [BLOCK_M, B]).to(xo_ptr.dtype.element_ty),
             mask=mask_m[:, None])
    tl.store(c_ptr + offs_m * n_blocks + blk, c, mask=mask_m)


@triton.jit
def _vq_matmul_kernel(
    x_ptr, w_ptr, c_ptr, y_ptr,
    M, N, K, n_words, n_blocks, k_split, stride_xm, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, SWAP: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    WORDS_PER_TILE: tl.constexpr = BLOCK_K // 16

    acc = new_accumulator(BLOCK_M, BLOCK_N, SWAP)
    ROWS_K: tl.constexpr = BLOCK_K if BLOCK_M == 1 else 1  # GEMV's elementwise partial sums
    acc_rows = tl.zeros([BLOCK_N, ROWS_K], dtype=tl.float32)
    k_begin = tl.program_id(1) * k_split
    k_end = tl.minimum(k_begin + k_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
        offs_w = k0 // 16 + tl.arange(0, WORDS_PER_TILE)
        packed = tl.load(w_ptr + offs_n[:, None] * n_words + offs_w[None, :],
                         mask=mask_n[:, None] & (offs_w < n_words)[None, :], other=0)
        # (2^23 + z) - 2^23 - 1.5 in two exact steps (2^23 + 1.5 is not a float32)
        w = (codes_as_float(unpack_words(packed, 2, BLOCK_N, WORDS_PER_TILE)) - MAGIC) - CENTER
        acc, acc_rows = accumulate(acc, acc_rows, x, w, USE_DOT, SWAP)
    acc = finish_rows(unswap(acc, SWAP), acc_rows)
    # + c[m] = sum of the per-block partial constants (once: the first K split)
    c = tl.zeros([BLOCK_M], dtype=tl.float32)
    for b0 in range(0, n_blocks, 32):
        offs_b = b0 + tl.arange(0, 32)
        c += tl.sum(tl.load(c_ptr + offs_m[:, None] * n_blocks + offs_b[None, :],
                            mask=mask_m[:, None] & (offs_b < n_blocks)[None, :], other=0.0), axis=1)
    if SPLIT_K > 1:
        c = tl.where(tl.program_id(1) == 0, c, 0.0)
    acc += c[:, None]
    store_output(acc, y_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, False, SPLIT_K)


@triton.jit
def _vq_output_kernel(yr_ptr, sg_ptr, sv_ptr, h_ptr, bias_ptr, y_ptr, M, N, stride_rm, stride_ym, inv_sqrt_b,
                      B: tl.constexpr, BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * B + tl.arange(0, B)
    mask_m = offs_m < M
    v = tl.load(yr_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask_m[:, None], other=0.0)
    v = tl.where(tl.load(sg_ptr + offs_n)[None, :] < 0, -v, v)
    y = _block_transform(v, h_ptr, B, tl.float32) * inv_sqrt_b
    y = y * tl.load(sv_ptr + offs_n).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])


def unsupported_reason(spec: dict) -> str | None:
    d, bi, bo = spec["vq_dim"], spec["block_in"], spec["block_out"]
    if d & (d - 1) or d > 16:
        return f"vq_dim {d} is not a power of two <= 16"
    if spec["in_features"] % 32:
        return f"in_features {spec['in_features']} is not a multiple of 32"
    if bi < d or bi % d:
        return f"Hadamard block_in {bi} is not a multiple of vq_dim {d}"
    if bi > 256 or bo > 256:
        return f"Hadamard blocks ({bi}, {bo}) larger than 256"
    return None


def linear(x: torch.Tensor, spec: dict, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """x [M, K] -> [M, N] in x's dtype. `config` overrides the matmul's heuristic config (tests, sweeps)."""
    M, K = x.shape
    N, d, bi, bo = spec["out_features"], spec["vq_dim"], spec["block_in"], spec["block_out"]
    if x.stride(-1) != 1:
        x = x.contiguous()
    dev = str(x.device)
    cfg = config or pick_config(M, N, K, _NO_GROUPS, 2, x.device.index if x.is_cuda else None)
    gemv = not cfg.use_dot
    # GEMV multiplies in float32 anyway; the tensor-core path takes the rotated activations in x's dtype
    xa = torch.empty(M, K, device=x.device, dtype=torch.float32 if gemv else x.dtype)
    n_blocks = K // bi
    cpart = torch.empty(M, n_blocks, device=x.device, dtype=torch.float32)
    pre_m = 16
    _vq_input_kernel[(triton.cdiv(M, pre_m), n_blocks)](
        x, packed["s_u"], packed["signs_in"], _plus_minus_hadamard(bi, dev), packed["A"], packed["b"], xa, cpart,
        M, K, n_blocks, x.stride(0), 1.0 / math.sqrt(bi),
        B=bi, D=d, BLOCK_M=pre_m, DOT_DTYPE=_tl_dtype(x.dtype), num_warps=4)

    # y_r stays float32 (the output transform reads it); split-K programs add into it atomically
    y_rot = (torch.zeros if cfg.split_k > 1 else torch.empty)(M, N, device=x.device, dtype=torch.float32)
    _vq_matmul_kernel[launch_grid(M, N, cfg)](
        xa, words(packed["codes"]), cpart, y_rot,
        M, N, K, K // 16, n_blocks, k_per_split(K, cfg), xa.stride(0), y_rot.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        USE_DOT=cfg.use_dot, SWAP=cfg.swap, GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _vq_output_kernel[(triton.cdiv(M, pre_m), N // bo)](
        y_rot, packed["signs_out"], packed["s_v"], _plus_minus_hadamard(bo, dev), bias if bias is not None else y, y,
        M, N, y_rot.stride(0), y.stride(0), 1.0 / math.sqrt(bo),
        B=bo, BLOCK_M=pre_m, HAS_BIAS=bias is not None, num_warps=4)
    return y


def _tl_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
