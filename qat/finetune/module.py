"""FinetuneModule: the LightningModule of `qat finetune` (manual optimization, one optimizer step per batch).

It drives one end-to-end distillation stage (qat/distill/e2e.py) whose `train` list is the LoRA parameters, on a peft
model around the frozen low-bit base, and shares the distillation machinery: the step loader (qat/data/module.py:
the rows of every step, resumable with Lightning's fit loop), the optimizer
factory, the NaN guard, the checkpoint callback (qat/distill/callbacks.py), the progress bar and the summary plot.
What differs from DistillModule:
  - the whole model stays in eval mode: the base runs exactly its deployed forward (eval-mode quantizers; binary11
    bitmaps and knee activations never take their soft training form), only the LoRA dropout trains;
  - the Lightning checkpoint holds the adapter alone (the base is frozen and reloaded from --model; its fingerprint
    goes into the checkpoint and must match on resume);
  - no teacher is needed for the ce loss.
Checkpoint state besides the adapter: global step, the stage's state (step, optimizer + scheduler, batch order), RNG
states, history and loss log, so `--resume last` continues at the exact batch where the run stopped.
"""
from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch

from qat.distill.module import TrainingModule, _numpy_rng_state, _peak_memory_mb
from qat.distill.recipe import EvalSpec, StageSpec
from qat.distill.stage import DistillContext

STATE_KEY = "qat_finetune"
STATE_VERSION = 1


