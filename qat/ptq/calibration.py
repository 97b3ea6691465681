"""Calibration statistics for Hessian-aware PTQ: per-linear input Gram matrices H = 2/N sum x x^T (GPTQ's
Hessian of the layer-wise squared error) and a small sample of inputs for activation-quantizer initialisation."""
from __future__ import annotations

import torch
from torch import nn


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """x^T x of a [tokens, features] batch: a float32 matmul (as GPTQ does; a float64 one is ~4x slower on CPU),
    summed into the float64 running mean by InputStats."""
    x = x.float()
    return x.t() @ x


class InputStats:
    """Accumulates H over every token a linear sees (running mean, float64 for stability) and keeps up to
    `keep_tokens` input rows for activation-range initialisation."""

    def __init__(self, in_features: int, keep_tokens: int = 0):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0
        self.keep_tokens = keep_tokens
        self.samples: list[torch.Tensor] = []
        self._kept = 0

    def add(self, x: torch.Tensor, gram: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        b = x.shape[0]
        if gram is None:
            gram = gram_matrix(x)
        self.H *= self.n / (self.n + b)
        self.H += (2.0 / (self.n + b)) * gram.to(device=self.H.device, dtype=self.H.dtype)
        self.n += b
        if self._kept < self.keep_tokens:
            take = x[: self.keep_tokens - self._kept].float().cpu()
            self.samples.append(take)
            self._kept += take.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.H.float()

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples, 0) if self.samples else torch.empty(0)


def attach_input_stats(modules: dict[str, nn.Module], keep_tokens: int = 0, transform=None):
    """Forward-pre-hooks recording each module's input. `transform(module, x)` maps the raw input to what the
    quantized weight actually multiplies (e.g. the Hadamard-rotated input). Returns (stats, remove_fn)."""
    stats, handles = {}, []
    # q/k/v (and gate/up) read the very same tensor object: compute its Gram matrix once. Identity (not address)
    # is the key, and holding the reference keeps its memory from being reused by the next batch's input.
    last = {"x": None, "gram": None}

    for name, mod in modules.items():
        st = stats[name] = InputStats(mod.in_features, keep_tokens)

        def hook(m, args, st=st):
            x = args[0]
            x = transform(m, x) if transform else x
            if last["x"] is not x:
                last["x"], last["gram"] = x, gram_matrix(x.detach().reshape(-1, x.shape[-1]))
            st.add(x, last["gram"])

        handles.append(mod.register_forward_pre_hook(hook))

    def remove():
        for h in handles:
            h.remove()
        last.clear()

    return stats, remove
