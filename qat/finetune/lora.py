"""peft LoRA on quantized linears, through peft's custom-module dispatch (LoraConfig._register_custom_module, peft's
documented mechanism for layer types it does not know; docs/FINETUNE.md).

QuantLoraLinear wraps a frozen quantized linear, a student's QuantLinear or an export's PackedLinear, and adds peft's
LoRA branch to its output:

    y = base(x) + scaling * B A x                                 plain LoRA
    y = base(x) + scaling * B A (n_groups * mean_g(x))            QA-LoRA (peft's QALoraLinearVariant, use_qalora):
                                                                  A reads x averaged over each quantization group

The LoRA branch reads the layer's input before any input rotation or activation quantization. With QA-LoRA the
branch equals x D^T for a weight delta D that is constant within each quantization group, which is what lets
`qat merge` fold it into the group zero points exactly (qat/finetune/merge.py).

Adapters are peft's own directories (adapter_config.json + adapter_model.safetensors) plus qat_adapter.json, which
records a fingerprint of the base layers the adapter was trained on, so an adapter is never applied to another model.
Loading one by hand (peft's documented way for custom modules):

    config = qat.finetune.lora.registered(LoraConfig.from_pretrained(ADAPTER))
    model = PeftModel.from_pretrained(qat.load_quantized(EXPORT, dtype=torch.float32), ADAPTER, config=config)

or `qat.finetune.lora.load_adapter(model, ADAPTER)`, which also checks that the adapter fits the model.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER_META = "qat_adapter.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_SELECTOR = r"re:\.lora_[AB]\."  # the `train` entry of the fine-tuning stage (qat/distill/params.py selectors)


def quantized_linear_types() -> tuple[type[nn.Module], ...]:
    from qat.export.runtime import PackedLinear
    from qat.nn import QuantLinear

    return (QuantLinear, PackedLinear)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The effective weight [out, in] of a frozen quantized linear, in the coordinates its matmul sees (after the
    input rotation, if any): what its forward multiplies by."""
    from qat.export.runtime import PackedLinear

    with torch.no_grad():
        if isinstance(layer, PackedLinear):
            return layer._dense if layer.cache_dense and layer._dense is not None else layer.dequantize()
        return layer.quantized_weight()


