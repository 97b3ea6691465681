"""The one LightningModule that runs a recipe's stages in order (manual optimization).

Lightning drives an endless stream of empty "ticks"; every tick is one optimizer step of the current stage, and the
module decides what that step is from its own state, so the stage/window structure never has to fit Lightning's
epoch/batch model and the optimizer can change per stage and per window. When the last stage ends the module sets
trainer.should_stop.

State that goes into the Lightning checkpoint (on_save_checkpoint / on_load_checkpoint), besides the student's
weights (the module's state_dict; the frozen teacher is not a submodule and is never saved):
    stage index, global step, the active stage's state (window, step within it, optimizer + scheduler state, batch
    order position, ACBQ statistics, CAKLD gamma), the designed-trainable map, RNG states, history, loss log.
`--resume last` therefore continues mid-stage, mid-window, at the exact batch where the run stopped.
"""
from __future__ import annotations

import itertools
import random
import resource
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from qat.distill.params import quantizer_train_mode
from qat.distill.recipe import Recipe
from qat.distill.stage import DistillContext, Stage

STATE_KEY = "qat_distill"
STATE_VERSION = 1


def make_stage(ctx: DistillContext, spec, index: int) -> Stage:
    if spec.kind == "blockwise":
        from qat.distill.blockwise import BlockwiseStage

        return BlockwiseStage(ctx, spec, index)
    if spec.kind == "e2e":
        from qat.distill.e2e import E2EStage

        return E2EStage(ctx, spec, index)
    if spec.kind == "act":
        from qat.distill.act import make_act_stage

        return make_act_stage(ctx, spec, index)
    raise ValueError(f"unknown stage kind {spec.kind!r}")


class _Ticks(IterableDataset):
    def __iter__(self):
        return itertools.repeat(0)


