"""qat-distill: quantization-aware distillation of LLMs to 1-4 bits (see docs/DESIGN.md)."""
from __future__ import annotations


def load_quantized(path, device="cpu", dtype=None):
    """A runnable model from a native `qat export` directory (lazy import: `import qat` stays cheap)."""
    from qat.export.load import load_quantized as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["load_quantized"]