class FrozenBase(torch.autograd.Function):
    """y = base(x) with the frozen base's exact forward (packed kernels, eval-mode quantizers), and the input gradient
    of a straight-through base: dy/dx = W_hat (rotated back when the layer rotates its input), activation quantization
    passed straight through. Nothing is saved for the backward; W_hat is recomputed there (QLoRA's trick), so the
    Triton kernels need no autograd and the packed weights are never stored dense between the passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer, ctx.x_dtype = layer, x.dtype
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        layer = ctx.layer
        w = base_weight(layer)
        gx = gy.to(w.dtype) @ w
        if getattr(layer, "rotation_block", 0):
            from qat_kernels.hadamard import block_hadamard_inverse

            gx = block_hadamard_inverse(gx, layer.rotation_signs, layer.rotation_block)
        return gx.to(ctx.x_dtype), None


class QuantLoraLinear(nn.Module, LoraLayer):
    """peft LoRA layer around a frozen QuantLinear / PackedLinear (both expose in_features, out_features and
    forward(x)); follows peft's conventions for custom LoRA layers."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                 **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # packed layers hold integer buffers only: take the device from any tensor, keep the adapter in float32
        t = next(iter(base_layer.buffers()), None) if next(base_layer.parameters(), None) is None else \
            next(base_layer.parameters())
        return (None if t is None else t.device), None

    def resolve_lora_variant(self, *, config, **kwargs):
        if config.use_dora:
            raise ValueError("DoRA is not supported on quantized layers (qat finetune trains LoRA or QA-LoRA)")
        if config.use_qalora:
            from peft.tuners.lora.variants import QALoraLinearVariant

            return QALoraLinearVariant()
        return None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            result = FrozenBase.apply(x, self.base_layer)
        else:
            result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, lora_A.weight.dtype)
            if name in self.lora_variant:
                result = self.lora_variant[name].forward(self, active_adapter=name, x=xa, result=result)
            else:
                result = result + lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
        return result.to(dtype)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The weight delta D [out, in] (float64) with x D^T == the adapter's branch; QA-LoRA's is constant
        within each group of qalora_group_size inputs."""
        A = self.lora_A[adapter].weight.detach().double()
        B = self.lora_B[adapter].weight.detach().double()
        if adapter in self.lora_variant:
            g = self.qalora_group_size[adapter]
            n = self.in_features // g
            return ((B @ A) * (self.scaling[adapter] * n / g)).repeat_interleave(g, dim=1)
        return (B @ A) * self.scaling[adapter]

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("a LoRA adapter on quantized weights merges with `qat merge` (exact for QA-LoRA "
                                  "on uniform formats, approximate otherwise), not with peft's merge")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def registered(config):
    """`config` with the quantized linear types registered as custom LoRA targets (peft keeps this registration out of
    adapter_config.json, so it is redone on every load)."""
    config._register_custom_module({t: QuantLoraLinear for t in quantized_linear_types()})
    return config


# ---- targets --------------------------------------------------------------------------------------------------------

def quantized_names(model: nn.Module) -> list[str]:
    types = quantized_linear_types()
    return [n for n, m in model.named_modules() if isinstance(m, types)]


def default_targets(model: nn.Module) -> list[str]:
    """Every quantized linear, by its leaf name (q_proj, ..., down_proj)."""
    return sorted({n.rsplit(".", 1)[-1] for n in quantized_names(model)})


def matched_modules(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Module names peft would wrap for these target_modules (peft's own matching: suffixes or one regex)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    cfg = LoraConfig(target_modules=targets)
    return [n for n, _ in model.named_modules() if n and check_target_module_exists(cfg, n)]


def check_targets(model: nn.Module, targets: list[str] | str) -> list[str]:
    """The linears `targets` selects; one-line errors when it selects nothing or a module that is not a linear."""
    if targets == []:  # the default (every quantized linear) of a model that has none
        raise ValueError("the model has no quantized linears to adapt (an FP model?): qat finetune trains LoRA on a "
                         "qat student or export; name the linears with --lora.targets (e.g. [q_proj, v_proj]) to "
                         "adapt an FP model")
    names = matched_modules(model, targets)
    if not names:
        raise ValueError(f"LoRA targets {targets} match no module of the model; its quantized linears are named "
                         f"{', '.join(default_targets(model)) or '(none)'}")
    linear = quantized_linear_types() + (nn.Linear,)
    for n in names:
        m = model.get_submodule(n)
        if not isinstance(m, linear):
            raise ValueError(f"LoRA target {n!r} is a {type(m).__name__}, not a linear layer; name linears such as "
                             f"{', '.join(default_targets(model))}")
    return names


@contextmanager
def peft_warnings():
    """peft reads transformers' deprecated is_gradient_checkpointing when it wraps a model: not ours to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def lora_config(r: int, alpha: float, targets: list[str] | str, *, dropout: float = 0.0, qalora_group: int = 0,
                inference_mode: bool = False):
    """A registered peft LoraConfig for a causal LM (qalora_group > 0: QA-LoRA pooling over groups of that size)."""
    from peft import LoraConfig

    return registered(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none",
                                 task_type="CAUSAL_LM", use_qalora=qalora_group > 0,
                                 qalora_group_size=qalora_group or 16, inference_mode=inference_mode))


# ---- base fingerprint -----------------------------------------------------------------------------------------------

def _stored_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a layer's weight is made of, as stored: a QuantLinear's pack() (exactly what its export holds), a
    PackedLinear's buffers, an FP linear's weight in float16 (an export's default dtype)."""
    from qat.export.runtime import PackedLinear
    from qat.nn import QuantLinear

    if isinstance(module, QuantLinear):
        with torch.no_grad():
            return module.weight_quantizer.pack(module.weight)
    if isinstance(module, PackedLinear):
        return module.packed()
    return {"weight": module.weight.detach().to(torch.float16)}


def base_fingerprint(model: nn.Module, names: list[str]) -> str:
    """sha256 over the stored weights of the named base layers: equal for a student and its export, different for
    any other model (another student, the FP model, a merged student)."""
    h = hashlib.sha256()
    for n in sorted(names):
        m = model.get_submodule(n)
        m = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        h.update(n.encode())
        for k, t in sorted(_stored_tensors(m).items()):
            t = t.detach().cpu().contiguous()
            h.update(f"|{k}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- save / load ----------------------------------------------------------------------------------------------------

def adapter_module_shapes(adapter_dir) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module name in the base model: {"lora_A": shape, "lora_B": shape}} from an adapter's safetensors header."""
    from safetensors import safe_open

    out: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])\.weight", key)
            if m is None:
                raise ValueError(f"{adapter_dir}: unexpected tensor {key!r} in {ADAPTER_WEIGHTS} (not a LoRA adapter "
                                 "written by qat finetune)")
            out.setdefault(m.group(1), {})[m.group(2)] = tuple(f.get_slice(key).get_shape())
    return out


