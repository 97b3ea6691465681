"""qat_kernels: low-bit dequantization and matmul kernels for qat-distill's packed formats.

Importable with torch alone (plus triton for the GPU kernels): the GPU machine has no other packages.
- packing.py   bit-stream packing shared by every format (the storage layout)
- reference.py plain-torch dequant + matmul for every format: the ground truth and the CPU path
- triton/      one file per fused kernel, each checked against reference.py
"""
from qat_kernels import packing, reference  # noqa: F401

__all__ = ["packing", "reference"]
