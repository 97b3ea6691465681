"""Which student parameters a stage trains: parameter classes by name pattern, selection, and the activation bypass.

Classes (a stage's `train` list names these, see recipe.check_selector):
    latent  QuantLinear.weight, the latent FP weight behind the quantizer
    bias    QuantLinear.bias
    wq      weight-quantizer parameters (scale/zero, clip logits, alpha/mu/bitmap_fp, A/b/s_u/s_v); `wq.<name>` picks one
    act     activation-quantizer parameters (clip / knee logits); `act.<name>` picks one
    norms   RMSNorm/LayerNorm weights (and biases)
    embed   token/position embeddings;  head: the LM head (when it is left in floating point)
    re:<regex>  any parameter whose full name matches (re.search)
A parameter trains only if it matches, lies in the stage's active modules (a block-wise window, or the whole model)
and was trainable by design when the run started (e.g. the zero point of a symmetric grid never is).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from qat.nn import QuantLinear


def classify(model: nn.Module) -> dict[str, tuple[str, str]]:
    """{full parameter name: (class, leaf name)} for every parameter of the model."""
    out = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            parts = full.split(".")
            if "weight_quantizer" in parts:
                cls = "wq"
            elif "act_quantizer" in parts:
                cls = "act"
            elif isinstance(mod, QuantLinear):
                cls = "latent" if pname == "weight" else "bias"
            elif isinstance(mod, nn.Embedding):
                cls = "embed"
            elif head is not None and mod is head:
                cls = "head"
            elif "norm" in type(mod).__name__.lower() or isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
                cls = "norms"
            else:
                cls = "other"
            out[full] = (cls, pname)
    return out


def matches(selector: str, name: str, cls: str, leaf: str) -> bool:
    if selector.startswith("re:"):
        return re.search(selector[3:], name) is not None
    head, _, want_leaf = selector.partition(".")
    return cls == head and (not want_leaf or leaf == want_leaf)


def select(model: nn.Module, selectors: list[str], prefixes: Iterable[str] | None, designed: dict[str, bool],
           classes: dict[str, tuple[str, str]]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{selector: [(name, param)]}: each trainable parameter goes to the first selector it matches. `prefixes`
    restricts to parameters under those module names (None = whole model)."""
    prefixes = None if prefixes is None else tuple(p + "." for p in prefixes)
    groups: dict[str, list] = {s: [] for s in selectors}
    for name, p in model.named_parameters():
        if prefixes is not None and not name.startswith(prefixes):
            continue
        if not designed.get(name, True):
            continue
        cls, leaf = classes[name]
        for s in selectors:
            if matches(s, name, cls, leaf):
                groups[s].append((name, p))
                break
    return groups


def check_selectors(model: nn.Module, selectors: list[str], where: str) -> None:
    """Every `train` entry must match at least one parameter of the student (checked before any work)."""
    from qat.distill.recipe import RecipeError

    classes = classify(model)
    for s in selectors:
        if not any(matches(s, n, *classes[n]) for n in classes):
            have = sorted({c if c not in ("wq", "act") else f"{c}.{leaf}" for c, leaf in classes.values()})
            raise RecipeError(f"{where}: train entry {s!r} matches no parameter of the student; it has: "
                              f"{', '.join(have)}")


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def snapshot_trainable(model: nn.Module) -> dict[str, bool]:
    """Which parameters are trainable by design (requires_grad as the quantizers left it after initialisation)."""
    return {n: bool(p.requires_grad) for n, p in model.named_parameters()}


class ActBypass:
    """Turns the student's activation quantizers off (each returns its input unchanged) for stages that train with
    FP activations (LBLLM WAT), without touching the module tree, so state dicts and checkpoints keep every key."""

    def __init__(self, model: nn.Module):
        self.quantizers = [m.act_quantizer for m in model.modules()
                           if isinstance(m, QuantLinear) and m.act_quantizer is not None]
        self._handles: list = []

    @property
    def active(self) -> bool:
        return not self._handles

    def set(self, enabled: bool) -> None:
        if enabled and self._handles:
            for h in self._handles:
                h.remove()
            self._handles = []
        elif not enabled and not self._handles:
            self._handles = [q.register_forward_hook(lambda _m, args, _out: args[0]) for q in self.quantizers]


def quantizer_train_mode(model: nn.Module) -> None:
    """Training mode for the quantizers only (straight-through estimators on); every other module stays in eval mode,
    so dropout never perturbs a distillation step (HF attention reads its own `training` flag for dropout)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.weight_quantizer.train()
            if m.act_quantizer is not None:
                m.act_quantizer.train()


def set_act_temperature(model: nn.Module, value: float) -> int:
    """Set `temperature` on every activation quantizer that has one (knee mode); returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.act_quantizer is not None and hasattr(m.act_quantizer, "temperature"):
            m.act_quantizer.temperature = value
            n += 1
    return n


def state_fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of every parameter and buffer (tests compare these bit for bit)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
