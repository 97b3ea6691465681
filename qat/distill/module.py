"""The one LightningModule that runs a recipe's stages in order (manual optimization), on one or many processes.

What Lightning does here, as it is built to:
    processes       the strategy (qat/distill/run.py: DDP without its wrapper, or FSDP2 through ModelParallelStrategy)
                    and its cluster environment (torchrun, SLURM, Lightning's own launcher) start and join the
                    processes; `setup()` runs once they have met, so the PTQ init can reduce its statistics over them
    data            the train loader of qat/data/module.py: one batch per optimizer step of the whole run, each process
                    given its own rows; resumable, its position saved and restored with the fit loop
    steps           every stage/window optimizer is registered with the trainer and stepped as a LightningOptimizer
                    (precision plugin, hooks); the run's step count is Lightning's count of batches (one per step:
                    `global_step_`; Lightning's `global_step` counts optimizer steps, and a window that only learns its
                    rounding has no optimizer)
    checkpoints     trainer.save_checkpoint / ckpt_path: the student's weights (the module's state_dict; the frozen
                    teacher is not a submodule and is never saved), Lightning's loops (global step, data position),
                    and the state below via on_save_checkpoint / on_load_checkpoint; the strategy writes on rank 0 and
                    every process loads
    logging         TensorBoardLogger, which writes on rank 0 only

What the stage/window loop needs that Lightning does not give, and why it lives here:
    optimizers      a new optimizer + LR schedule per stage and per block-wise window, over a different set of
                    parameters each time (configure_optimizers runs once); registered with the trainer when built.
                    Their state is saved in the module's own checkpoint state (not Lightning's `optimizer_states`,
                    which is left empty): a resume restores it only when the stage rebuilds its optimizer, which
                    Lightning's restore (before any stage exists) cannot do, and under FSDP it is the full state
                    keyed by parameter name, so it loads on any number of processes
    gradients       averaged over the processes by the stage for exactly the parameters it trains (Stage.optimize):
                    a DDP wrapper registers its hooks once, for what requires grad at wrap time, while the trainable
                    set changes per window (under FSDP, FSDP's own reduce-scatter does it)
    stage events    on_distill_stage_start / on_distill_stage_end, called on the trainer's callbacks (Lightning has no
                    notion of stages or windows)

State in the checkpoint (STATE_KEY): stage index, the active stage's state (window, step within it, optimizer +
scheduler state, ACBQ statistics, CAKLD gamma), the designed-trainable map, RNG states, history, loss log, the global
step and the number of processes that wrote it. `--resume last` therefore continues mid-stage, mid-window, at the
exact batch where the run stopped, on the same or another number of processes (the data order is defined by global
position, qat/data/module.py).
"""
from __future__ import annotations

import random
import resource
import time
from typing import Any

import lightning as L
import numpy as np
import torch

from qat.dist import Dist
from qat.distill import params as P
from qat.distill.faults import kill_if
from qat.distill.params import quantizer_train_mode
from qat.distill.recipe import Recipe
from qat.distill.stage import DistillContext, Stage, stage_kind

STATE_KEY = "qat_distill"
STATE_VERSION = 2


def make_stage(ctx: DistillContext, spec, index: int) -> Stage:
    """The stage for recipe stage `index`, built by the class registered for its kind (qat/distill/stage.py)."""
    return stage_kind(spec.kind, f"stage {index} ({spec.name})").build(ctx, spec, index)


