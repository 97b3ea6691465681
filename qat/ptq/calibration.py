"""Calibration statistics for Hessian-aware PTQ: per-linear input Gram matrices H = 2/N sum x x^T (GPTQ's
Hessian of the layer-wise squared error) and a small sample of inputs for activation-quantizer initialisation.

On several processes (qat distill on N ranks) each process sees its own share of the calibration rows, dealt in
whole row chunks; `InputStats.reduce` sums H and N over the processes and hands every process the same leading input
rows, so the statistics -- and with them the PTQ init -- are those of one process over all the rows. The Gram sum is
kept in float64 and summed, not averaged, as it goes: the float64 sum of a few float32 Gram matrices is exact, so
the reduced H does not depend on how the chunks were dealt.
"""
from __future__ import annotations

import torch
from torch import nn

from qat.dist import SINGLE, Dist


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """x^T x of a [tokens, features] batch: a float32 matmul (as GPTQ does; a float64 one is ~4x slower on CPU),
    summed in float64 by InputStats."""
    x = x.float()
    return x.t() @ x


class InputStats:
    """Accumulates sum x x^T (float64) over every token a linear sees, and keeps the input rows of the first
    `keep_chunks` calibration chunks (their first `keep_tokens` tokens in chunk order seed activation ranges)."""

    def __init__(self, in_features: int, keep_tokens: int = 0, keep_chunks: int = 1):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0
        self.keep_tokens, self.keep_chunks = keep_tokens, keep_chunks
        self.samples: dict[int, torch.Tensor] = {}  # calibration chunk -> its input rows

    def add(self, x: torch.Tensor, gram: torch.Tensor | None = None, chunk: int = 0) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if gram is None:
            gram = gram_matrix(x)
        self.H += gram.to(device=self.H.device, dtype=self.H.dtype)
        self.n += x.shape[0]
        if self.keep_tokens and chunk < self.keep_chunks:
            prev = self.samples.get(chunk)
            take = x[: self.keep_tokens].float().cpu()
            self.samples[chunk] = take if prev is None else torch.cat([prev, take])[: self.keep_tokens]

    def reduce(self, dist: Dist = SINGLE) -> None:
        """Sum over the processes of the run (every process must call it, for the same linears in the same order)."""
        if not dist.active:
            return
        dist.sum_(self.H)
        n = torch.tensor([self.n], dtype=torch.float64, device=self.H.device)
        self.n = int(dist.sum_(n).item())
        if self.keep_tokens:
            self.samples = {c: dist.broadcast_object(self.samples.get(c), src=dist.owner(c))
                            for c in range(self.keep_chunks)}

    def hessian(self) -> torch.Tensor:
        return (self.H * (2.0 / max(self.n, 1))).float()

    def sample(self) -> torch.Tensor:
        rows = [self.samples[c] for c in sorted(self.samples) if self.samples[c] is not None]
        return torch.cat(rows, 0)[: self.keep_tokens] if rows else torch.empty(0)


def attach_input_stats(modules: dict[str, nn.Module], keep_tokens: int = 0, transform=None, keep_chunks: int = 1,
                       chunk=lambda: 0):
    """Forward-pre-hooks recording each module's input. `transform(module, x)` maps the raw input to what the
    quantized weight actually multiplies (e.g. the Hadamard-rotated input); `chunk()` names the calibration chunk
    being run (for the sample order across processes). Returns (stats, remove_fn)."""
    stats, handles = {}, []
    # q/k/v (and gate/up) read the very same tensor object: compute its Gram matrix once. Identity (not address)
    # is the key, and holding the reference keeps its memory from being reused by the next batch's input.
    last = {"x": None, "gram": None}

    for name, mod in modules.items():
        st = stats[name] = InputStats(mod.in_features, keep_tokens, keep_chunks)

        def hook(m, args, st=st):
            x = args[0]
            x = transform(m, x) if transform else x
            if last["x"] is not x:
                last["x"], last["gram"] = x, gram_matrix(x.detach().reshape(-1, x.shape[-1]))
            st.add(x, last["gram"], chunk())

        handles.append(mod.register_forward_pre_hook(hook))

    def remove():
        for h in handles:
            h.remove()
        last.clear()

    return stats, remove
