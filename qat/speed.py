"""Switches for the trainer's speed levers (measured one by one in docs/TRAIN_SPEED.md by scripts/bench_train.py).

Every lever keeps its plain reference path: the tests compare each fast path with it (values bit for bit where the
math allows, gradients numerically), and the benchmark turns a lever off to measure what it buys.

    fused_quant        fake-quant forward + hand-written backward (torch.autograd.Function) for uniform weights,
                       activations, W(1+1) and the VQ codebook, instead of autograd over a long elementwise graph
    fused_loss         KL / reverse KL / CAKLD / CE on logits in row chunks, the gradient computed in the same pass
                       (qat/distill/losses.py), instead of log_softmax graphs over the whole [tokens, vocab] tensor
    cache_eval_weight  QuantLinear keeps its dequantized weight while nothing can change it (no grad, quantizer in
                       eval mode) until a parameter changes: student eval / generate run at their export's speed
    compile_quant      torch.compile (Inductor) the uniform fake-quant instead of the hand-written function: one fused
                       loop per direction; costs a compile of minutes per process on a small CPU (see
                       docs/TRAIN_SPEED.md for where it pays)
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields


@dataclass
class Levers:
    fused_quant: bool = True
    fused_loss: bool = True
    cache_eval_weight: bool = True
    compile_quant: bool = False


LEVERS = Levers()


@contextmanager
def levers(**changes: bool):
    """Temporarily set levers, e.g. `with levers(fused_quant=False): ...` runs the autograd reference."""
    known = {f.name for f in fields(Levers)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"unknown speed lever(s) {unknown}; known: {sorted(known)}")
    before = {k: getattr(LEVERS, k) for k in changes}
    for k, v in changes.items():
        setattr(LEVERS, k, bool(v))
    try:
        yield LEVERS
    finally:
        for k, v in before.items():
            setattr(LEVERS, k, v)
