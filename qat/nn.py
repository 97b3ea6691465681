"""QuantLinear (the fake-quant training module) and the swap helpers.

QuantLinear keeps the parameter names of the nn.Linear it replaces (`weight`, `bias`), so a student's state dict maps
1:1 onto the original model's and checkpoints resume; quantizer parameters live under `weight_quantizer.*` and
`act_quantizer.*`. With quantization disabled it computes exactly F.linear(x, weight, bias).
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qat.config import QuantSpec
from qat.quantizers import make_act_quantizer, make_weight_quantizer
from qat.speed import LEVERS
from qat_kernels.hadamard import block_hadamard, hadamard_block_size, random_signs


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, spec: QuantSpec, *, device=None,
                 dtype=None, rotation_seed: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.weight_quantizer = make_weight_quantizer(spec.weight, out_features, in_features)
        self.act_quantizer = make_act_quantizer(spec.act, in_features)
        self.quant_enabled = True
        self._cache: tuple | None = None  # (key, dequantized weight) in eval use, see _weight_for
        # QuaRot-style input rotation for low-bit activations: x W^T = (x T)(W T)^T with T orthogonal; the latent
        # weight is stored already rotated (W T) so only the activation side is rotated at run time.
        if spec.act.enabled and spec.act.hadamard:
            self.rotation_block = hadamard_block_size(in_features, 128)
            self.register_buffer("rotation_signs", random_signs(in_features, rotation_seed))
        else:
            self.rotation_block = 0

    @classmethod
    def from_linear(cls, linear: nn.Module, spec: QuantSpec, rotation_seed: int = 0, adapter=None) -> QuantLinear:
        """Build from an nn.Linear, or any linear layer of `adapter`'s family (ArchAdapter.linear_weight reads a
        weight stored transposed)."""
        w = adapter.linear_weight(linear) if adapter is not None else linear.weight.detach()
        out_f, in_f = w.shape
        q = cls(in_f, out_f, linear.bias is not None, spec, device=w.device, dtype=w.dtype, rotation_seed=rotation_seed)
        with torch.no_grad():
            q.weight.copy_(q.rotate_weight(w) if q.rotation_block else w)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
        return q

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        return block_hadamard(w.float(), self.rotation_signs, self.rotation_block).to(w.dtype)

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        return block_hadamard(x, self.rotation_signs, self.rotation_block) if self.rotation_block else x

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def _weight_for(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective weight in `dtype`. Where nothing can train it (no grad, quantizer in eval mode: `qat eval`,
        `qat generate`, evaluation during distillation) it is dequantized once and kept until one of its inputs
        changes, which is what the export does on CPU (qat.speed lever cache_eval_weight)."""
        q = self.weight_quantizer
        if q.training:
            self._cache = None  # training: the weight changes every step, keep no dense copy
        if q.training or torch.is_grad_enabled() or not LEVERS.cache_eval_weight:
            return q(self.weight).to(dtype)
        key = self._cache_key(dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the stale copy before making the new one
            self._cache = (key, q(self.weight).to(dtype))
        return self._cache[1]

    def _cache_key(self, dtype: torch.dtype) -> tuple:
        """Everything the dequantized weight depends on: the tensors' identities and version counters (every in-place
        change bumps them: optimizer steps, load_state_dict, copy_ under no_grad), the quantizer's non-tensor state
        (WeightQuantizer.cache_state) and the hooks on it (FrozenCodes-style forward overrides)."""
        q = self.weight_quantizer
        tensors = [self.weight, *q.parameters(), *q.buffers()]
        return (dtype, tuple((id(t), t.data_ptr(), t._version) for t in tensors), q.cache_state(),
                tuple(q._forward_hooks), tuple(q._forward_pre_hooks))

    def train(self, mode: bool = True):
        self._cache = None  # a mode switch ends an evaluation: do not hold a dense copy into training
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_enabled:
            if self.rotation_block:
                x = self.rotate_input(x)
            return F.linear(x, self.weight, self.bias)
        x = self.rotate_input(x)
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return F.linear(x, self._weight_for(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.spec.describe()}"


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def check_spec_fits(model: nn.Module, spec: QuantSpec, adapter=None) -> list[str]:
    """Raise QuantConfigError if any linear to be quantized can't take `spec`; returns their names. Works on a model
    built on the meta device, so a CLI can check a spec against an architecture before loading any weights."""
    from qat.models import get_adapter

    adapter = adapter or get_adapter(model)
    names = [n for n in adapter.linear_names(model) if not _matches(n, spec.skip)]
    for n in names:
        out_f, in_f = adapter.linear_shape(model.get_submodule(n))
        make_weight_quantizer(spec.weight, out_f, in_f)
    return names


def quantize_model(model: nn.Module, spec: QuantSpec, adapter=None, init: bool = True) -> list[str]:
    """Swap the adapter's quantizable linears (every linear inside a decoder block, minus `spec.skip`) for
    QuantLinear in place, RTN-initialised unless init=False (a PTQ method or a checkpoint load fills them instead).
    Checks every layer's shape first, so a bad spec changes nothing. Returns the swapped names."""
    from qat.models import get_adapter

    adapter = adapter or get_adapter(model)
    names = check_spec_fits(model, spec, adapter)
    for i, n in enumerate(names):
        q = QuantLinear.from_linear(model.get_submodule(n), spec, rotation_seed=i, adapter=adapter)
        if init:
            with torch.no_grad():
                q.weight.copy_(q.weight_quantizer.init_from(q.weight, seed=i))
        _set_module(model, n, q)
    return names


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for m in quant_linears(model).values():
        m.quant_enabled = enabled


@contextmanager
def quant_disabled(model: nn.Module):
    mods = quant_linears(model).values()
    prev = [m.quant_enabled for m in mods]
    set_quant_enabled(model, False)
    try:
        yield model
    finally:
        for m, p in zip(mods, prev):
            m.quant_enabled = p


def model_bits_per_weight(model: nn.Module) -> dict[str, float]:
    """Storage accounting over the quantized linears, plus the share of parameters left in floating point."""
    qs = quant_linears(model)
    n_q = sum(m.weight.numel() for m in qs.values())
    bits = sum(m.weight.numel() * m.weight_quantizer.bits_per_weight for m in qs.values())
    n_all = sum(p.numel() for n, p in model.named_parameters() if "_quantizer." not in n)
    return {
        "bits_per_weight": bits / n_q if n_q else 16.0,
        "quantized_params": n_q,
        "fp_params": n_all - n_q,
    }
