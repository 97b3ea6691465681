"""Quantization specs: dataclasses that validate themselves and load from YAML/JSON dicts.

WeightSpec / ActSpec / QuantSpec describe *what* number format a model is quantized to; the recipe dataclasses for
distillation stages live beside the stage code (qat/distill). Every check here raises QuantConfigError with one line
that names the offending field, so the CLI can print it and exit without writing anything.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any


class QuantConfigError(ValueError):
    """A spec that cannot be realised (unknown format, bits the format can't do, group size that doesn't divide...)."""


WEIGHT_FORMATS = ("uniform", "binary11", "vq")
ACT_BITS = (4, 8, 16)  # 16 = activations stay in floating point
ACT_MODES = ("uniform", "knee")


def _from_dict(cls, d: dict[str, Any] | None, where: str):
    if d is None:
        return cls()
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise QuantConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise QuantConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


@dataclass
class WeightSpec:
    """Weight number format.

    format      uniform (intN, group-wise scale/zero) | binary11 (W(1+1): sign + group bitmap) | vq (LC-QAT 2-bit VQ)
    bits        payload bits per weight: uniform 1..8; binary11 and vq are 2 by construction (None = the format's default)
    group_size  weights sharing quantization parameters along in_features; -1 = one group per output channel
    sym         uniform only: symmetric grid with a fixed mid-point zero (GPTQ convention)
    lwc         uniform only: learnable weight clipping (OmniQuant) instead of free learnable scale/zero (LSQ+)
    float_zero  uniform only: the dequantization zero point is a float per group, z - zero_shift, while the codes
                keep the integer z; stored as float32 zeros (32 bits per group instead of 8). Written by `qat merge`,
                which folds a QA-LoRA adapter into zero_shift exactly (docs/FINETUNE.md)
    vq_dim      vq only: vector length (the codebook is the affine image of {0..3}^vq_dim)
    hadamard_block  vq only: largest block of the random-sign block-Hadamard incoherence transform
    """

    format: str = "uniform"
    bits: int | None = None
    group_size: int = 128
    sym: bool = False
    lwc: bool = False
    float_zero: bool = False
    vq_dim: int = 4
    hadamard_block: int = 128

    def __post_init__(self):
        if self.format not in WEIGHT_FORMATS:
            raise QuantConfigError(f"unknown weight format {self.format!r}; supported: {', '.join(WEIGHT_FORMATS)}")
        if self.bits is None:
            self.bits = {"uniform": 4, "binary11": 2, "vq": 2}[self.format]
        self.bits = int(self.bits)
        if self.format == "uniform" and not 1 <= self.bits <= 8:
            raise QuantConfigError(f"uniform weights need bits in 1..8, got {self.bits}")
        if self.format == "uniform" and self.sym and self.bits < 2:
            raise QuantConfigError("symmetric uniform quantization needs bits >= 2 (use --format binary11 for 1-bit)")
        if self.float_zero and self.format != "uniform":
            raise QuantConfigError(f"float_zero applies to the uniform format only, got format {self.format!r}")
        if self.format == "binary11" and self.bits != 2:
            raise QuantConfigError(
                f"format binary11 stores 1 sign bit + 1 bitmap bit per weight (bits=2), got bits={self.bits}")
        if self.format == "vq" and self.bits != 2:
            raise QuantConfigError(f"format vq codes {{0..3}} per coordinate (bits=2), got bits={self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise QuantConfigError(f"group_size must be a positive integer or -1 (per channel), got {self.group_size}")
        if self.vq_dim < 1:
            raise QuantConfigError(f"vq_dim must be >= 1, got {self.vq_dim}")

    def group_for(self, in_features: int) -> int:
        """The group size for a layer of this width (checks that it divides the width)."""
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise QuantConfigError(
                f"group_size {g} does not divide in_features {in_features}; pick a divisor (e.g. 64 or 32) or -1")
        return g


@dataclass
class ActSpec:
    """Dynamic per-token activation quantization of every quantized linear's input.

    bits       4 or 8; 16 = off
    mode       uniform (INT4/INT8 with learnable clipping; maps to integer GEMMs) | knee (two-region research mode)
    sym        symmetric per-token grid instead of asymmetric min/max
    hadamard   rotate inputs (and the weight) by a random-sign block Hadamard first (QuaRot-style), for W4A4
    """

    bits: int = 16
    mode: str = "uniform"
    sym: bool = False
    hadamard: bool = False

    def __post_init__(self):
        self.bits = int(self.bits)
        if self.bits not in ACT_BITS:
            raise QuantConfigError(f"act bits must be one of {ACT_BITS} (16 = no activation quantization), got {self.bits}")
        if self.mode not in ACT_MODES:
            raise QuantConfigError(f"unknown activation mode {self.mode!r}; supported: {', '.join(ACT_MODES)}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16


@dataclass
class QuantSpec:
    """What to quantize and how. `skip` holds module-name suffixes left in floating point (lm_head by default)."""

    weight: WeightSpec = field(default_factory=WeightSpec)
    act: ActSpec = field(default_factory=ActSpec)
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantSpec:
        d = dict(d or {})
        unknown = sorted(set(d) - {"weight", "act", "skip"})
        if unknown:
            raise QuantConfigError(f"quant spec: unknown key(s) {unknown}; known: ['act', 'skip', 'weight']")
        return cls(
            weight=_from_dict(WeightSpec, d.get("weight"), "weight"),
            act=_from_dict(ActSpec, d.get("act"), "act"),
            skip=list(d.get("skip", ["lm_head"])),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def describe(self) -> str:
        w = self.weight
        g = "ch" if w.group_size == -1 else f"g{w.group_size}"
        uniform = f"W{w.bits}{g}{'-sym' if w.sym else ''}{'-fz' if w.float_zero else ''}"
        name = {"uniform": uniform, "binary11": f"W(1+1){g}", "vq": f"VQ{w.bits}"}[w.format]
        return name + (f"A{self.act.bits}" if self.act.enabled else "")
