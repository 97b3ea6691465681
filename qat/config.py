"""Quantization specs: dataclasses that validate themselves and load from YAML/JSON dicts.

WeightSpec / ActSpec / QuantSpec describe *what* number format a model is quantized to; the recipe dataclasses for
distillation stages live beside the stage code (qat/distill). Every check here raises QuantConfigError with one line
that names the offending field, so the CLI can print it and exit without writing anything.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any


class QuantConfigError(ValueError):
    """A spec that cannot be realised (unknown format, bits the format can't do, group size that doesn't divide...)."""


ACT_BITS = (4, 8, 16)  # 16 = activations stay in floating point
ACT_MODES = ("uniform", "knee")


def from_dict(cls, d: Any, where: str, error: type[Exception] = QuantConfigError):
    """A `cls` dataclass from a plain mapping (YAML, JSON, a parsed command line), the one converter of the package.

    Fields typed as a dataclass (also `X | None` and `list[X]`) are built recursively, driven by the type hints, so
    nothing restates the nesting; missing keys take the dataclass defaults; an unknown key raises `error` with one
    line naming it (`where` prefixes the path, e.g. "recipe.stages.1")."""
    if d is None:
        return cls()
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise error(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise error(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**{k: _convert(hints[k], v, f"{where}.{k}", error) for k, v in d.items()})


def _convert(tp: Any, v: Any, where: str, error: type[Exception]):
    """v for a field of type `tp`: dataclasses (possibly optional or in a list) built by from_dict, the rest as is."""
    if v is None:
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, where, error)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(v, list):
            raise error(f"{where}: expected a list, got {type(v).__name__}")
        return [from_dict(args[0], x, f"{where}.{i}", error) for i, x in enumerate(v)]
    if len(args) == 1 and typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        return _convert(args[0], v, where, error)
    return v


@dataclass
class ActSpec:
    """Dynamic per-token activation quantization of every quantized linear's input.

    Attributes:
        bits: 4 or 8; 16 = off
        mode: uniform (INT4/INT8 with learnable clipping; maps to integer GEMMs) | knee (two-region research mode)
        sym: symmetric per-token grid instead of asymmetric min/max
        hadamard: rotate inputs (and the weight) by a random-sign block Hadamard first (QuaRot-style), for W4A4
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
    """What to quantize and how.

    Attributes:
        weight: the weight number format
        act: activation quantization
        skip: module-name suffixes left in floating point
    """

    weight: WeightSpec = field(default_factory=WeightSpec)
    act: ActSpec = field(default_factory=ActSpec)
    skip: list[str] = field(default_factory=lambda: ["lm_head"])

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> QuantSpec:
        return from_dict(cls, d or {}, "quant")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def describe(self) -> str:
        return self.weight.quantizer_class().describe(self.weight) + (f"A{self.act.bits}" if self.act.enabled else "")