def _numpy_rng_state() -> tuple:
    """numpy's RNG state with its key array as a tensor: the checkpoint then loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class DistillModule(L.LightningModule):
    def __init__(self, ctx: DistillContext, recipe: Recipe, eval_ids: torch.Tensor | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.student = ctx.student
        self._ctx_box = [ctx]  # plain list: the context (and the teacher in it) are not submodules
        self.recipe = recipe
        self.eval_ids = eval_ids
        self.stage_index = 0
        self.global_step_ = 0
        self.stage: Stage | None = None
        self.finished = False
        self.history: list[dict] = []
        self.loss_log: list[tuple[int, int, float]] = []  # (global step, stage index, loss)
        self.resumed_from: dict | None = None
        self._pending: dict | None = None
        self._boundary = False  # a window or stage ended at the last step (checkpoint there)
        self._stage_t0 = 0.0
        self._stage_tokens = 0

    @property
    def ctx(self) -> DistillContext:
        return self._ctx_box[0]

    @property
    def teacher(self):
        return self.ctx.teacher

    # ---- Lightning plumbing -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return None  # each stage/window builds its own optimizer; its state is checkpointed by on_save_checkpoint

    def train_dataloader(self):
        return DataLoader(_Ticks(), batch_size=None)

    def on_fit_start(self) -> None:
        self.ctx.device = self.device
        self.teacher.to(self.device)

    def training_step(self, batch, batch_idx):
        if self.finished:
            self.trainer.should_stop = True
            return
        self._boundary = False
        if not any(h["stage"] == "ptq" for h in self.history):
            self._record("ptq", None, {})
        if self.stage is None:
            self._start_stage()
        window_before = getattr(self.stage, "window_idx", None)
        quantizer_train_mode(self.student)  # (evaluate() leaves the whole student in eval mode)
        t0 = time.perf_counter()
        metrics = self.stage.train_step()
        dt = max(time.perf_counter() - t0, 1e-9)
        self.global_step_ += 1
        self._stage_tokens += metrics["tokens"]
        self.loss_log.append((self.global_step_, self.stage_index, metrics["loss"]))
        self._log_step(metrics, dt)
        if getattr(self.stage, "window_idx", None) != window_before:
            self._boundary = True
            self._log_window()
        if self.stage.done:
            self._finish_stage()
        return

    # ---- stages -------------------------------------------------------------------------------------------------
    def _start_stage(self) -> None:
        spec = self.recipe.stages[self.stage_index]
        self.stage = make_stage(self.ctx, spec, self.stage_index)
        state = None
        if self._pending is not None and self._pending.get("stage_index") == self.stage_index:
            state = self._pending.get("stage_state")
            self._stage_tokens = int(self._pending.get("stage_tokens", 0))
            self._stage_t0 = time.time() - float(self._pending.get("stage_seconds", 0.0))
        else:
            self._stage_tokens, self._stage_t0 = 0, time.time()
        self._pending = None
        quantizer_train_mode(self.student)
        self.stage.begin(state)
        self._notify("on_distill_stage_start")

    def _finish_stage(self) -> None:
        stage = self.stage
        stage.end()
        self._record(stage.spec.name, stage, {"final_loss": stage.last_loss, "steps": stage.total_steps,
                                               "tokens": self._stage_tokens,
                                               "seconds": round(time.time() - self._stage_t0, 1)})
        windows = getattr(stage, "window_log", None)
        if windows:
            self.history[-1]["windows"] = windows
        self._notify("on_distill_stage_end")
        self.stage = None
        self.stage_index += 1
        self._boundary = True
        if self.stage_index >= len(self.recipe.stages):
            self.finished = True
            self.ctx.act_bypass.set(True)
            self.trainer.should_stop = True

    def _record(self, name: str, stage: Stage | None, extra: dict) -> None:
        entry = {"stage": name, "index": None if stage is None else stage.index,
                 "kind": "ptq" if stage is None else stage.spec.kind, **extra}
        ppl = self.evaluate() if stage is not None or self.recipe.eval.initial else None
        if ppl is not None:
            entry["val_ppl"] = ppl
            self._scalar("val/perplexity", ppl, self.global_step_)
            self._scalar("val/perplexity_by_stage", ppl, len(self.history))
        self.history.append(entry)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Validation perplexity of the student as it will be exported (activation quantizers on)."""
        if self.eval_ids is None:
            return None
        from qat.eval.perplexity import perplexity

        ev = self.recipe.eval
        was = self.ctx.act_bypass.active
        self.ctx.act_bypass.set(True)
        try:
            r = perplexity(self.student, self.eval_ids, ev.seq_len, batch_size=ev.batch_size,
                           max_tokens=ev.max_tokens, progress=False)
        finally:
            self.ctx.act_bypass.set(was)
        return float(r["perplexity"])

    def _notify(self, hook: str) -> None:
        for cb in self.trainer.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self.trainer, self)

    # ---- logging ------------------------------------------------------------------------------------------------
    def _scalar(self, tag: str, value: float, step: int) -> None:
        logger = self.logger
        if logger is not None and hasattr(logger, "experiment") and hasattr(logger.experiment, "add_scalar"):
            logger.experiment.add_scalar(tag, value, step)

    def _log_step(self, metrics: dict, dt: float) -> None:
        spec = self.stage.spec
        tag = f"s{self.stage_index}_{spec.name}"
        g = self.global_step_
        self._scalar(f"{tag}/loss", metrics["loss"], g)
        if "main_loss" in metrics and metrics["main_loss"] != metrics["loss"]:
            self._scalar(f"{tag}/main_loss", metrics["main_loss"], g)
        for name, lr in self.stage.lrs().items():
            self._scalar(f"{tag}/lr_{name}", lr, g)
        self._scalar("train/loss", metrics["loss"], g)
        self._scalar("train/tokens_per_s", metrics["tokens"] / dt, g)
        self._scalar("train/peak_memory_mb", _peak_memory_mb(self.device), g)

    def _log_window(self) -> None:
        log = getattr(self.stage, "window_log", None)
        if log:
            w = log[-1]
            self._scalar(f"s{self.stage_index}_{self.stage.spec.name}/window_final_loss", w["last_loss"], w["window"])

    def progress_info(self) -> dict[str, Any]:
        if self.stage is None:
            return {"stage_index": self.stage_index, "global_step": self.global_step_}
        return {"stage_index": self.stage_index, "name": self.stage.spec.name, "kind": self.stage.spec.kind,
                "global_step": self.global_step_, "loss": self.stage.last_loss, **self.stage.progress()}

    def should_checkpoint(self, every: int) -> bool:
        return self._boundary or self.global_step_ % every == 0

    # ---- checkpoint state ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = {
            "version": STATE_VERSION,
            "stage_index": self.stage_index,
            "global_step": self.global_step_,
            "finished": self.finished,
            "stage_state": self.stage.state_dict() if self.stage is not None else None,
            "stage_tokens": self._stage_tokens,
            "stage_seconds": time.time() - self._stage_t0 if self.stage is not None else 0.0,
            "where": self.stage.where() if self.stage is not None and not self.stage.done else None,
            "designed": self.ctx.designed,
            "history": self.history,
            "loss_log": self.loss_log,
            "n_stages": len(self.recipe.stages),
            "stage_kinds": [s.kind for s in self.recipe.stages],
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        checkpoint[STATE_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY)
        if state is None:
            raise ValueError("checkpoint has no qat distill state (not written by `qat distill`)")
        kinds = [s.kind for s in self.recipe.stages]
        if state["stage_kinds"] != kinds:
            raise ValueError(f"checkpoint was written for stages {state['stage_kinds']}, the recipe has {kinds}")
        self.stage_index = int(state["stage_index"])
        self.global_step_ = int(state["global_step"])
        self.finished = bool(state["finished"])
        self.history = list(state["history"])
        self.loss_log = [tuple(x) for x in state["loss_log"]]
        self.ctx.designed.clear()
        self.ctx.designed.update(state["designed"])
        self._pending = {"stage_index": self.stage_index, "stage_state": state["stage_state"],
                         "stage_tokens": state["stage_tokens"], "stage_seconds": state["stage_seconds"]}
        self.resumed_from = {"stage_index": self.stage_index, "global_step": self.global_step_,
                             "where": state.get("where"), "stage_state": state["stage_state"]}
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
