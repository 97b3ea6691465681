"""Distillation recipes: dataclasses that describe a whole `qat distill` run and validate themselves.

A Recipe names the teacher model, the quant spec, how the student starts (PTQ init or an existing PTQ student
checkpoint), the training data (a text corpus, or sequences sampled from the teacher and cached to disk), the held-out
text for per-stage perplexity, and an ordered list of stages. Each StageSpec declares its kind (blockwise | e2e | act:
a class registered in qat/distill/stage.py, which validates its part of the spec), which parameter classes train (see
qat/distill/params.py), its loss, its optimizer/schedule and its step budget.

This file is the schema: the field docs below are what `qat distill --help` shows. Recipes are YAML files
(configs/<model>/<method>.yaml) read by qat/distill/recipe_cli.py through the same jsonargparse parser the command line
uses (so a file and the command line accept exactly the same keys) and validated here: every problem is one
RecipeError line naming the stage and the field, raised before any model is loaded.
"""
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from qat.config import QuantConfigError, QuantSpec

UNIT_KINDS = ("block", "acbq")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit")
TEACHER_PRECISIONS = ("fp", "int8", "nf4")
SCHEDULES = ("cosine", "linear", "constant")
PTQ_METHODS = ("rtn", "gptq")
DATA_SOURCES = ("text", "teacher", "mixed")
STRATEGIES = ("auto", "ddp", "fsdp")
PARAM_CLASSES = ("latent", "bias", "wq", "act", "norms", "embed", "head")


class RecipeError(QuantConfigError):
    """A recipe that cannot run (unknown stage kind or loss, bad budget, a student of another format...)."""


def check_selector(sel: str, where: str) -> None:
    """A `train` entry: a parameter class, a class leaf ('wq.scale', 'act.clip_max_logit') or 're:<regex>'."""
    if sel.startswith("re:"):
        try:
            re.compile(sel[3:])
        except re.error as e:
            raise RecipeError(f"{where}: bad regular expression {sel!r} ({e})") from None
        return
    head, _, leaf = sel.partition(".")
    if head not in PARAM_CLASSES or (leaf and head not in ("wq", "act")):
        raise RecipeError(f"{where}: unknown parameter class {sel!r}; known: {', '.join(PARAM_CLASSES)}, "
                          "wq.<name> / act.<name> for one quantizer parameter, or re:<regex> on parameter names")


@dataclass
class PTQInit:
    """How the student is initialised when no existing student checkpoint is given.

    Attributes:
        method: rtn | gptq (block-sequential, qat.ptq.pipeline.ptq_quantize)
        calib_samples: calibration windows (sampled from data.train_file, or the teacher-generated pool)
        seq_len: calibration window length
        act_order: GPTQ (uniform formats): columns in decreasing Hessian-diagonal order (better at every width)
        damp: GPTQ: damping as a fraction of mean(diag H)
    """

    method: str = "gptq"
    calib_samples: int = 64
    seq_len: int = 512
    act_order: bool = True
    damp: float = 0.01


@dataclass
class DataSpec:
    """Training windows, shared by every stage.

    Attributes:
        source: text: `num_samples` windows of `seq_len` tokens at seeded random offsets of `train_file`;
            teacher: `num_samples` sequences sampled from the teacher (BitDistiller-style), prompted with the first
            `prompt_len` tokens of a train_file window (or the bos token alone), cached on disk; mixed: both,
            `teacher_fraction` of the windows from the teacher, interleaved so that every prefix of the pool (a
            block-wise stage's `samples`, the PTQ calibration set) holds the same mix
        teacher_fraction: mixed: the fraction of windows sampled from the teacher
        train_file: training text (.txt/.raw/.jsonl)
        seq_len: tokens per window
        num_samples: windows in the pool
        prompt_len: teacher samples: prompt tokens taken from a train_file window
        temperature: teacher samples: sampling temperature
        top_p: teacher samples: nucleus sampling threshold
        gen_batch_size: teacher samples: sequences generated at once
        cache_dir: where teacher samples are cached (default: <run_dir>/data)
    """

    source: str = "text"
    teacher_fraction: float = 0.5
    train_file: str | None = None
    seq_len: int = 512
    num_samples: int = 128
    prompt_len: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    gen_batch_size: int = 16
    cache_dir: str | None = None


@dataclass
class EvalSpec:
    """Validation perplexity of the student before stage 1 (unless initial is false) and after every stage.

    Attributes:
        file: held-out text (None = no evaluation)
        max_tokens: tokens evaluated
        seq_len: window length
        batch_size: windows per forward
        initial: also evaluate the student before the first stage
    """

    file: str | None = None
    max_tokens: int = 4096
    seq_len: int = 512
    batch_size: int = 4
    initial: bool = True