class FinetuneModule(TrainingModule):
    def __init__(self, ctx: DistillContext, spec: StageSpec, eval_spec: EvalSpec, eval_ids: torch.Tensor | None,
                 base_fingerprint: str):
        super().__init__()
        self.automatic_optimization = False
        self.student = ctx.student  # the peft model
        self._ctx_box = [ctx]  # not a submodule: the teacher is never saved
        self.spec, self.eval_spec, self.eval_ids = spec, eval_spec, eval_ids
        self.base_fingerprint = base_fingerprint
        self.stage_index = 0  # one stage; kept for the shared checkpoint callback and progress bar
        self.global_step_ = 0
        self.stage = None
        self.finished = False
        self.history: list[dict] = []
        self.loss_log: list[tuple[int, int, float]] = []
        self.resumed_from: dict | None = None
        self._pending: dict | None = None
        self._boundary = False
        self._tokens, self._t0 = 0, 0.0

    @property
    def ctx(self) -> DistillContext:
        return self._ctx_box[0]

    # ---- the adapter is the whole trainable state --------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        for k in [k for k in sd if ".lora_" not in k]:
            del sd[k]
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = set(self.state_dict())
        missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint adapter does not match the model (missing {missing[:2]}, unexpected "
                             f"{unexpected[:2]}): was it written with other --lora options?")
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ---- Lightning plumbing -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return None  # the stage builds its optimizer; its state is checkpointed by on_save_checkpoint

    def train_dataloader(self):
        from qat.data.module import StepLoader

        return StepLoader(self.ctx.plan)  # one process: qat finetune runs on one device

    def on_fit_start(self) -> None:
        self.ctx.device = self.device
        if self.ctx.teacher is not None:
            self.ctx.teacher.to(self.device)

    def _modes(self) -> None:
        """Eval mode everywhere (the deployed forward), train mode for the LoRA dropout only."""
        self.student.eval()
        for m in self.student.modules():
            if hasattr(m, "lora_dropout"):
                m.lora_dropout.train()

    def training_step(self, batch, batch_idx):
        if self.finished:
            self.trainer.should_stop = True
            return
        self._boundary = False
        if self._pending is not None and self._pending.get("rng") is not None:
            self._restore_rng(self._pending.pop("rng"))
        if not self.history:
            self._record("base", None, {})  # B = 0 at the start: the adapter model is the base
        if self.stage is None:
            self._start_stage()
        self._modes()
        t0 = time.perf_counter()
        m = self.stage.train_step(batch)
        dt = max(time.perf_counter() - t0, 1e-9)
        self.global_step_ += 1
        self._tokens += m["tokens"]
        self.loss_log.append((self.global_step_, 0, m["loss"]))
        for tag, v in (("train/loss", m["loss"]), ("train/tokens_per_s", m["tokens"] / dt),
                       ("train/peak_memory_mb", _peak_memory_mb(self.device)),
                       ("train/lr", next(iter(self.stage.lrs().values()), 0.0))):
            self._scalar(tag, v, self.global_step_)
        if self.stage.done:
            self._finish_stage()

    def _start_stage(self) -> None:
        from qat.distill.e2e import E2EStage

        self.stage = E2EStage(self.ctx, self.spec, 0)
        state = None
        if self._pending is not None:
            state = self._pending["stage_state"]
            self._tokens = int(self._pending["tokens"])
            self._t0 = time.time() - float(self._pending["seconds"])
        else:
            self._tokens, self._t0 = 0, time.time()
        self._pending = None
        self._modes()
        self.stage.begin(state)
        self._notify("on_distill_stage_start")

    def _finish_stage(self) -> None:
        stage = self.stage
        stage.end()
        self._record("lora", stage, {"final_loss": stage.last_loss, "steps": stage.total_steps,
                                     "tokens": self._tokens, "seconds": round(time.time() - self._t0, 1)})
        self._notify("on_distill_stage_end")
        self.stage = None
        self.stage_index = 1
        self.finished = self._boundary = True
        self.ctx.act_bypass.set(True)
        self.trainer.should_stop = True

    def _record(self, name: str, stage, extra: dict) -> None:
        entry = {"stage": name, "index": None if stage is None else 0, "kind": "base" if stage is None else "lora",
                 **extra}
        ppl = self.evaluate() if stage is not None or self.eval_spec.initial else None
        if ppl is not None:
            entry["val_ppl"] = ppl
            self._scalar("val/perplexity", ppl, self.global_step_)
        self.history.append(entry)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Validation perplexity of the adapter model as deployed (activation quantizers on)."""
        if self.eval_ids is None:
            return None
        from qat.eval.perplexity import perplexity

        ev = self.eval_spec
        was = self.ctx.act_bypass.active
        self.ctx.act_bypass.set(True)
        try:
            r = perplexity(self.student, self.eval_ids, ev.seq_len, batch_size=ev.batch_size,
                           max_tokens=ev.max_tokens, progress=False)
        finally:
            self.ctx.act_bypass.set(was)
            self._modes()
        return float(r["perplexity"])

    # ---- what the shared callbacks read -------------------------------------------------------------------------
    def progress_info(self) -> dict[str, Any]:
        if self.stage is None:
            return {"stage_index": self.stage_index, "global_step": self.global_step_}
        return {"stage_index": 0, "name": "lora", "kind": "e2e", "global_step": self.global_step_,
                "loss": self.stage.last_loss, **self.stage.progress()}

    def should_checkpoint(self, every: int) -> bool:
        return self._boundary or self.global_step_ % every == 0

    # ---- checkpoint state ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[STATE_KEY] = {
            "version": STATE_VERSION,
            "base_fingerprint": self.base_fingerprint,
            "global_step": self.global_step_,
            "finished": self.finished,
            "stage_state": self.stage.state_dict() if self.stage is not None else None,
            "tokens": self._tokens,
            "seconds": time.time() - self._t0 if self.stage is not None else 0.0,
            "where": self.stage.where() if self.stage is not None and not self.stage.done else None,
            "history": self.history,
            "loss_log": self.loss_log,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(STATE_KEY)
        if state is None:
            raise ValueError("checkpoint has no qat finetune state (not written by `qat finetune`)")
        if state["base_fingerprint"] != self.base_fingerprint:
            raise ValueError("the checkpoint was trained on another base model than --model; resume with the same "
                             "--model (or start over with --overwrite true)")
        self.global_step_ = int(state["global_step"])
        self.finished = bool(state["finished"])
        self.stage_index = int(self.finished)
        self.history = list(state["history"])
        self.loss_log = [tuple(x) for x in state["loss_log"]]
        # the RNG states are restored at the first step, not here: Lightning draws from the global generator between
        # loading the checkpoint and that step (the dataloader's base seed), which would shift the LoRA dropout masks
        self._pending = {"stage_state": state["stage_state"], "tokens": state["tokens"], "seconds": state["seconds"],
                         "rng": state["rng"]}
        self.resumed_from = {"global_step": self.global_step_, "where": state.get("where"),
                             "stage_state": state["stage_state"]}

    @staticmethod
    def _restore_rng(rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
