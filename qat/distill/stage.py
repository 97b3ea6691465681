"""What every stage shares: the run context, the optimizer step with its gradient average over processes and its
NaN guard, and the binary11 bitmap helpers (polarization, hardening).

A stage kind is one Stage subclass registered by name (@register_stage; `stage_kind(name)` looks it up): its
class methods are the kind's part of the recipe (default `train`, the losses it accepts, whether its objective is
block-wise, the StageSpec options only it takes and their checks), and its instances run. Built in: blockwise
(blockwise.py), e2e (e2e.py), act (act.py). The LightningModule (qat/distill/module.py) builds each stage with
`stage_kind(spec.kind).build(ctx, spec, index)` and drives it one optimizer step at a time:
    begin(state)    build caches/optimizer; `state` is the stage's own state_dict() when resuming mid-stage
    train_step(rows) one optimizer step on the pool rows this process was given (qat/data/module.py decides which)
                    -> {"loss": float (averaged over the processes), "tokens": int (this process's)}
    done            True once the budget is spent;  end(): finish (harden bitmaps, free caches)
    state_dict()    everything needed to continue bit-exactly: position, optimizer + scheduler state
    where()         the position in words, for errors and the checkpoint
Optional, with defaults here: before_step(), position() (window, step in it), progress(), window_log,
activation_stores().
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from qat.config import QuantSpec
from qat.dist import SINGLE, Dist
from qat.distill import params as P
from qat.distill.optim import build_optimizer, build_scheduler
from qat.distill.recipe import RecipeError, StageSpec
from qat.nn import QuantLinear

if TYPE_CHECKING:
    from qat.distill.cache import ActivationStore

# the loss kinds of qat/distill/losses.py, each list's default first
BLOCK_LOSSES = ("token_mse", "mse", "cosine")  # block_loss: block-wise objectives
E2E_LOSSES = ("kl", "reverse_kl", "cakld", "ce")  # logits_loss: end-to-end objectives


def _is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


class NonFiniteLossError(RuntimeError):
    """The loss (or its gradient) became NaN/inf; names the stage, window/block and step."""


@dataclass
class DistillContext:
    """Everything the stages share."""

    student: nn.Module
    teacher: nn.Module
    adapter: Any
    spec: QuantSpec
    train_ids: torch.Tensor  # [N, L] int64 training windows, the pool (CPU)
    device: torch.device
    run_dir: Path
    seed: int = 0
    designed: dict[str, bool] = field(default_factory=dict)  # trainable by design, snapshot at run start
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward()
    optimizer_step: Callable[[torch.optim.Optimizer], None] = lambda opt: opt.step()
    dist: Dist = SINGLE  # the processes of the run (qat/dist.py)
    plan: Any = None  # qat.data.module.StepPlan: which pool rows each stage trains on, on this process
    sharded: bool = False  # FSDP: parameters are sharded and FSDP averages their gradients in backward
    last_checkpoint: Callable[[], str | None] = lambda: None
    act_bypass: P.ActBypass | None = None
    infer_batch: int = 8  # rows per no-grad forward when propagating caches (fixed: resume replays the same chunks)

    def __post_init__(self):
        self.classes = P.classify(self.student)
        if self.act_bypass is None:
            self.act_bypass = P.ActBypass(self.student)


def stage_seed(base: int, stage: int, window: int = 0) -> int:
    return base * 1_000_003 + stage * 10_007 + window


_KINDS: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make `cls` the stage kind named `cls.kind` (recipes say `kind: <name>`)."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind name")
    if _KINDS.get(cls.kind, cls) is not cls:
        raise ValueError(f"stage kind {cls.kind!r} is already registered by {_KINDS[cls.kind].__name__}")
    _KINDS[cls.kind] = cls
    return cls


def _builtin_kinds() -> None:
    import qat.distill.act  # noqa: F401  (each module registers its kind; act imports blockwise and e2e)


def stage_kinds() -> dict[str, type[Stage]]:
    """name -> stage class, the built-in kinds first, then any registered since."""
    _builtin_kinds()
    return dict(_KINDS)


def stage_kind(name: str, where: str = "recipe") -> type[Stage]:
    """The stage class registered as `name` (a RecipeError naming the known kinds, prefixed by `where`)."""
    kinds = stage_kinds()
    if name not in kinds:
        raise RecipeError(f"{where}: unknown stage kind {name!r}; supported: {', '.join(kinds)}")
    return kinds[name]


class Stage(ABC):
    """One stage kind. Subclasses set `kind`, implement the abstract methods, and override the class methods of
    their recipe part where the defaults (an end-to-end objective, `train: [wq]`) do not fit."""

    kind: ClassVar[str] = ""
    default_train: ClassVar[tuple[str, ...]] = ("wq",)  # the `train` list when the recipe gives none
    # StageSpec fields only this kind takes: set on a stage of another kind they are an error
    options: ClassVar[tuple[str, ...]] = ()
    quantizes_acts: ClassVar[bool] = False  # runs the activation quantizers when the spec leaves act_quant unset

    # ---- the kind's part of the recipe (class methods: run while the recipe is validated, before any model) -------
    @classmethod
    def block_objective(cls, spec: StageSpec) -> bool:
        """True when the stage reconstructs block outputs on cached calibration windows (the step plan then has
        windows of units, qat.distill.run.step_plan); False for a whole-model objective on the pool."""
        return False

    @classmethod
    def losses(cls, spec: StageSpec) -> tuple[str, ...]:
        """The loss kinds this stage accepts, the default first."""
        return BLOCK_LOSSES if cls.block_objective(spec) else E2E_LOSSES

    @classmethod
    def validate_spec(cls, spec: StageSpec, where: str) -> None:
        """Checks of the options this kind reads (raise RecipeError). StageSpec.validate calls it once `train` is
        filled in and options of other kinds are refused, before the loss kind is checked against losses()."""
        return None  # nothing kind-specific by default

    @classmethod
    def check_quant(cls, spec: StageSpec, quant, where: str) -> None:
        """Checks against the run's QuantSpec (also a --student checkpoint's), RecipeError."""
        return None

    @classmethod
    def build(cls, ctx: DistillContext, spec: StageSpec, index: int) -> Stage:
        """The stage object for stage `index` (a kind with variants picks one here)."""
        return cls(ctx, spec, index)

    # ---- a running stage --------------------------------------------------------------------------------------
    def __init__(self, ctx: DistillContext, spec: StageSpec, index: int):
        self.ctx, self.spec, self.index = ctx, spec, index
        self.opt: torch.optim.Optimizer | None = None
        self.sched = None
        self.params: list[nn.Parameter] = []
        self.param_names: list[str] = []
        self.last_loss = self.last_main = float("nan")
        self.frozen = None  # FrozenCodes while a freeze_codes stage/window runs
        self.rounding = None  # SignRound while a window learns its rounding (rounding.py)
        self.window_log: list[dict] = []  # one entry per finished window (block-wise), kept in the history

    total_steps: int = 0
    step: int = 0  # steps done in this stage

    @abstractmethod
    def begin(self, state: dict | None) -> None: ...

    @abstractmethod
    def train_step(self, rows: torch.Tensor) -> dict: ...

    @abstractmethod
    def end(self) -> None: ...

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def where(self) -> str: ...

    # ---- optional, with defaults --------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Called at the start of every train_step (the act stage anneals its temperature here)."""
        return None

    def position(self) -> tuple[int, int]:
        """(window, step within it) of the next step; the module checks it against the data plan every step and
        logs a window when the first number changes. One window by default."""
        return 0, self.step

    def progress(self) -> dict:
        return {"step": self.step, "total": self.total_steps}

    def activation_stores(self) -> list[ActivationStore]:
        """The activation caches the stage holds (memory accounting, scripts/bench_train.py)."""
        return []

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.spec.name}, {self.spec.kind})"

    # ---- shared machinery ---------------------------------------------------------------------------------------
    def make_trainable(self, prefixes: list[str] | None, total_steps: int, allow_empty: bool = False) -> None:
        """requires_grad only on the selected parameters under `prefixes`; a fresh optimizer + schedule for them
        (none when nothing is selected and `allow_empty`: a window whose only trained state is its rounding)."""
        ctx = self.ctx
        P.freeze_all(ctx.student)
        groups = P.select(ctx.student, self.spec.train, prefixes, ctx.designed, ctx.classes)
        opt_groups, self.params, self.param_names = [], [], []
        for sel, items in groups.items():
            if not items:
                continue
            ps = [p for _, p in items]
            for p in ps:
                p.requires_grad_(True)
            self.params += ps
            self.param_names += [n for n, _ in items]
            opt_groups.append({"params": ps, "lr": self.spec.optim.lr.get(sel, self.spec.optim.default_lr),
                               "name": sel})
        if not opt_groups:
            if allow_empty:
                self.opt = self.sched = None
                return
            raise ValueError(f"{self.where()}: nothing to train (train {self.spec.train} matches no parameter here)")
        self.opt = build_optimizer(opt_groups, self.spec.optim, ctx.device)
        self.sched = build_scheduler(self.opt, self.spec.optim, total_steps)

    def freeze_codes(self, prefixes: list[str] | None, state: dict | None) -> None:
        """freeze_codes: hold the integer codes of the quantized linears under `prefixes` fixed (codes.py)."""
        self.frozen = None
        if not self.spec.freeze_codes:
            return
        from qat.distill.codes import FrozenCodes
        from qat.nn import quant_linears

        mods = {n: m for n, m in quant_linears(self.ctx.student).items()
                if prefixes is None or any(n.startswith(p + ".") for p in prefixes)}
        self.frozen = FrozenCodes(mods).attach(state.get("frozen") if state else None)

    def unfreeze_codes(self) -> None:
        if self.frozen is not None:
            self.frozen.finish()
            self.frozen = None

    def frozen_state(self) -> dict:
        return {"frozen": self.frozen.state_dict()} if self.frozen is not None else {}

    def learn_rounding(self, prefixes: list[str], total_steps: int, state: dict | None) -> None:
        """rounding: the uniform quantizers under `prefixes` learn their rounding and clipping (rounding.py)."""
        self.rounding = None
        if not self.spec.rounding.enabled:
            return
        from qat.distill.rounding import ROUNDING_LEARNERS
        from qat.nn import quant_linears

        mods = {n: m for n, m in quant_linears(self.ctx.student).items() if any(n.startswith(p + ".") for p in prefixes)}
        learner = ROUNDING_LEARNERS[self.spec.rounding.method](mods, self.spec.rounding, total_steps)
        self.rounding = learner.attach(state.get("rounding") if state else None)

    def finish_rounding(self) -> None:
        if self.rounding is not None:
            self.rounding.finish(self.params)
            self.rounding = None

    def rounding_state(self) -> dict:
        return {"rounding": self.rounding.state_dict()} if self.rounding is not None else {}

    def release(self) -> None:
        self.opt, self.sched, self.params, self.param_names = None, None, [], []
        P.freeze_all(self.ctx.student)

    def optimize(self, loss: torch.Tensor, main: torch.Tensor | None = None) -> float:
        """Backward, the gradient average over the processes, (clipped) step, with the NaN guard: a non-finite loss or
        gradient on any process stops every process before the update. Returns the loss averaged over processes.

        The average covers exactly what this stage/window trains, self.params and the rounding learner's parameters
        (a DDP wrapper built once would only see the parameters trainable when it wrapped the model): one all-reduce
        per ~32 MB bucket of their gradients, the loss riding in the last one. Under FSDP the gradients of sharded
        parameters are already averaged by FSDP's reduce-scatter in backward; only those it leaves whole and the loss
        are. `main` (the loss without its extra terms, for the log) is averaged alongside, into self.last_main."""
        ctx = self.ctx
        ctx.backward(loss)
        params = self.params + (self.rounding.parameters() if self.rounding is not None else [])
        grads = [p.grad for p in params if p.grad is not None and not (ctx.sharded and _is_sharded(p))]
        losses = torch.stack([loss.detach(), (loss if main is None else main).detach()]).float()
        value, self.last_main = (float(v) for v in ctx.dist.mean_(grads, losses))
        if not math.isfinite(value):
            self._zero_grad(params)
            raise NonFiniteLossError(self._nan_message("loss", value))
        if self.rounding is not None:
            self.rounding.observe(value, self.params)  # before the step: the parameters that gave this loss
        clip = self.spec.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        if not math.isfinite(norm):
            self._zero_grad(params)
            raise NonFiniteLossError(self._nan_message("gradient norm", norm))
        if self.opt is not None:
            ctx.optimizer_step(self.opt)
            self.sched.step()
        if self.rounding is not None:
            self.rounding.step()
        self._zero_grad(params)
        self.last_loss = value
        return value

    @staticmethod
    def _zero_grad(params: list[torch.Tensor]) -> None:
        for p in params:
            p.grad = None

    def _nan_message(self, what: str, value: float) -> str:
        ckpt = self.ctx.last_checkpoint()
        keep = f"kept the last good checkpoint {ckpt}" if ckpt else "no checkpoint was written yet"
        return f"non-finite {what} ({value}) at {self.where()}; training stopped, {keep}"

    def lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.opt.param_groups)} if self.opt else {}

    def opt_state(self) -> dict:
        """Optimizer + schedule state; under FSDP the optimizer's full (unsharded) state, keyed by parameter name, so a
        resume may shard it over another number of processes (a collective: every process calls it)."""
        if not self.opt:
            return {}
        if self.ctx.sharded and self.opt.state:  # (on an optimizer without state, torch's helper would take a step)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt = get_optimizer_state_dict(self.ctx.student, self.opt,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt = self.opt.state_dict()
        return {"opt": opt, "sched": self.sched.state_dict()}

    def load_opt_state(self, s: dict) -> None:
        if s.get("opt") is None:
            return
        if self.ctx.sharded and s["opt"]["state"]:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.ctx.student, self.opt, s["opt"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(s["opt"])
        self.sched.load_state_dict(s["sched"])

    # ---- binary11 bitmaps ---------------------------------------------------------------------------------------
    def bitmap_quantizers(self, prefixes: list[str] | None = None) -> list[nn.Module]:
        """Weight quantizers with a polarizable bitmap (binary11) under `prefixes` (None = whole model) whose bitmap
        this stage trains: only those are polarized and hardened, so a stage never changes what it does not train."""
        out = []
        for name, m in self.ctx.student.named_modules():
            if not isinstance(m, QuantLinear) or not hasattr(m.weight_quantizer, "polarization_loss"):
                continue
            if prefixes is not None and not any(name.startswith(p + ".") for p in prefixes):
                continue
            if self._selects(f"{name}.weight_quantizer.bitmap_fp"):
                out.append(m.weight_quantizer)
        return out

    def _selects(self, name: str) -> bool:
        if not self.ctx.designed.get(name, True):
            return False
        cls, leaf = self.ctx.classes[name]
        return any(P.matches(s, name, cls, leaf) for s in self.spec.train)

    def polarization(self, quantizers: list[nn.Module], frac: float) -> torch.Tensor | None:
        pol = self.spec.polarize
        if pol.weight <= 0 or not quantizers:
            return None
        beta = pol.beta_start + (pol.beta_end - pol.beta_start) * min(max(frac, 0.0), 1.0)
        return pol.weight * torch.stack([q.polarization_loss(beta) for q in quantizers]).mean()

    def harden(self, quantizers: list[nn.Module]) -> int:
        if not self.spec.polarize.harden:
            return 0
        for q in quantizers:
            q.harden()
        return len(quantizers)