def read_adapter(adapter_dir) -> tuple[Any, dict]:
    """(registered LoraConfig, qat_adapter.json) of an adapter directory, or one clear error."""
    from peft import LoraConfig

    p = Path(adapter_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"adapter directory {str(adapter_dir)!r} does not exist")
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_META):
        if not (p / f).is_file():
            raise FileNotFoundError(f"{p}: missing {f}; not an adapter written by qat finetune")
    try:
        meta = json.loads((p / ADAPTER_META).read_text())
        config = LoraConfig.from_pretrained(str(p))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{p}: unreadable adapter config ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return registered(config), meta


def check_adapter_fits(model: nn.Module, adapter_dir) -> list[str]:
    """Every adapted module exists in `model` with the shapes the adapter needs, and the base layers are the ones it
    was trained on. Returns the adapted module names."""
    config, meta = read_adapter(adapter_dir)
    shapes = adapter_module_shapes(adapter_dir)
    g = config.qalora_group_size if config.use_qalora else 1
    for name, sh in sorted(shapes.items()):
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter {str(adapter_dir)!r} does not fit this model: it adapts {name!r}, which the "
                             "model does not have (trained on another architecture)") from None
        m = m.get_base_layer() if hasattr(m, "get_base_layer") else m
        in_f, out_f, r = m.in_features, m.out_features, sh.get("lora_A", (0,))[0]
        want = {"lora_A": (r, in_f // g), "lora_B": (out_f, r)}
        for k in ("lora_A", "lora_B"):
            if sh.get(k) != want[k] or in_f % g:
                raise ValueError(f"adapter {str(adapter_dir)!r} does not fit this model: {name}.{k} has shape "
                                 f"{list(sh.get(k, ()))}, the layer ({in_f} -> {out_f}) needs {list(want[k])}")
    fp = base_fingerprint(model, list(shapes))
    if fp != meta.get("base_fingerprint"):
        raise ValueError(f"adapter {str(adapter_dir)!r} was trained on another base model ({meta.get('base')!r}): "
                         f"the weights of the layers it adapts differ (fingerprint {fp[:12]} vs "
                         f"{str(meta.get('base_fingerprint'))[:12]})")
    return sorted(shapes)


def load_adapter(model: nn.Module, adapter_dir, *, is_trainable: bool = False):
    """PeftModel.from_pretrained(model, adapter_dir) with the quantized layers registered, after check_adapter_fits."""
    from peft import PeftModel

    check_adapter_fits(model, adapter_dir)
    config, _ = read_adapter(adapter_dir)
    with peft_warnings():
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), config=config, is_trainable=is_trainable)
    return peft_model.eval() if not is_trainable else peft_model


def save_adapter(peft_model, out_dir, meta: dict[str, Any], *, overwrite: bool = False, extra=None) -> Path:
    """peft's save_pretrained plus qat_adapter.json (with the base fingerprint), into a directory that is either
    complete or absent; `extra(tmp_dir)` adds files (the summary plot) before the rename."""
    from qat.io import atomic_output_dir

    base = peft_model.get_base_model()
    names = [n for n, m in base.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    with atomic_output_dir(out_dir, overwrite, kind="adapter") as tmp:
        peft_model.save_pretrained(str(tmp))
        info = {"format_version": 1, "modules": sorted(names), **meta}
        if "base_fingerprint" not in info:
            info["base_fingerprint"] = base_fingerprint(base, names)
        (tmp / ADAPTER_META).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        if extra is not None:
            extra(tmp)
    return Path(out_dir)
