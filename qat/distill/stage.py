"""What every stage shares: the run context, the optimizer step with its gradient average over processes and its
NaN guard, and the binary11 bitmap helpers (polarization, hardening).

A stage is driven one optimizer step at a time by the LightningModule (qat/distill/module.py):
    begin(state)    build caches/optimizer; `state` is the stage's own state_dict() when resuming mid-stage
    train_step(rows) one optimizer step on the pool rows this process was given (qat/data/module.py decides which)
                    -> {"loss": float (averaged over the processes), "tokens": int (this process's)}
    done            True once the budget is spent;  end(): finish (harden bitmaps, free caches)
    state_dict()    everything needed to continue bit-exactly: position, optimizer + scheduler state
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.config import QuantSpec
from qat.dist import SINGLE, Dist
from qat.distill import params as P
from qat.distill.optim import build_optimizer, build_scheduler
from qat.distill.recipe import StageSpec
from qat.nn import QuantLinear


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


class Stage:
    kind = ""

    def __init__(self, ctx: DistillContext, spec: StageSpec, index: int):
        self.ctx, self.spec, self.index = ctx, spec, index
        self.opt: torch.optim.Optimizer | None = None
        self.sched = None
        self.params: list[nn.Parameter] = []
        self.param_names: list[str] = []
        self.last_loss = self.last_main = float("nan")
        self.frozen = None  # FrozenCodes while a freeze_codes stage/window runs
        self.rounding = None  # SignRound while a window learns its rounding (rounding.py)

    # ---- to implement -------------------------------------------------------------------------------------------
    total_steps: int = 0
    step: int = 0  # steps done in this stage

    def begin(self, state: dict | None) -> None: ...
    def train_step(self, rows: torch.Tensor) -> dict: ...
    def before_step(self) -> None:
        """Called at the start of every train_step (the act stage anneals its temperature here)."""

    def end(self) -> None: ...
    def state_dict(self) -> dict: ...
    def where(self) -> str: ...
    def progress(self) -> dict: return {"step": self.step, "total": self.total_steps}

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
        if getattr(self, "frozen", None) is not None:
            self.frozen.finish()
            self.frozen = None

    def frozen_state(self) -> dict:
        return {"frozen": self.frozen.state_dict()} if getattr(self, "frozen", None) is not None else {}

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
