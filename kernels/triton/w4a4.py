"""W4A4: integer GEMM for uniform weights with dynamic per-token activation quantization.

Two launches:
1. `_quantize_tokens_kernel` (one program per token): per-token scale/zero and codes exactly as
   kernels/act_quant.quantize_per_token computes them (float32, round-half-even, correctly rounded divisions), stored
   as int8 (q - z) [M, K] and the float32 scale [M]. Asymmetric codes minus their zero fit int8 up to 7 bits,
   symmetric codes up to 8 bits.
2. `_w4a4_matmul_kernel`: for each weight group, an int8 x int8 -> int32 tl.dot of (q_x - z_x) and (q_w - z_w)
   (weights unpacked from the stored bit stream in registers), rescaled by the group's weight scale into a float32
   accumulator; the token scale and the bias are applied once at the end:
       y[m, n] = s_x[m] * sum_g s_w[n, g] * sum_{k in g} (q_x - z_x)[m, k] (q_w - z_w)[n, k]  (+ bias[n])
   which is F.linear(x_hat, W_hat) with x_hat, W_hat the reference's dequantized values, up to float32 summation order
   (the integer part is exact). A K tile never straddles a group (group_size % BLOCK_K == 0); per-channel weights
   (group = K) therefore accumulate the whole row in int32 and rescale once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from qat_kernels.triton.common import (
    Config,
    gather_codes,
    launch_grid,
    sm_count,
    store_output,
    tile_ids,
    unpack_words,
    words,
)

MIN_SCALE = tl.constexpr(1e-10)  # = qat_kernels.act_quant.MIN_SCALE (checked by tests/test_kernels.py)
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds v half-to-even for |v| < 2**22, like torch.round


@triton.jit
def _round_half_even(v):
    # valid for |v| < 2**22; larger values are clamped to the code range right after, so their rounding is moot
    return (v + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def _quantize_tokens_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, clip_hi, clip_lo,
                            BITS: tl.constexpr, SYM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    # the range always contains 0 (act_quant's clamp_min(0) / clamp_max(0)): start the reductions at 0
    hi = tl.zeros([BLOCK], dtype=tl.float32)
    lo = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        if SYM:
            hi = tl.maximum(hi, tl.abs(x))
        else:
            hi = tl.maximum(hi, x)
            lo = tl.minimum(lo, x)
    if SYM:
        QMAX: tl.constexpr = 2 ** (BITS - 1) - 1
        scale = tl.maximum(tl.math.div_rn(clip_hi * tl.max(hi, axis=0), QMAX * 1.0), MIN_SCALE)
        zero = 0.0
        q_lo = -QMAX * 1.0
    else:
        QMAX: tl.constexpr = 2**BITS - 1
        max_c = clip_hi * tl.max(hi, axis=0)
        min_c = clip_lo * tl.min(lo, axis=0)
        scale = tl.maximum(tl.math.div_rn(max_c - min_c, QMAX * 1.0), MIN_SCALE)
        zero = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(-min_c, scale)), 0.0), QMAX * 1.0)
        q_lo = 0.0
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(x, scale)) + zero, q_lo), QMAX * 1.0)
        tl.store(q_ptr + row * K + offs, (q - zero).to(tl.int8), mask=offs < K)
    tl.store(s_ptr + row, scale)


@triton.jit
def _w4a4_matmul_kernel(
    xq_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, n_words, n_groups, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    WORDS_PER_TILE: tl.constexpr = BLOCK_K * BITS // 32

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, K, GROUP):  # GROUP divides K and BLOCK_K divides GROUP: no ragged tiles
        gidx = offs_n * n_groups + g0 // GROUP
        zero = tl.load(z_ptr + gidx, mask=mask_n, other=0).to(tl.int32)
        acc_group = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(g0, g0 + GROUP, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xq = tl.load(xq_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None], other=0)
            if (BITS & (BITS - 1)) == 0:
                offs_w = k0 * BITS // 32 + tl.arange(0, WORDS_PER_TILE)
                packed = tl.load(w_ptr + offs_n[:, None] * n_words + offs_w[None, :], mask=mask_n[:, None], other=0)
                codes = unpack_words(packed, BITS, BLOCK_N, WORDS_PER_TILE)
            else:
                codes = gather_codes(w_ptr, offs_n, mask_n, n_words, offs_k, BITS)
            wq = (codes - zero[:, None]).to(tl.int8)
            acc_group = tl.dot(xq, tl.trans(wq), acc_group, out_dtype=tl.int32)
        scale = tl.load(s_ptr + gidx, mask=mask_n, other=0.0).to(tl.float32)
        acc += acc_group.to(tl.float32) * scale[None, :]
    acc = acc * tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    store_output(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS, 1)


def unsupported_reason(spec: dict) -> str | None:
    """None when the integer path is exact for this layer (codes minus zeros fit int8), else why not."""
    if spec["fmt"] != "uniform":
        return f"format {spec['fmt']!r} has no integer weights"
    if spec["act_bits"] >= 16:
        return "activations are not quantized"
    if spec["bits"] > 7:
        return f"{spec['bits']}-bit weights minus their zero point do not fit int8"
    if spec["act_bits"] > (8 if spec["act_sym"] else 7):
        return f"{spec['act_bits']}-bit asymmetric activation codes minus their zero point do not fit int8"
    if spec["in_features"] % 32:
        return f"in_features {spec['in_features']} is not a multiple of 32"
    if spec["group_size"] % 32:
        return f"group_size {spec['group_size']} is not a multiple of 32"
    return None


def pick_config(M: int, N: int, group_size: int, device_index: int | None, bits: int = 4) -> Config:
    """H100-minded, untuned: 128 x 128 tiles with 128-deep int8 K steps for prefill, thinner M tiles for decode."""
    if M <= 16:
        cfg = {"block_m": 16, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3}
    elif M <= 64:
        cfg = {"block_m": 64, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3}
    else:
        cfg = {"block_m": 128, "block_n": 128, "block_k": 128, "num_warps": 8, "num_stages": 3}
    if M <= 64 and triton.cdiv(N, cfg["block_n"]) < sm_count(device_index):
        cfg["block_n"] = 32
    bk = cfg["block_k"]
    while group_size % bk:  # largest power-of-two divisor of the group, >= 32 (unsupported_reason checked it)
        bk //= 2
    cfg["block_k"] = bk
    if bits & (bits - 1) and cfg["num_stages"] > 2:  # gathered codes: 3 stages of 128 x 128 tiles exceed 227 KB smem
        cfg["num_stages"] = 2
    return Config(use_dot=True, **cfg)


def quantize_tokens(x: torch.Tensor, bits: int, clip_hi: float, clip_lo: float, sym: bool):
    """x [M, K] -> (int8 (q - zero) [M, K], float32 scale [M]): kernels/act_quant.quantize_per_token's codes."""
    M, K = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, device=x.device, dtype=torch.int8)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    block = min(2048, triton.next_power_of_2(K))
    _quantize_tokens_kernel[(M,)](x, q, scale, K, x.stride(0), clip_hi, clip_lo, BITS=bits, SYM=sym, BLOCK=block,
                                  num_warps=4 if block <= 1024 else 8)
    return q, scale


def linear(x: torch.Tensor, spec: dict, packed: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """x [M, K] (float) -> [M, N] in x's dtype, activations quantized per token as spec's act_* entries say."""
    M, K = x.shape
    N, bits, group = spec["out_features"], spec["bits"], spec["group_size"]
    xq, xs = quantize_tokens(x, spec["act_bits"], spec["act_clip_hi"], spec["act_clip_lo"], spec["act_sym"])
    cfg = config or pick_config(M, N, group, x.device.index if x.is_cuda else None, bits)
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _w4a4_matmul_kernel[launch_grid(M, N, cfg)](
        xq, xs, words(packed["qweight"]), packed["scales"], packed["zeros"], bias if bias is not None else xs, y,
        M, N, K, K * bits // 32, K // group, y.stride(0),
        BITS=bits, GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        HAS_BIAS=bias is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y