@dataclass
class LossSpec:
    """Stage loss.

    Attributes:
        kind: blockwise/act: mse | token_mse (per-token MSE divided by the teacher token's mean square, so the
            attention-sink position cannot dominate) | cosine (1 - cos per token); e2e: kl (KL(teacher||student)) |
            reverse_kl | cakld (BitDistiller) | ce (next-token CE); None = token_mse for block-wise objectives, kl
            for e2e
        sink_weight: block losses: weight of sequence position 0 (the attention sink); 0 leaves it out
        cosine_weight: block losses: + w * (1 - cos(student, teacher)) per token
        hidden_weight: e2e: + w * token_mse over every block's output hidden state
        ce_weight: e2e: + w * next-token cross-entropy on the data (mix with a KL loss)
        temperature: e2e: softmax temperature of the KL terms (multiplied back by T^2)
        cross_unit_weight: block-wise (ACBQ): + w * loss on the outputs of the next `cross_units` units, run with
            their current quantized parameters (gradients reach only the active window)
        cross_units: block-wise (ACBQ): how many following units cross_unit_weight looks at
        adaptive_cross: scale cross_unit_weight by clip(e_unit / mean e, 0.5, 2), e = the unit's loss at its first
            step
        homologous: block-wise (CBQ): also reconstruct the target from the teacher's (FP-path) window input
    """

    kind: str | None = None
    sink_weight: float = 1.0
    cosine_weight: float = 0.0
    hidden_weight: float = 0.0
    ce_weight: float = 0.0
    temperature: float = 1.0
    cross_unit_weight: float = 0.0
    cross_units: int = 1
    adaptive_cross: bool = True
    homologous: bool = False


@dataclass
class MemorySpec:
    """Memory savers (measured in docs/FINETUNE.md).

    Attributes:
        teacher: fp | int8 (bitsandbytes LLM.int8()) | nf4 (bitsandbytes 4-bit NormalFloat): the frozen teacher used
            for training targets; the student is still initialised from the FP weights
        grad_checkpointing: recompute each decoder block's activations in the backward pass of whole-model forwards
            (e2e stages, act stages with objective e2e, qat finetune) instead of storing them
    """

    teacher: str = "fp"
    grad_checkpointing: bool = False

    def validate(self) -> None:
        if self.teacher not in TEACHER_PRECISIONS:
            raise RecipeError(f"unknown memory.teacher {self.teacher!r}; supported: {', '.join(TEACHER_PRECISIONS)}")


@dataclass
class OptimSpec:
    """AdamW, or bitsandbytes' 8-bit AdamW (adamw8bit: falls back to AdamW with a warning where it cannot run) or paged
    AdamW (paged_adamw, paged_adamw8bit: optimizer state in CUDA unified memory, so CUDA devices only).

    Attributes:
        name: adamw | adamw8bit | paged_adamw | paged_adamw8bit
        lr: learning rate per `train` entry (e.g. {latent: 2e-5, wq: 1e-4}); entries not listed use default_lr
        default_lr: learning rate of the `train` entries lr does not list
        weight_decay: AdamW weight decay
        betas: AdamW betas
        eps: AdamW epsilon
        schedule: cosine | linear | constant, after `warmup` steps
        warmup: warmup steps (a value < 1 is a fraction of the budget)
        min_lr_ratio: the schedule's final learning rate as a fraction of the peak
        grad_clip: max gradient norm (0 = off)
    """

    name: str = "adamw"
    lr: dict[str, float] = field(default_factory=dict)
    default_lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup: float = 0.0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0


@dataclass
class PolarizeSpec:
    """binary11 bitmap polarization (LBLLM WAT): + weight * mean_layers(L_reg(beta)), beta annealed start -> end
    linearly over each window (blockwise) or the stage (e2e); bitmaps are hardened when their window/stage ends.

    Attributes:
        weight: weight of the polarization loss (0 = off)
        beta_start: beta at the start of each window / stage
        beta_end: beta at its end
        harden: snap the bitmaps to {0, 1} when their window / stage ends
    """

    weight: float = 0.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    harden: bool = True


