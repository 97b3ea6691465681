"""Pieces every dequant-matmul kernel shares: launch configs (host side) and small @triton.jit helpers.

Every weight kernel computes y[M, N] = x[M, K] @ W_hat[N, K]^T with the same loop: a program owns a
BLOCK_M x BLOCK_N output tile and a K range (split-K), loads BLOCK_K columns of packed weight rows, dequantizes them
in registers to float32, and accumulates in float32, either with tl.dot (batch > 1: tensor cores; the dequantized tile
is cast to x's dtype first, as the reference casts W_hat) or with a broadcast multiply + row sum (batch 1: a GEMV
without split-K bookkeeping; the fp32 product is more accurate than the reference's).

Packed bit streams are read as little-endian int32 words (a zero-copy view of the uint8 bytes when the row length is a
multiple of 4 bytes): code j of a row is bits [j*bits, (j+1)*bits) of the stream, i.e. of word j*bits // 32 at shift
(j*bits) % 32, so a word holds 32 // bits whole codes for bits in {1, 2, 4, 8}. Wide word loads keep the memory-bound
GEMV near bandwidth; unpacking is a shift and a mask per code.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

MAGIC = tl.constexpr(8388608.0)  # 2**23: (code | 0x4B000000) read as float32 is 2**23 + code exactly (code < 2**23)


# ---- host side --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One launch configuration. use_dot=False is the GEMV path (block_m 1, or up to 4 when forced); swap needs use_dot."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    use_dot: bool = True
    swap: bool = False  # tl.dot(W_tile, x_tile^T): weight rows fill the MMA's 64/128-row side when the batch is small
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def as_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=8)
def sm_count(device_index: int | None) -> int:
    if device_index is None or not torch.cuda.is_available():
        return 132  # the interpreter has no device: assume an H100 so configs look like the real ones
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def block_k_for_group(block_k: int, group_size: int) -> int:
    """Largest block_k' <= block_k with group_size % block_k' == 0 or (block_k' % group_size == 0, power-of-two group),
    so a K tile never straddles a group boundary unevenly. Returns 0 when only tiny tiles would fit."""
    if group_size & (group_size - 1) == 0 and block_k % group_size == 0:
        return block_k
    bk = block_k
    while bk >= 16 and group_size % bk:
        bk //= 2
    return bk if bk >= 16 else 0


def pick_config(M: int, N: int, K: int, group_size: int, bits: int, device_index: int | None,
                min_block_k: int = 32) -> Config | None:
    """A launch config for an [M, K] x [N, K]^T product (None if the group size leaves no usable tile).

    Heuristics (written for H100, not tuned on hardware: see docs/KERNELS.md):
    - M == 1: GEMV, 8 weight rows x 512 columns per step, 4 warps; split-K only when the row blocks would not fill
      the SMs twice (short-wide layers, e.g. 1024 x 4096). No atomics, zero-fill or cast launches otherwise.
    - 1 < M <= 64: swapped tl.dot (128 weight rows x 16/32/64 tokens: the rows fill Hopper's 64-row wgmma side),
      split-K to reach ~2 programs per SM.
    - M > 64: a GEMM tile of 128 x 128 (64 rows when M <= 128) with grouped ordering for L2 reuse.
    """
    sms = sm_count(device_index)
    if M == 1:
        cfg = {"block_m": 1, "block_n": 8, "block_k": 512 if bits <= 4 else 256, "use_dot": False, "num_warps": 4,
               "num_stages": 2}
    elif M <= 64:
        bm = max(16, triton.next_power_of_2(M))
        cfg = {"block_m": bm, "block_n": 128, "block_k": 128, "use_dot": True, "swap": True, "num_warps": 4,
               "num_stages": 3}
    else:
        bm = 64 if M <= 128 else 128
        cfg = {"block_m": bm, "block_n": 128, "block_k": 64, "use_dot": True, "num_warps": 8 if bm == 128 else 4,
                   "num_stages": 3}
    bk = block_k_for_group(cfg["block_k"], group_size)
    while bk > 32 and bk >= 2 * triton.next_power_of_2(K):  # don't load mostly-masked tiles on narrow layers
        bk //= 2
    if bk < min_block_k:
        return None
    cfg["block_k"] = bk
    tiles = triton.cdiv(M, cfg["block_m"]) * triton.cdiv(N, cfg["block_n"])
    k_tiles = triton.cdiv(K, bk)
    split = 1
    if M <= 64:
        while tiles * split < 2 * sms and split * 2 <= min(16, k_tiles // 2):
            split *= 2
    return Config(split_k=split, **cfg)


def k_per_split(K: int, cfg: Config) -> int:
    """K columns per split: a whole number of K tiles (so tiles never straddle a group boundary)."""
    return triton.cdiv(triton.cdiv(K, cfg.block_k), cfg.split_k) * cfg.block_k


def words(packed: torch.Tensor) -> torch.Tensor:
    """A uint8 bit-stream tensor [rows, nbytes] (nbytes % 4 == 0) as int32 words: a view, copied only if the
    storage is not 4-byte aligned or not contiguous."""
    if not packed.is_contiguous() or packed.data_ptr() % 4:
        packed = packed.contiguous().clone()
    return packed.view(torch.int32)


def launch_grid(M: int, N: int, cfg: Config) -> tuple[int, int]:
    return triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), cfg.split_k


def output_buffer(M: int, N: int, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Split-K programs add float32 partial sums atomically into a zeroed buffer; otherwise write x's dtype."""
    if cfg.split_k > 1:
        return torch.zeros(M, N, device=x.device, dtype=torch.float32)
    return torch.empty(M, N, device=x.device, dtype=x.dtype)


# ---- device side ------------------------------------------------------------------------------------------------
@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, in grouped order: GROUP_M row tiles sweep N together, sharing weight tiles
    through L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    return pid_m, pid_n


@triton.jit
def unpack_words(w, BITS: tl.constexpr, ROWS: tl.constexpr, NWORDS: tl.constexpr):
    """int32 words [ROWS, NWORDS] -> codes int32 [ROWS, NWORDS * 32 // BITS] in stream order (BITS in 1, 2, 4, 8)."""
    PER_WORD: tl.constexpr = 32 // BITS
    shifts = tl.arange(0, PER_WORD) * BITS
    codes = (w[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # & drops the arithmetic shift's sign bits
    return tl.reshape(codes, [ROWS, NWORDS * PER_WORD])


@triton.jit
def gather_codes(w_ptr, rows, row_mask, n_words, offs_k, BITS: tl.constexpr):
    """Codes of any width (e.g. 3 bits, which straddle words): per code, the word(s) holding its bits.
    rows [R] row indices, offs_k [C] code indices -> int32 [R, C]."""
    bit = offs_k * BITS
    wi = bit >> 5
    sh = (bit & 31)[None, :]
    base = w_ptr + rows[:, None] * n_words + wi[None, :]
    lo = tl.load(base, mask=row_mask[:, None] & (wi < n_words)[None, :], other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(base + 1, mask=row_mask[:, None] & (wi + 1 < n_words)[None, :], other=0).to(tl.uint32, bitcast=True)
    # (hi << 1) << (31 - sh) == hi << (32 - sh) without the undefined shift by 32 when sh == 0
    codes = ((lo >> sh) | ((hi << 1) << (31 - sh))) & ((1 << BITS) - 1)
    return codes.to(tl.int32, bitcast=True)


@triton.jit
def codes_as_float(codes):
    """int32 codes (< 2**23) -> float32 (2**23 + code), exactly, with an OR and a bit cast: cheaper than an
    int-to-float conversion, which runs at 1/8 of the FMA rate. Subtract MAGIC (folded into the zero point)."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def accumulate(acc, acc_rows, x, w, USE_DOT: tl.constexpr, SWAP: tl.constexpr):
    """acc[BM, BN] += x[BM, BK] @ w[BN, BK]^T, w the dequantized float32 tile (SWAP: acc[BN, BM] += w @ x^T).

    A one-row GEMV (BM == 1) instead adds the products elementwise into acc_rows [BN, BK] and reduces once after the
    K loop (finish_rows): a cross-thread reduction per tile would cost more than the tile's arithmetic."""
    if USE_DOT:
        acc = dot(acc, x, w.to(x.dtype), SWAP)
    elif x.shape[0] == 1:
        acc_rows += w * x.to(tl.float32)
    else:
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    return acc, acc_rows


@triton.jit
def dot(acc, x, w, SWAP: tl.constexpr):
    """acc += x @ w^T ([BM, BN]) or, swapped, w @ x^T ([BN, BM]); float32 operands multiply exactly (ieee)."""
    # (one return per function: the compiler types every return statement, taken or not)
    if SWAP:
        if x.dtype == tl.float32:
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
    else:
        if x.dtype == tl.float32:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def new_accumulator(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP: tl.constexpr):
    ROWS: tl.constexpr = BLOCK_N if SWAP else BLOCK_M
    COLS: tl.constexpr = BLOCK_M if SWAP else BLOCK_N
    return tl.zeros([ROWS, COLS], dtype=tl.float32)


@triton.jit
def unswap(acc, SWAP: tl.constexpr):
    """The [BM, BN] view of an accumulator."""
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    return out


@triton.jit
def finish_rows(acc, acc_rows):
    """Fold a one-row GEMV's elementwise partial products into acc (no-op for the other paths)."""
    if acc.shape[0] == 1:
        acc += tl.sum(acc_rows, axis=1)[None, :]
    return acc


@triton.jit
def store_output(acc, y_ptr, b_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    """Bias (added once, by the first K split) and the store: direct in y's dtype, or an fp32 atomic add."""
    mask_n = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(tl.program_id(1) == 0, bias, 0.0)
        acc += bias[None, :]
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
