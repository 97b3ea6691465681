"""Architecture adapters: where a causal LM keeps its decoder blocks, attention, MLP and norms, and how to run one
block on cached hidden states. One small registry keyed by `config.model_type`.

Running a block: `capture_block_inputs` stops the model's forward at block 0 and records the hidden states plus the
keyword arguments the model itself passes to its blocks (causal masks, rotary position embeddings, ...). Replaying a
block with those kwargs is exactly what the full model does, for every family, without re-implementing any of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    blocks_path: str  # dotted path of the nn.ModuleList of decoder blocks
    attn: str  # attention sub-module name inside a block
    mlp: tuple[str, ...]  # MLP sub-module name(s) inside a block (OPT keeps fc1/fc2 directly on the block)
    attn_norm: str
    mlp_norm: str
    parallel_residual: bool = False  # GPT-NeoX: attention and MLP both read the block input
    # class names of the family's linear layers that store their weight transposed, [in, out] (GPT-2's Conv1D): the
    # one place that says so; everything else asks is_linear / linear_shape / linear_weight
    transposed: tuple[str, ...] = ()

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def is_linear(self, m: nn.Module) -> bool:
        """A linear layer of this family: nn.Linear, a transposed linear, or an already quantized QuantLinear."""
        return isinstance(m, nn.Linear) or type(m).__name__ in (*self.transposed, "QuantLinear")

    def linear_weight(self, m: nn.Module) -> torch.Tensor:
        """The (detached) weight of a linear layer as [out, in], whatever its storage."""
        w = m.weight.detach()
        return w.t() if type(m).__name__ in self.transposed else w

    def linear_shape(self, m: nn.Module) -> tuple[int, int]:
        """(out, in) of a linear layer of this family."""
        if not self.is_linear(m):
            raise ValueError(f"quantized module is a {type(m).__name__}, not a linear layer")
        out_f, in_f = m.weight.shape
        return (in_f, out_f) if type(m).__name__ in self.transposed else (out_f, in_f)

    def linear_names(self, model: nn.Module) -> list[str]:
        """Fully qualified names of every linear (is_linear) inside the decoder blocks."""
        names = []
        for i, block in enumerate(self.blocks(model)):
            for n, m in block.named_modules():
                if self.is_linear(m):
                    names.append(f"{self.blocks_path}.{i}.{n}")
        return names

    def unit_linears(self, block: nn.Module) -> dict[str, list[str]]:
        """Linear names inside one block, split into the attention unit and the MLP unit (ACBQ's units)."""
        out = {"attn": [], "mlp": []}
        for n, m in block.named_modules():
            if self.is_linear(m):
                head = n.split(".")[0]
                out["attn" if head == self.attn else "mlp"].append(n)
        return out


_LLAMA = dict(attn="self_attn", mlp=("mlp",), attn_norm="input_layernorm", mlp_norm="post_attention_layernorm")
ADAPTERS: dict[str, ArchAdapter] = {
    **{t: ArchAdapter(family="llama", blocks_path="model.layers", **_LLAMA)
       for t in ("llama", "mistral", "qwen2", "qwen3")},
    "opt": ArchAdapter(family="opt", blocks_path="model.decoder.layers", attn="self_attn", mlp=("fc1", "fc2"),
                       attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm"),
    "gpt2": ArchAdapter(family="gpt2", blocks_path="transformer.h", attn="attn", mlp=("mlp",),
                        attn_norm="ln_1", mlp_norm="ln_2", transposed=("Conv1D",)),
    "gpt_neox": ArchAdapter(family="gpt_neox", blocks_path="gpt_neox.layers", attn="attention", mlp=("mlp",),
                            attn_norm="input_layernorm", mlp_norm="post_attention_layernorm",
                            parallel_residual=True),
}


def get_adapter(model_or_type) -> ArchAdapter:
    mt = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", None)
    if mt not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {mt!r}; supported model_type values: {', '.join(sorted(ADAPTERS))}")
    ad = ADAPTERS[mt]
    if not isinstance(model_or_type, str) and mt == "gpt_neox":
        ad = ArchAdapter(**{**ad.__dict__, "parallel_residual": bool(model_or_type.config.use_parallel_residual)})
    return ad


class _StopForward(Exception):
    pass


def _block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, adapter: ArchAdapter | None = None,
                         batch_size: int = 8):
    """Hidden states entering block 0 for every row of input_ids [N, L], and the block kwargs of the model.

    Returns (hidden [N, L, d] on the model's device, kwargs). The kwargs are captured from a batch-1 forward so their
    masks/position tensors broadcast over any batch size.
    """
    adapter = adapter or get_adapter(model)
    block0 = adapter.blocks(model)[0]
    captured = {}

    def hook(_mod, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    # prepend: stop before any other pre-hook of the block runs (e.g. FSDP's, which would gather its weights)
    handle = block0.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    dev = next(model.parameters()).device
    hs, kwargs = [], None
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[i : i + batch_size].to(dev), use_cache=False)
            except _StopForward:
                pass
            hs.append(captured["h"])
        try:
            model(input_ids[:1].to(dev), use_cache=False)
        except _StopForward:
            pass
        kwargs = captured["kwargs"]
    finally:
        handle.remove()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache",
                                                                 "layer_past", "output_attentions")}
    return torch.cat(hs, 0), kwargs


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block on cached hidden states [B, L, d] with the captured kwargs."""
    return _block_output(block(hidden, **kwargs))


def run_unit(adapter: ArchAdapter, block: nn.Module, unit: str, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run only the attention ('attn') or MLP ('mlp') residual unit of a block (ACBQ's quantization units).

    For sequential-residual families, block(h) == mlp_unit(attn_unit(h)). Parallel-residual blocks (GPT-NeoX) have
    no such split and raise.
    """
    if adapter.parallel_residual:
        raise UnsupportedArchitectureError(f"{adapter.family}: parallel-residual blocks cannot be split into units")
    if unit == "attn":
        a = block.get_submodule(adapter.attn)
        x = block.get_submodule(adapter.attn_norm)(hidden)
        return hidden + _block_output(a(x, **_attn_kwargs(adapter, kwargs)))
    if unit == "mlp":
        x = block.get_submodule(adapter.mlp_norm)(hidden)
        if len(adapter.mlp) == 1:
            return hidden + block.get_submodule(adapter.mlp[0])(x)
        fc1, fc2 = (block.get_submodule(n) for n in adapter.mlp)  # OPT
        return hidden + fc2(block.activation_fn(fc1(x)))
    raise ValueError(f"unknown unit {unit!r}; expected 'attn' or 'mlp'")


def _attn_kwargs(adapter: ArchAdapter, kwargs: dict) -> dict:
    kw = dict(kwargs)
    if adapter.family == "gpt2":  # GPT2Attention takes hidden_states positionally, the rest by keyword
        kw.pop("encoder_hidden_states", None)
        kw.pop("encoder_attention_mask", None)
    return kw
