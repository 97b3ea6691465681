"""Weight and activation quantizers, one file per number format (see base.py for the shared contract)."""
from __future__ import annotations

import importlib

from qat.config import ActSpec, QuantConfigError, WeightSpec
from qat.quantizers.base import WeightQuantizer, ste_round

# format name -> "module:Class"; imported lazily so one format's import cost/failure never touches another
_WEIGHT_QUANTIZERS = {
    "uniform": "qat.quantizers.uniform:UniformQuantizer",
    "binary11": "qat.quantizers.binary:Binary11Quantizer",
    "vq": "qat.quantizers.vq:VQQuantizer",
}


def weight_quantizer_class(fmt: str) -> type[WeightQuantizer]:
    if fmt not in _WEIGHT_QUANTIZERS:
        raise QuantConfigError(f"unknown weight format {fmt!r}; supported: {', '.join(_WEIGHT_QUANTIZERS)}")
    mod, cls = _WEIGHT_QUANTIZERS[fmt].split(":")
    return getattr(importlib.import_module(mod), cls)


def make_weight_quantizer(spec: WeightSpec, out_features: int, in_features: int) -> WeightQuantizer:
    return weight_quantizer_class(spec.format)(spec, out_features, in_features)


def make_act_quantizer(spec: ActSpec, in_features: int):
    """The activation quantizer for a linear's input, or None when activations stay in floating point."""
    if not spec.enabled:
        return None
    from qat.quantizers.activation import ActQuantizer

    return ActQuantizer(spec, in_features)


__all__ = ["WeightQuantizer", "make_weight_quantizer", "make_act_quantizer", "weight_quantizer_class", "ste_round"]
