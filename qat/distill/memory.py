"""Memory savers shared by `qat distill` and `qat finetune` (recipe key `memory`, optimizer names in optim.py):

    teacher: int8 | nf4   the frozen teacher loaded through transformers' BitsAndBytesConfig (LLM.int8() or 4-bit
                          NormalFloat linears; embeddings, norms and lm_head stay in floating point)
    grad_checkpointing    transformers' activation checkpointing of every decoder block, engaged only inside a
                          whole-model forward with gradients (e2e stages, act stages with objective e2e, qat finetune)

Measured (peak memory, tokens/s, the quantized teachers' own perplexity) in docs/FINETUNE.md.
"""
from __future__ import annotations

import logging
from functools import cache

import torch
from torch import nn

from qat.distill.recipe import RecipeError


def silence_bitsandbytes() -> None:
    """bitsandbytes logs about optional hub kernels and, on every int8 call, about casting fp32 inputs to fp16; none of
    it is actionable here (its errors still show)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@cache
def bnb_teacher_usable(precision: str, device_type: str) -> str | None:
    """None when bitsandbytes can run an int8/nf4 linear on this device type, else the reason it cannot."""
    try:
        silence_bitsandbytes()
        import bitsandbytes as bnb

        lin = nn.Linear(64, 64)
        if precision == "int8":
            q = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
            q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        q = q.to(device_type)
        y = q(torch.randn(2, 64, device=device_type))
        if not torch.isfinite(y).all():
            return "a test forward produced non-finite values"
        return None
    except Exception as e:  # noqa: BLE001  (ImportError, missing native library, no kernel for this device...)
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def check_teacher_precision(precision: str, device: torch.device | str) -> None:
    """One-line error when bitsandbytes cannot run the requested teacher precision on this device."""
    if precision == "fp":
        return
    dev = torch.device(device).type
    why = bnb_teacher_usable(precision, dev)
    if why is not None:
        raise RecipeError(f"memory.teacher {precision}: bitsandbytes cannot run {precision} layers on {dev} ({why}); "
                          "it runs them on CUDA GPUs and on x86-64 CPUs (bitsandbytes >= 0.46)")


def check_memory(memory, optimizer_names, device: torch.device | str) -> None:
    """Every memory switch of a run against its device, before any model is loaded."""
    from qat.distill.optim import check_optimizer

    memory.validate()
    check_teacher_precision(memory.teacher, device)
    for name in optimizer_names:
        check_optimizer(name, device)


def load_teacher(model_dir, device: torch.device | str, precision: str = "fp") -> nn.Module:
    """The frozen teacher in eval mode: floating point, or its linears in bitsandbytes int8 / nf4."""
    from qat.models.loading import load_fp_model, resolve_model_dir

    if precision == "fp":
        model = load_fp_model(model_dir, device=device)
    else:
        check_teacher_precision(precision, device)
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        if precision == "int8":
            cfg = BitsAndBytesConfig(load_in_8bit=True)
        else:
            cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_compute_dtype=torch.float32)
        dev = torch.device(device)
        silence_bitsandbytes()
        model = AutoModelForCausalLM.from_pretrained(
            str(resolve_model_dir(model_dir)), quantization_config=cfg, dtype=torch.float32, device_map={"": dev},
            local_files_only=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ---- activation checkpointing ---------------------------------------------------------------------------------------

class ActivationCheckpointing:
    """transformers' activation checkpointing of every decoder block, for whole-model forwards only.

    transformers checkpoints a GradientCheckpointingLayer only while that layer's own `training` flag is set, but the
    distillation and fine-tuning steps keep every module in eval mode (no dropout; quantizers pick their own mode).
    So the flag is raised on the block object alone (not its children) for the duration of a call that happens inside
    the top-level model's forward with gradients on; block-wise stages, which call blocks directly, are untouched.
    """

    def __init__(self, model: nn.Module):
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.model = model
        model.activation_checkpointing_enable()  # use_reentrant=False: frozen embeddings need no input grads
        self.blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no checkpointable decoder blocks")
        self._depth = 0
        self._handles = [model.register_forward_pre_hook(self._enter), model.register_forward_hook(self._leave)]
        for b in self.blocks:
            self._handles.append(b.register_forward_pre_hook(self._block_enter))
            self._handles.append(b.register_forward_hook(self._block_leave))

    def _enter(self, *_):
        self._depth += 1

    def _leave(self, *_):
        self._depth -= 1

    def _block_enter(self, block, _args):
        block._qat_was_training = block.training
        block.training = bool(self._depth and torch.is_grad_enabled())

    @staticmethod
    def _block_leave(block, _args, _out):
        block.training = block._qat_was_training

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.model.activation_checkpointing_disable()

