"""Bit-stream packing: the one storage layout every packed format uses.

A row of n integer codes of `bits` bits each (0 <= code < 2**bits) is stored little-endian as a stream of
ceil(n * bits / 8) uint8 bytes: code j occupies stream bits [j*bits, (j+1)*bits), and stream bit k lives in
byte k // 8 at bit position k % 8. For bits in {1, 2, 4, 8} each byte therefore holds 8 // bits whole codes
(code j in byte j * bits // 8, shifted by (j * bits) % 8), which is what the Triton kernels rely on.
"""
from __future__ import annotations

import torch


def packed_width(n: int, bits: int) -> int:
    """Bytes needed to store n codes of `bits` bits."""
    return (n * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., n] into uint8 [..., packed_width(n, bits)] (see module docstring)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in 1..8, got {bits}")
    codes = codes.to(torch.int32)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"pack_bits: codes out of range for {bits} bits")
    *lead, n = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int32)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(*lead, n * bits)  # [..., n*bits] of 0/1
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32))
    return (stream.reshape(*lead, -1, 8) * weights).sum(-1).to(torch.uint8).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [..., packed_width(n, bits)] -> int32 codes [..., n]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits: bits must be in 1..8, got {bits}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_bits: expected uint8 storage, got {packed.dtype}")
    if packed.shape[-1] != packed_width(n, bits):
        raise ValueError(f"unpack_bits: last dim {packed.shape[-1]} does not hold {n} codes of {bits} bits")
    p = packed.to(torch.int32)
    *lead, _ = p.shape
    if bits == 8:
        return p
    stream = ((p.unsqueeze(-1) >> torch.arange(8, device=p.device, dtype=torch.int32)) & 1).reshape(*lead, -1)
    stream = stream[..., : n * bits].reshape(*lead, n, bits)
    return (stream << torch.arange(bits, device=p.device, dtype=torch.int32)).sum(-1)
