"""`qat finetune` options: one dataclass, parsed by jsonargparse like `qat distill` recipes (a YAML file via --config
and the command line accept the same keys), validated here before any model is loaded.

The training step itself is stage 2 of `qat distill` (qat/distill/e2e.py) with `train` = the LoRA parameters: the
loss (ce | kl | reverse_kl | cakld, + ce_weight, + hidden_weight), the optimizer factory, the seeded batch order and
the NaN guard are the distillation ones.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from qat.config import from_dict
from qat.distill.recipe import EvalSpec, LossSpec, MemorySpec, OptimSpec, RecipeError, StageSpec

TEACHER_LOSSES = ("kl", "reverse_kl", "cakld")


@dataclass
class LoraSpec:
    """The adapter (peft LoraConfig).

    r, alpha   rank and scale (the branch is multiplied by alpha / r)
    dropout    dropout on the LoRA branch's input
    targets    module names (suffixes, peft's target_modules) or one regular expression; None = every quantized linear
    qalora     QA-LoRA: the branch reads its input averaged over each quantization group (peft's use_qalora with
               qalora_group_size = the student's group size), so `qat merge` can fold it into the zero points exactly;
               uniform weight formats with weight-only quantization
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] | str | None = None
    qalora: bool = False


def _default_optim() -> OptimSpec:
    return OptimSpec(default_lr=2e-4, schedule="cosine", warmup=0.05)


@dataclass
class FinetuneRecipe:
    """A `qat finetune` run. Paths are relative to the working directory; $VARS and ~ are expanded.

    model       the frozen low-bit base: a student checkpoint (qat ptq / qat distill) or a native export
    data        training text (any file qat eval reads); `num_samples` windows of `seq_len` tokens at seeded offsets
    output      the adapter directory written at the end (peft format + qat_adapter.json)
    teacher     an FP model directory: distill the adapter model against it (loss kl by default) instead of ce
    run_dir     Lightning checkpoints and TensorBoard logs (default: <output>.run)
    """

    model: str | None = None
    data: str | None = None
    output: str | None = None
    teacher: str | None = None
    run_dir: str | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    seq_len: int = 512
    num_samples: int = 256
    steps: int | None = None
    epochs: float | None = 1.0
    batch_size: int = 4
    loss: LossSpec = field(default_factory=LossSpec)
    optim: OptimSpec = field(default_factory=_default_optim)
    eval: EvalSpec = field(default_factory=EvalSpec)
    memory: MemorySpec = field(default_factory=MemorySpec)
    seed: int = 0
    device: str = "auto"
    precision: str = "32-true"
    checkpoint_every: int = 50
    progress: bool = True

    def validate(self) -> FinetuneRecipe:
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise RecipeError(f"qat finetune needs --{name}")
        for name in ("model", "data", "output", "teacher", "run_dir"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, _expand(v))
        if self.eval.file is not None:
            self.eval.file = _expand(self.eval.file)
        lo = self.lora
        if lo.r < 1 or not lo.alpha > 0 or not 0 <= lo.dropout < 1:
            raise RecipeError(f"lora needs r >= 1, alpha > 0 and 0 <= dropout < 1, got r={lo.r}, alpha={lo.alpha}, "
                              f"dropout={lo.dropout}")
        if self.steps is not None and self.epochs is not None:
            self.epochs = None  # --steps on the command line replaces the default budget of one epoch
        if self.loss.kind is None:
            self.loss.kind = "kl" if self.teacher else "ce"
        needs_teacher = self.loss.kind in TEACHER_LOSSES or self.loss.hidden_weight > 0
        if needs_teacher and not self.teacher:
            raise RecipeError(f"loss {self.loss.kind}{' with hidden_weight' if self.loss.hidden_weight else ''} "
                              "distills against a teacher: pass --teacher FP_DIR (or use --loss.kind ce)")
        if self.seq_len < 2 or self.num_samples < 1:
            raise RecipeError("need seq_len >= 2 and num_samples >= 1")
        if self.checkpoint_every < 1:
            raise RecipeError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.precision not in ("32-true", "bf16-mixed", "bf16-true"):
            raise RecipeError(f"unknown precision {self.precision!r}; use 32-true, bf16-mixed or bf16-true")
        if self.eval.max_tokens < self.eval.seq_len:
            raise RecipeError(f"eval.max_tokens {self.eval.max_tokens} is less than one window of {self.eval.seq_len}")
        self.memory.validate()
        self.stage_spec()  # budget, loss and optimizer checks of the distillation stage it runs
        return self

    def stage_spec(self) -> StageSpec:
        """The end-to-end distillation stage this run is: train the LoRA parameters with the deployed forward
        (activation quantizers on)."""
        from qat.finetune.lora import LORA_SELECTOR

        spec = StageSpec(kind="e2e", name="lora", train=[LORA_SELECTOR], loss=dataclasses.replace(self.loss),
                         optim=dataclasses.replace(self.optim), steps=self.steps, epochs=self.epochs,
                         batch_size=self.batch_size, act_quant=True)
        spec.validate(0)
        return spec

    def resolved_run_dir(self) -> str:
        return self.run_dir or self.output.rstrip("/") + ".run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _expand(p: str) -> str:
    return os.path.expanduser(os.path.expandvars(str(p)))


def build_parser(prog: str = "qat finetune"):
    from qat.args import run_parser

    p = run_parser(prog, (
        "Train a peft LoRA adapter on a frozen low-bit model (student checkpoint or native export): next-token CE on "
        "--data, or KD against --teacher. Writes a peft adapter directory (--output)."), "options as YAML")
    p.add_class_arguments(FinetuneRecipe, nested_key=None, fail_untyped=False)
    return p


def parse_args(argv: list[str]) -> tuple[FinetuneRecipe, dict[str, Any]]:
    """(validated FinetuneRecipe, {'resume', 'overwrite'}) from a command line."""
    from jsonargparse import ArgumentError

    from qat.args import argument_error

    try:
        d = build_parser().parse_args(list(argv)).as_dict()
    except ArgumentError as e:
        raise argument_error(e, "recipe", RecipeError) from None
    d.pop("config", None)
    extra = {"resume": d.pop("resume", None), "overwrite": bool(d.pop("overwrite", False))}
    return recipe_from_dict(d), extra


def recipe_from_dict(d: dict[str, Any]) -> FinetuneRecipe:
    return from_dict(FinetuneRecipe, d, "finetune", RecipeError).validate()