@dataclass
class RoundingSpec:
    """Learned rounding of uniform weights in a block-wise stage (qat/distill/rounding.py).

    Attributes:
        method: none | signround (AutoRound: offsets V in [-range, range] and clipping factors, signed gradient
            descent) | adaround (soft up/down rounding on the quantizer's grid, Adam, regulariser to 0/1; hard at
            the end)
        lr: signround: signed-gradient step (None = 1 / max(steps per window, 50): a parameter moves at most 1/2
            over a window of 50 steps or more); adaround: Adam's lr (None = 1e-3)
        minmax: signround: also learn the clipping range (min/max factors per group)
        minmax_lr: signround: step of the clipping factors (None = lr)
        range: signround: bound of the rounding offsets, in grid steps
        best: signround: keep the parameters of the window's lowest-loss step (AutoRound's "best mse")
        reg_weight: adaround: weight of the rounding regulariser
    """

    method: str = "none"
    lr: float | None = None
    minmax: bool = True
    minmax_lr: float | None = None
    range: float = 0.5
    best: bool = True
    reg_weight: float = 0.01

    @property
    def enabled(self) -> bool:
        return self.method != "none"


@dataclass
class StageSpec:
    """One distillation stage.

    Attributes:
        kind: blockwise (stage 1) | e2e (stage 2) | act (stage 3: activation factors, weights frozen), or another
            kind registered in qat/distill/stage.py
        name: shown in logs and the history (default: <kind><index>)
        train: parameter classes that train (None = the kind's default: blockwise latent+wq, e2e wq, act act)
        loss: the stage loss
        optim: optimizer and schedule
        steps: budget in optimizer steps (blockwise: per window); exactly one of steps and epochs
        epochs: budget in passes over the windows
        batch_size: windows per optimizer step
        samples: blockwise/act: how many data windows are cached as the calibration set (None = all)
        units: blockwise: block (a decoder block per unit) | acbq (attention and MLP as separate units)
        window: units trained jointly (CBQ's k)
        overlap: units shared by consecutive windows (CBQ's s)
        act_quant: run the activation quantizers during this stage (None = only in act stages)
        objective: act stages: blockwise (LBLLM AAR, layer-wise reconstruction) | e2e (logit distillation)
        polarize: binary11 bitmap polarization
        act_temperature: act stages: [start, end] of the knee soft-mask temperature, annealed geometrically
        spill_mb: blockwise: activation caches larger than this live in a file under the run directory
        freeze_codes: uniform formats: hold the integer codes fixed while scales/zeros train (EfficientQAT E2E-QP);
            needed to train step sizes of a GPTQ-initialised student at all (see qat/distill/codes.py)
        rounding: blockwise, uniform formats: learn the rounding and clipping of each window (SignRound/AutoRound)
        window_eval: blockwise: also measure each window's loss over the whole calibration set before and after it
            trains (diagnostics in the history; costs about one extra pass per window)
    """

    kind: str = "blockwise"
    name: str | None = None
    train: list[str] | None = None
    loss: LossSpec = field(default_factory=LossSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4
    samples: int | None = None
    units: str = "block"
    window: int = 1
    overlap: int = 0
    act_quant: bool | None = None
    objective: str = "blockwise"
    polarize: PolarizeSpec = field(default_factory=PolarizeSpec)
    act_temperature: list[float] | None = None
    spill_mb: float = 2048.0
    freeze_codes: bool = False
    rounding: RoundingSpec = field(default_factory=RoundingSpec)
    window_eval: bool = False

    def validate(self, i: int) -> None:
        from qat.distill.stage import stage_kind, stage_kinds

        w = f"stage {i}" + (f" ({self.name})" if self.name else "")
        kind = stage_kind(self.kind, w)
        self.name = self.name or f"{self.kind}{i}"
        if self.train is None:  # a window that learns its rounding trains nothing else by default
            self.train = [] if self.rounding.enabled else list(kind.default_train)
        if not self.train and not self.rounding.enabled:
            raise RecipeError(f"{w}: train lists no parameters")
        for sel in self.train:
            check_selector(sel, w)
        if self.freeze_codes and any(s in ("latent", "re:.*") for s in self.train):
            raise RecipeError(f"{w}: freeze_codes holds the integer codes fixed, so latent weights get no gradient; "
                              "remove 'latent' from train")
        defaults = StageSpec()
        for opt in sorted({o for k in stage_kinds().values() for o in k.options} - set(kind.options)):
            if getattr(self, opt) != getattr(defaults, opt):
                owners = [k.kind for k in stage_kinds().values() if opt in k.options]
                raise RecipeError(f"{w}: {opt} only applies to {' / '.join(owners)} stages")
        kind.validate_spec(self, w)
        block_objective = kind.block_objective(self)
        losses = kind.losses(self)
        if self.loss.kind is None:
            self.loss.kind = losses[0]
        if self.loss.kind not in losses:
            raise RecipeError(f"{w}: unknown loss {self.loss.kind!r} for "
                              f"{'a block-wise' if block_objective else 'an end-to-end'} objective; supported: "
                              f"{', '.join(losses)}")
        if (self.steps is None) == (self.epochs is None):
            raise RecipeError(f"{w}: give exactly one of steps or epochs")
        if self.steps is not None and self.steps < 1:
            raise RecipeError(f"{w}: steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise RecipeError(f"{w}: epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise RecipeError(f"{w}: batch_size must be >= 1, got {self.batch_size}")
        if self.samples is not None and self.samples < 1:
            raise RecipeError(f"{w}: samples must be >= 1, got {self.samples}")
        if self.units not in UNIT_KINDS:
            raise RecipeError(f"{w}: unknown units {self.units!r}; supported: {', '.join(UNIT_KINDS)}")
        if self.window < 1 or not 0 <= self.overlap < self.window:
            raise RecipeError(f"{w}: need window >= 1 and 0 <= overlap < window, got window={self.window}, "
                              f"overlap={self.overlap}")
        if self.loss.cross_units < 1:
            raise RecipeError(f"{w}: loss.cross_units must be >= 1, got {self.loss.cross_units}")
        if self.loss.sink_weight < 0 or self.loss.cosine_weight < 0 or self.loss.cross_unit_weight < 0:
            raise RecipeError(f"{w}: loss weights must be >= 0")
        if not self.loss.temperature > 0:
            raise RecipeError(f"{w}: loss.temperature must be > 0, got {self.loss.temperature}")
        o = self.optim
        if o.name not in OPTIMIZERS:
            raise RecipeError(f"{w}: unknown optimizer {o.name!r}; supported: {', '.join(OPTIMIZERS)}")
        if o.schedule not in SCHEDULES:
            raise RecipeError(f"{w}: unknown schedule {o.schedule!r}; supported: {', '.join(SCHEDULES)}")
        unknown_lr = sorted(set(o.lr) - set(self.train))
        if unknown_lr:
            raise RecipeError(f"{w}: optim.lr names {unknown_lr}, which are not in train {self.train}")
        if any(not v >= 0 for v in [*o.lr.values(), o.default_lr]):
            raise RecipeError(f"{w}: learning rates must be >= 0")
        if len(o.betas) != 2:
            raise RecipeError(f"{w}: optim.betas needs two values, got {o.betas}")
        if o.warmup < 0 or not 0 <= o.min_lr_ratio <= 1 or o.grad_clip < 0:
            raise RecipeError(f"{w}: need warmup >= 0, 0 <= min_lr_ratio <= 1, grad_clip >= 0")
        if self.polarize.weight < 0 or not (self.polarize.beta_start > 0 and self.polarize.beta_end > 0):
            raise RecipeError(f"{w}: polarize needs weight >= 0 and positive betas")

    @property
    def block_objective(self) -> bool:
        from qat.distill.stage import stage_kind

        return stage_kind(self.kind).block_objective(self)

    @property
    def acts_on(self) -> bool:
        from qat.distill.stage import stage_kind

        return stage_kind(self.kind).quantizes_acts if self.act_quant is None else bool(self.act_quant)

    def steps_for(self, n_windows_of_data: int) -> int:
        """Optimizer steps (per window for block-wise objectives) for a pool of `n_windows_of_data` sequences."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * n_windows_of_data / self.batch_size))


@dataclass
class Recipe:
    """A `qat distill` run. Paths are relative to the working directory; $VARS and ~ are expanded.

    Attributes:
        model: local HF model directory: the frozen FP teacher and the student's architecture
        student: an existing PTQ student checkpoint (qat ptq) to start from instead of `ptq`
        output: the student checkpoint directory written at the end (the run's state lives in run_dir)
        run_dir: Lightning checkpoints, TensorBoard logs, caches (default: <output>.run)
        quant: the quant spec (qat.config.QuantSpec); may be omitted when `student` is given
        ptq: how the student is initialised
        data: training windows
        eval: validation perplexity
        stages: the stages, in order
        memory: memory savers
        seed: seed of data sampling and initialisation
        device: auto | cpu | cuda[:i]
        devices: processes per node: an int, or auto (what torchrun / SLURM started per node, else 1); more than
            one without a launcher: Lightning starts them on this machine (docs/SCALING.md)
        num_nodes: nodes of the run (must match the launch environment)
        strategy: auto (one process: plain; several: ddp) | ddp (every process holds the whole student, gradients
            averaged) | fsdp (FSDP2: student and teacher sharded over the processes)
        dist_timeout: seconds a process waits in a collective for the others before it stops with an error
        precision: 32-true | bf16-mixed | bf16-true
        checkpoint_every: optimizer steps between Lightning checkpoints
        progress: show progress bars
    """

    model: str | None = None
    student: str | None = None
    output: str | None = None
    run_dir: str | None = None
    quant: QuantSpec | None = None
    ptq: PTQInit = field(default_factory=PTQInit)
    data: DataSpec = field(default_factory=DataSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    stages: list[StageSpec] = field(default_factory=list)
    memory: MemorySpec = field(default_factory=MemorySpec)
    seed: int = 0
    device: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    dist_timeout: float = 1800.0
    precision: str = "32-true"
    checkpoint_every: int = 100
    progress: bool = True

    def validate(self) -> "Recipe":
        if not self.stages:
            raise RecipeError("recipe has no stages")
        for i, s in enumerate(self.stages):
            s.validate(i)
        if self.quant is None and self.student is None:
            raise RecipeError("recipe needs a quant spec (quant:) or an existing student checkpoint (--student)")
        self.memory.validate()
        if self.ptq.method not in PTQ_METHODS:
            raise RecipeError(f"unknown PTQ method {self.ptq.method!r}; supported: {', '.join(PTQ_METHODS)}")
        if self.ptq.calib_samples < 1 or self.ptq.seq_len < 2:
            raise RecipeError("ptq needs calib_samples >= 1 and seq_len >= 2")
        d = self.data
        if d.source not in DATA_SOURCES:
            raise RecipeError(f"unknown data source {d.source!r}; supported: {', '.join(DATA_SOURCES)}")
        if d.source in ("text", "mixed") and not d.train_file:
            raise RecipeError(f"data.source {d.source} needs data.train_file")
        if d.source == "mixed" and not 0 < d.teacher_fraction < 1:
            raise RecipeError(f"data.teacher_fraction must be in (0, 1), got {d.teacher_fraction}")
        if d.seq_len < 2 or d.num_samples < 1:
            raise RecipeError("data needs seq_len >= 2 and num_samples >= 1")
        if d.source in ("teacher", "mixed") and not 0 <= d.prompt_len < d.seq_len:
            raise RecipeError(f"data.prompt_len must be in [0, seq_len), got {d.prompt_len}")
        if self.eval.max_tokens < self.eval.seq_len:
            raise RecipeError(f"eval.max_tokens {self.eval.max_tokens} is less than one window of {self.eval.seq_len}")
        if self.strategy not in STRATEGIES:
            raise RecipeError(f"unknown strategy {self.strategy!r}; supported: {', '.join(STRATEGIES)}")
        if self.devices != "auto" and not (isinstance(self.devices, int) and self.devices >= 1):
            raise RecipeError(f"devices must be a positive number of processes per node or auto, got {self.devices!r}")
        if self.num_nodes < 1:
            raise RecipeError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if not self.dist_timeout > 0:
            raise RecipeError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.checkpoint_every < 1:
            raise RecipeError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        # 16-mixed is left out on purpose: its GradScaler only works with optimizers Lightning owns
        if self.precision not in ("32-true", "bf16-mixed", "bf16-true"):
            raise RecipeError(f"unknown precision {self.precision!r}; use 32-true, bf16-mixed or bf16-true")
        if self.quant is not None:
            self.check_spec(self.quant)
        for name in ("model", "student", "output", "run_dir"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, _expand(v))
        for obj, name in ((d, "train_file"), (d, "cache_dir"), (self.eval, "file")):
            v = getattr(obj, name)
            if v is not None:
                setattr(obj, name, _expand(v))
        return self

    def check_spec(self, spec: QuantSpec) -> None:
        """Stage options that depend on the number format (also run on a --student checkpoint's spec)."""
        from qat.distill.stage import stage_kind

        for i, s in enumerate(self.stages):
            if s.freeze_codes and (spec.weight.format != "uniform" or spec.weight.lwc or spec.weight.float_zero):
                raise RecipeError(f"stage {i} ({s.name}): freeze_codes needs the uniform format with free "
                                  f"scale/zero (not lwc or float_zero), the spec is {spec.describe()}")
            stage_kind(s.kind).check_quant(s, spec, f"stage {i} ({s.name})")

    def quant_spec(self) -> QuantSpec | None:
        return self.quant

    def resolved_run_dir(self) -> str:
        if self.run_dir:
            return self.run_dir
        if not self.output:
            raise RecipeError("recipe needs an output directory (--output)")
        return self.output.rstrip("/") + ".run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _expand(p: str) -> str:
    return os.path.expanduser(os.path.expandvars(str(p)))
