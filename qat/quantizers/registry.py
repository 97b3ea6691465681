"""The weight formats and the WeightSpec dataclass built from them.

Importing this module imports every module of qat/quantizers, so each format's @register_weight_format has run; the
WeightSpec fields are the common ones below followed by each format's `options` (in module-name order). qat.config
re-exports WeightSpec: import it from there.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Any

from qat.config import QuantConfigError
from qat.quantizers.base import WEIGHT_FORMATS, SpecOption, WeightQuantizer

for _m in pkgutil.iter_modules([os.path.dirname(__file__)]):
    if _m.name != "registry":
        importlib.import_module(f"qat.quantizers.{_m.name}")


def weight_quantizer_class(fmt: str) -> type[WeightQuantizer]:
    if fmt not in WEIGHT_FORMATS:
        raise QuantConfigError(f"unknown weight format {fmt!r}; supported: {', '.join(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[fmt]


def _common_options() -> tuple[SpecOption, ...]:
    return (
        SpecOption("format", str, "uniform", "weight number format: " + " | ".join(
            f"{name} ({cls.__doc__.strip().splitlines()[0].rstrip('.')})" for name, cls in WEIGHT_FORMATS.items())),
        SpecOption("bits", int | None, None, "payload bits per weight (None = the format's default: "
                   + ", ".join(f"{n} {c.default_bits}" for n, c in WEIGHT_FORMATS.items()) + ")"),
        SpecOption("group_size", int, 128, "weights sharing quantization parameters along in_features; -1 = one group "
                   "per output channel (formats with groups)"),
    )


def _post_init(self) -> None:
    cls = weight_quantizer_class(self.format)
    if self.bits is None:
        self.bits = cls.default_bits
    self.bits = int(self.bits)
    if self.group_size != -1 and self.group_size < 1:
        raise QuantConfigError(f"group_size must be a positive integer or -1 (per channel), got {self.group_size}")
    for other in WEIGHT_FORMATS.values():
        for o in other.options if other is not cls else ():
            if o.exclusive and getattr(self, o.name) != o.default:
                raise QuantConfigError(f"{o.name} applies to the {other.format} format only, got format {self.format!r}")
    cls.validate_spec(self)


def _group_for(self, in_features: int) -> int:
    """The group size for a layer of this width (checks that it divides the width)."""
    g = in_features if self.group_size == -1 else self.group_size
    if in_features % g:
        raise QuantConfigError(
            f"group_size {g} does not divide in_features {in_features}; pick a divisor (e.g. 64 or 32) or -1")
    return g


def _quantizer_class(self) -> type[WeightQuantizer]:
    """The quantizer class of this spec's format."""
    return weight_quantizer_class(self.format)


def _build_weight_spec() -> type:
    options: list[SpecOption] = list(_common_options())
    for cls in WEIGHT_FORMATS.values():
        for o in cls.options:
            if any(o.name == seen.name for seen in options):
                raise QuantConfigError(f"format {cls.format!r} redefines the WeightSpec field {o.name!r}")
            options.append(dataclasses.replace(o, doc=f"{cls.format} only: {o.doc}"))
    fields: list[Any] = [(o.name, o.type, dataclasses.field(default=o.default)) for o in options]
    doc = "Weight number format (fields built from the formats in qat/quantizers).\n\nAttributes:\n" + "".join(
        f"    {o.name}: {o.doc}\n" for o in options)
    spec = dataclasses.make_dataclass("WeightSpec", fields, namespace={
        "__doc__": doc, "__post_init__": _post_init, "group_for": _group_for, "quantizer_class": _quantizer_class})
    spec.__module__ = "qat.config"  # importable by that name (jsonargparse resolves classes by import path)
    return spec


WeightSpec = _build_weight_spec()
