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


# the weight formats' fields come from their quantizer classes (qat/quantizers): WeightSpec is built there
from qat.quantizers.registry import WeightSpec  # noqa: E402

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
        return self.weight.quantizer_class().describe(self.weight) + (f"A{self.act.bits}" if self.act.enabled else "")
