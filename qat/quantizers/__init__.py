"""Weight and activation quantizers, one file per number format (see base.py for the shared contract)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import qat.config  # noqa: F401  (builds WeightSpec, and with it the format registry, before anything below)
from qat.quantizers.base import WEIGHT_FORMATS, WeightQuantizer, register_weight_format, ste_round
from qat.quantizers.registry import weight_quantizer_class

if TYPE_CHECKING:
    from qat.config import ActSpec, WeightSpec


def make_weight_quantizer(spec: WeightSpec, out_features: int, in_features: int) -> WeightQuantizer:
    return weight_quantizer_class(spec.format)(spec, out_features, in_features)


def make_act_quantizer(spec: ActSpec, in_features: int):
    """The activation quantizer for a linear's input, or None when activations stay in floating point."""
    if not spec.enabled:
        return None
    from qat.quantizers.activation import ActQuantizer

    return ActQuantizer(spec, in_features)


__all__ = ["WEIGHT_FORMATS", "WeightQuantizer", "make_weight_quantizer", "make_act_quantizer",
           "register_weight_format", "weight_quantizer_class", "ste_round"]
