"""Frozen integer codes for uniform quantizers (EfficientQAT E2E-QP: "freeze the integer weights, train the step
sizes").

The uniform quantizer's training forward is LSQ-style: codes = clamp(round(w / s) + z) are recomputed from the latent
weight every step with a straight-through round, so d w_hat / d s = round(w/s) - w/s inside the grid. A GPTQ-initialised
student's latent weight *is* its dequantized value, (q - z) * s, so w/s is an integer and that gradient is exactly 0
for every weight: scales and zero points receive no gradient at all (measured on SmolLM2 W2g64: |grad| = 0). With
`freeze_codes: true` a stage holds q fixed at the values of its start (window start for block-wise stages) and
computes w_hat = (q - z) * s from the current (s, z), so d w_hat / d s = q - z: the step sizes train, as in E2E-QP.
(The codes go into the quantizer's `frozen_codes`, whose forward then skips the LSQ rounding altogether.)
The latent weight gets no gradient in this mode (recipes may not train `latent` with it). When the window/stage ends,
bake() rewrites each latent weight to (q - z) * s with the trained (s, z): the quantizer's ordinary forward (and
pack()) then reproduce the trained model exactly, instead of re-rounding the old latent against the new step sizes.
Only quantizers with free scale/zero parameters qualify (not LWC, whose s and z are functions of the latent itself).

Resume: the codes are a function of the (frozen) latent weight and the (s, z) at the start, so only those small
[out, n_groups] tensors go into the checkpoint and the codes are recomputed bit for bit.

FSDP (qat distill --strategy fsdp): the weights are sharded DTensors outside the forward, so the start (s, z) are kept
whole on every process and the codes are recomputed in the forward from the gathered latent (the same numbers); bake()
computes the new latent whole and writes each process's shard.
"""
from __future__ import annotations

import torch
from torch import nn

from qat.nn import QuantLinear
from qat.quantizers.uniform import frozen_affine


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP-sharded DTensor (a collective), else t."""
    return t.full_tensor() if _is_dtensor(t) else t


def supports_frozen_codes(q: nn.Module) -> bool:
    return all(hasattr(q, a) for a in ("scale", "zero", "scale_zero", "qmax", "n_groups", "group_size",
                                       "frozen_codes"))


def _codes(q: nn.Module, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    wg = w.detach().float().reshape(q.out_features, q.n_groups, q.group_size)
    return torch.clamp(torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, q.qmax)


class FrozenCodes:
    def __init__(self, modules: dict[str, QuantLinear]):
        bad = [n for n, m in modules.items() if not supports_frozen_codes(m.weight_quantizer)]
        if bad:
            raise ValueError(f"freeze_codes needs uniform weight quantizers with free scale/zero (not binary11, vq or "
                             f"lwc); {bad[0]} has {modules[bad[0]].weight_quantizer.extra_repr()}")
        self.modules = modules
        self.start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.codes: dict[str, torch.Tensor | None] = {}
        self._handles: list = []

    @torch.no_grad()
    def attach(self, state: dict | None = None) -> FrozenCodes:
        for name, m in self.modules.items():
            q = m.weight_quantizer
            if state is not None:
                s0, z0 = (t.to(m.weight.device) for t in state[name])
            else:
                s0, z0 = (_whole(t).detach().clone() for t in q.scale_zero(m.weight))
            self.start[name] = (s0, z0)
            codes = None if _is_dtensor(m.weight) else _codes(q, m.weight, s0, z0)
            self.codes[name] = codes
            if codes is not None:
                q.frozen_codes = codes  # the quantizer's forward is then (q - z) * s with the current (s, z)
                continue
            # FSDP: the latent is a shard outside the forward; the codes come from the gathered latent in a hook

            def hook(mod, args, _out, s0=s0, z0=z0):
                c = _codes(mod, args[0], s0, z0)
                s, z = mod.scale_zero(args[0])
                # the same (fused) op as the quantizer's frozen_codes path, so FSDP and DDP runs agree bit for bit
                return frozen_affine(c, s.unsqueeze(-1), z.unsqueeze(-1)).reshape(mod.out_features, mod.in_features)

            self._handles.append(q.register_forward_hook(hook))
        return self

    @torch.no_grad()
    def bake(self) -> None:
        """latent := (q - z) * s with the current (s, z), so the ordinary forward gives the trained weights."""
        for name, m in self.modules.items():
            latent = _whole(m.weight)
            s, z = (_whole(t) for t in m.weight_quantizer.scale_zero(latent))
            codes = self.codes[name] if self.codes[name] is not None else _codes(m.weight_quantizer, latent,
                                                                                 *self.start[name])
            w = ((codes - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(m.weight.shape).to(m.weight.dtype)
            if _is_dtensor(m.weight):
                from torch.distributed.tensor import distribute_tensor

                w = distribute_tensor(w, m.weight.device_mesh, m.weight.placements, src_data_rank=None)
            m.weight.copy_(w)

    def finish(self) -> None:
        self.bake()
        self.detach()

    def detach(self) -> None:
        for m in self.modules.values():
            m.weight_quantizer.frozen_codes = None
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def state_dict(self) -> dict:
        return {n: (s.cpu(), z.cpu()) for n, (s, z) in self.start.items()}
