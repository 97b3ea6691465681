"""Quantize one FP model many ways and measure each: the engine behind scripts/bench_ptq.py and the demo."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from qat.config import QuantSpec
from qat.eval.perplexity import perplexity
from qat.nn import model_bits_per_weight
from qat.ptq.pipeline import ptq_quantize


@dataclass
class SweepRow:
    name: str
    method: str
    spec: str
    perplexity: float
    bits_per_weight: float
    seconds: float


def ptq_sweep(model, configs: list[tuple[str, str, QuantSpec, dict]], calib_ids: torch.Tensor,
              eval_ids: torch.Tensor, seq_len: int, *, progress: bool = True, on_row=None) -> list[SweepRow]:
    """configs: (row name, ptq method, spec, extra ptq kwargs). The FP model is row 'FP'; each config quantizes a
    deep copy, so the FP model is loaded once."""
    rows = []
    fp = perplexity(model, eval_ids, seq_len, progress=progress)
    rows.append(SweepRow("FP", "-", "fp32", fp["perplexity"], 16.0, 0.0))
    if on_row:
        on_row(rows[-1])
    for name, method, spec, kw in configs:
        t0 = time.time()
        student = copy.deepcopy(model)
        ptq_quantize(student, spec, calib_ids, method, progress=progress, **kw)
        seconds = time.time() - t0
        ppl = perplexity(student, eval_ids, seq_len, progress=progress)["perplexity"]
        rows.append(SweepRow(name, method, spec.describe(), ppl, model_bits_per_weight(student)["bits_per_weight"],
                             seconds))
        if on_row:
            on_row(rows[-1])
        del student
    return rows
