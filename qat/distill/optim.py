"""Optimizers and LR schedules for a stage (or one block-wise window): AdamW with one param group per `train` entry,
or bitsandbytes' 8-bit AdamW, imported only when asked for and replaced by AdamW (with a warning) where it cannot
run (no usable backend for the device), or bitsandbytes' paged AdamW (32- or 8-bit state in CUDA unified memory, which
the driver pages out to host RAM under pressure): CUDA only, refused elsewhere (bitsandbytes would silently run it
unpaged on CPU, which saves nothing)."""
from __future__ import annotations

import math
import warnings
from functools import cache

import torch

from qat.distill.recipe import OptimSpec


@cache
def bnb_usable(device_type: str) -> str | None:
    """None when bitsandbytes' AdamW8bit can take a step on this device type, else the reason it cannot."""
    try:
        import bitsandbytes as bnb

        p = torch.zeros(4096, device=device_type, requires_grad=True)  # >= min_8bit_size: exercises 8-bit state
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        if not torch.isfinite(p).all():
            return "a test step produced non-finite values"
        return None
    except Exception as e:  # noqa: BLE001  (ImportError, missing native library, no kernel for this device...)
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


PAGED = {"paged_adamw": "PagedAdamW", "paged_adamw8bit": "PagedAdamW8bit"}


def check_optimizer(name: str, device: torch.device | str) -> None:
    """One-line error for an optimizer that cannot run on this device (before any model is loaded)."""
    from qat.distill.recipe import RecipeError

    dev = torch.device(device).type
    if name in PAGED and dev != "cuda":
        raise RecipeError(f"optim.name {name} keeps optimizer state in CUDA unified memory and runs on CUDA devices "
                          f"only (this run is on {dev}); use adamw8bit for 8-bit optimizer state")


def build_optimizer(groups: list[dict], spec: OptimSpec, device: torch.device) -> torch.optim.Optimizer:
    """`groups`: [{"params": [...], "lr": float, "name": str}] (empty groups already removed)."""
    kwargs = {"betas": tuple(spec.betas), "eps": spec.eps, "weight_decay": spec.weight_decay}
    if spec.name in PAGED:
        check_optimizer(spec.name, device)
        import bitsandbytes as bnb

        return getattr(bnb.optim, PAGED[spec.name])(groups, **kwargs)
    if spec.name == "adamw8bit":
        why = bnb_usable(torch.device(device).type)
        if why is None:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        warnings.warn(f"bitsandbytes 8-bit AdamW cannot run on {torch.device(device).type} ({why}); "
                      "using torch AdamW instead", stacklevel=2)
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(step: int, total: int, spec: OptimSpec) -> float:
    """Multiplier of the base lr at `step` (0-based) of `total`: linear warmup, then cosine/linear decay to
    min_lr_ratio, or constant."""
    warm = int(spec.warmup * total) if spec.warmup < 1 else int(spec.warmup)
    warm = min(warm, max(total - 1, 0))
    if step < warm:
        return (step + 1) / (warm + 1)
    if spec.schedule == "constant" or total - warm <= 1:
        return 1.0
    t = (step - warm) / (total - warm - 1)
    t = min(max(t, 0.0), 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if spec.schedule == "cosine" else 1 - t
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * decay


def build_scheduler(opt: torch.optim.Optimizer, spec: OptimSpec, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, spec))
