"""Export: pack a student to disk (native safetensors + quantization_config, or compressed-tensors), load it back as a
runnable model, generate text. Submodules import lazily: `qat export --help` does not pay for transformers."""
from __future__ import annotations


def load_quantized(path, device="cpu", dtype=None):
    from qat.export.load import load_quantized as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["load_quantized"]