def _numpy_rng_state() -> tuple:
    """numpy's RNG state with its key array as a tensor: the checkpoint then loads with torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class TrainingModule(L.LightningModule):
    """What the distillation and the fine-tuning modules share: the calls into the shared callbacks (checkpointing,
    progress, plots) and TensorBoard scalars."""

    def _notify(self, hook: str) -> None:
        for cb in self.trainer.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self.trainer, self)

    def _scalar(self, tag: str, value: float, step: int) -> None:
        """A TensorBoard scalar (rank 0: the logger of the other processes is a no-op)."""
        logger = self.logger
        if logger is not None and hasattr(logger, "experiment") and hasattr(logger.experiment, "add_scalar"):
            logger.experiment.add_scalar(tag, value, step)


class DistillModule(TrainingModule):
    """`student`: the model that trains (a copy of the teacher to be PTQ-initialised in setup() when `ptq` is given,
    an existing student, or a skeleton whose weights come from the resumed checkpoint)."""

    def __init__(self, recipe: Recipe, student, teacher, *, spec, adapter, plan, run_dir, eval_ids=None,
                 ptq=None, calib=None, sharded: bool = False, last_checkpoint=lambda: None):
        super().__init__()
        self.automatic_optimization = False
        self.student = student
        self._box = {"teacher": teacher, "ctx": None}  # not submodules: never saved, never wrapped by the strategy
        self.recipe, self.spec, self.adapter, self.plan, self.run_dir = recipe, spec, adapter, plan, run_dir
        self.eval_ids, self.ptq, self.calib, self.sharded = eval_ids, ptq, calib, sharded
        self.last_checkpoint = last_checkpoint
        self.stage_index = 0
        self.stage: Stage | None = None
        self.finished = False
        self.history: list[dict] = []
        self.loss_log: list[tuple[int, int, float]] = []  # (global step, stage index, loss)
        self.resumed_from: dict | None = None
        self.ptq_seconds: float | None = None
        self.final_state: dict | None = None  # FSDP: the gathered student state (rank 0), set when training ends
        self._pending: dict | None = None
        self._boundary = False  # a window or stage ended at the last step (checkpoint there)
        self._stage_t0 = 0.0
        self._stage_tokens = 0
        self._shard = torch.zeros(0, dtype=torch.bool)  # the active stage's rows this process may train on

    @property
    def ctx(self) -> DistillContext:
        return self._box["ctx"]

    @property
    def teacher(self):
        return self._box["teacher"]

    @property
    def dist(self) -> Dist:
        return self.ctx.dist

    # ---- Lightning plumbing -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """After the processes have met: PTQ init (statistics reduced over the processes), then the run context."""
        dist = Dist()
        device = self.trainer.strategy.root_device
        pool = self.trainer.datamodule.pool
        if self.ptq is not None:
            from qat.ptq.pipeline import ptq_quantize

            pt = self.ptq
            calib = self.calib if self.calib is not None else pool[: pt.calib_samples, : pt.seq_len]
            self.student.to(device)
            t0 = time.time()
            ptq_quantize(self.student, self.spec, calib, pt.method, act_order=pt.act_order, damp=pt.damp,
                         progress=self.recipe.progress, dist=dist)
            self.ptq_seconds = round(time.time() - t0, 1)
            self.ptq = None
        designed = P.snapshot_trainable(self.student)
        P.freeze_all(self.student)
        self._box["ctx"] = DistillContext(
            student=self.student, teacher=self.teacher, adapter=self.adapter, spec=self.spec, train_ids=pool,
            device=device, run_dir=self.run_dir, seed=self.recipe.seed, designed=designed,
            backward=self.manual_backward, optimizer_step=self._optimizer_step, dist=dist, plan=self.plan,
            sharded=self.sharded, last_checkpoint=self.last_checkpoint)

    def configure_model(self) -> None:
        """FSDP (ModelParallelStrategy): shard student and teacher block by block. Every decoder block is its own
        FSDP2 root, because the block-wise stages call blocks directly (an FSDP2 child called outside its root's
        forward gets no gradient reduction), resharded after every forward (so that, outside a forward, the
        parameters the stages select and freeze are always the sharded ones); its QuantLinears' quantizer parameters shard with it, along their first
        dimension like the weight rows they scale. Embeddings, the final norm and the LM head (a few per cent of the
        parameters) and scalar parameters (activation clip logits, which FSDP2 cannot shard) stay whole on every
        process; Stage.optimize averages the gradients of whatever FSDP leaves whole."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for model in (self.student, self.teacher):
            scalars = {p for p in model.parameters() if p.dim() == 0}
            for block in self.adapter.blocks(model):
                fully_shard(block, mesh=mesh, ignored_params=scalars, reshard_after_forward=True)
            model.to(self.trainer.strategy.root_device)

    def configure_optimizers(self):
        return None  # each stage/window builds its own optimizer (registered in _register_optimizer)

    def on_fit_start(self) -> None:
        self.ctx.device = self.device
        self.teacher.to(self.device)

    @property
    def global_step_(self) -> int:
        """Steps of the run done, from Lightning's batch progress (`started` counts a batch once it enters
        training_step: in there it includes the step being taken, which is what the logs and hooks after its update
        want; before and after a step it is the number of steps done)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.started

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        kill_if("before_step", batch_idx, self.dist.rank)
        if not any(h["stage"] == "ptq" for h in self.history):
            self._record("ptq", None, {})
        if self.stage is None and not self.finished:
            self._start_stage()

    def training_step(self, batch, batch_idx):
        self._boundary = False
        s, w, t = self.plan.locate(batch_idx)
        where = (self.stage_index, *self.stage.position())
        if (s, w, t) != where:
            raise RuntimeError(f"data and stage disagree at step {batch_idx + 1}: batch for {(s, w, t)}, stage at "
                               f"{where}")
        if not self._shard[batch.cpu()].all():
            raise RuntimeError(f"step {batch_idx + 1}: process {self.dist.rank} got rows outside its shard")
        window_before = self.stage.position()[0]
        quantizer_train_mode(self.student)  # (evaluate() leaves the whole student in eval mode)
        t0 = time.perf_counter()
        metrics = self.stage.train_step(batch)
        dt = max(time.perf_counter() - t0, 1e-9)
        self._stage_tokens += metrics["tokens"] * self.dist.world
        self.loss_log.append((self.global_step_, self.stage_index, metrics["loss"]))
        self._log_step(metrics, dt)
        if self.stage.position()[0] != window_before:
            self._boundary = True
            self._log_window()
        if self.stage.done:
            self._finish_stage()
        else:
            self._register_optimizer()  # a new window built a new optimizer
        kill_if("after_step", batch_idx + 1, self.dist.rank)

    def on_train_end(self) -> None:
        if self.sharded:  # the full student for rank 0 to save (a collective: every process takes part)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            self.final_state = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True,
                                                                                           cpu_offload=True))

    def _register_optimizer(self) -> None:
        opt = self.stage.opt if self.stage is not None else None
        if [o for o in self.trainer.optimizers] != ([opt] if opt is not None else []):
            self.trainer.optimizers = [opt] if opt is not None else []

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        lopt = self.optimizers()
        if lopt.optimizer is not opt:
            raise RuntimeError("the stage's optimizer is not the one registered with the trainer")
        lopt.step()

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
        plan = self.plan.stages[self.stage_index]
        self._shard = torch.zeros(plan.n_rows, dtype=torch.bool)
        self._shard[plan.rows_of(self.dist.rank, self.dist.world)] = True
        self.stage.begin(state)
        self._register_optimizer()
        self._notify("on_distill_stage_start")

    def _finish_stage(self) -> None:
        stage = self.stage
        stage.end()
        plan = self.plan.stages[self.stage_index]
        shards = [plan.rows_of(r, self.dist.world).tolist() for r in range(self.dist.world)]
        self._record(stage.spec.name, stage, {"final_loss": stage.last_loss, "steps": stage.total_steps,
                                               "tokens": self._stage_tokens,
                                               "seconds": round(time.time() - self._stage_t0, 1),
                                               "shards": shards})
        if stage.window_log:
            self.history[-1]["windows"] = stage.window_log
        self._notify("on_distill_stage_end")
        self.stage = None
        self._stage_tokens, self._stage_t0 = 0, time.time()  # a checkpoint at the boundary starts the next stage at 0
        self._register_optimizer()
        self.stage_index += 1
        self._boundary = True
        if self.stage_index >= len(self.recipe.stages):
            self.finished = True
            self.ctx.act_bypass.set(True)

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
        """Validation perplexity of the student as it will be exported (activation quantizers on); the windows are
        dealt over the processes and the sums reduced."""
        if self.eval_ids is None:
            return None
        from qat.eval.perplexity import perplexity

        ev = self.recipe.eval
        was = self.ctx.act_bypass.active
        self.ctx.act_bypass.set(True)
        try:
            r = perplexity(self.student, self.eval_ids, ev.seq_len, batch_size=ev.batch_size,
                           max_tokens=ev.max_tokens, progress=False, dist=self.dist, lockstep=self.sharded)
        finally:
            self.ctx.act_bypass.set(was)
        return float(r["perplexity"])

    # ---- logging (rank 0: the logger of the other processes is a no-op) ----------------------------------------
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
        self._scalar("train/tokens_per_s", metrics["tokens"] * self.dist.world / dt, g)
        self._scalar("train/peak_memory_mb", _peak_memory_mb(self.device), g)

    def _log_window(self) -> None:
        log = self.stage.window_log
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
        checkpoint["optimizer_states"] = []  # the stage's optimizer state is in ours (see the module docstring)
        state = {
            "version": STATE_VERSION,
            "stage_index": self.stage_index,
            "global_step": self.global_step_,
            "world_size": self.dist.world,
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
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint was written by another version of `qat distill` (state version "
                             f"{state.get('version')}, this one reads {STATE_VERSION})")
        kinds = [s.kind for s in self.recipe.stages]
        if state["stage_kinds"] != kinds:
            raise ValueError(f"checkpoint was written for stages {state['stage_kinds']}, the recipe has {kinds}")
        self.stage_index = int(state["stage_index"])
        self.finished = bool(state["finished"])
        self.history = list(state["history"])
        self.loss_log = [tuple(x) for x in state["loss_log"]]
        self.ctx.designed.clear()
        self.ctx.designed.update(state["designed"])
        self._pending = {"stage_index": self.stage_index, "stage_state": state["stage_state"],
                         "stage_tokens": state["stage_tokens"], "stage_seconds": state["stage_seconds"]}
        self.resumed_from = {"stage_index": self.stage_index, "global_step": int(state["global_step"]),
                             "world_size": int(state["world_size"]), "where": state.get("where"),
                             "stage_state": state["stage_state"]}
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
