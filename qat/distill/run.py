"""run_distill(recipe): everything `qat distill` does, callable from Python (tests, benchmarks), on one process or
on each process of a multi-process run (every process runs it; rank 0 alone writes).

Order of work, cheapest checks first so that bad input fails in a second and writes nothing:
  1. checks: output/run directories, resume checkpoint, model dir, data files, the given PTQ student's format
     against the recipe's quant spec, ACBQ units on a parallel-residual architecture; the processes (devices,
     num_nodes, strategy against the machine and the launch environment; every stage's batch splits evenly over
     them, also on resume); every stage's `train` entries against the student's parameter names (on a skeleton)
  2. the Trainer (strategy, cluster environment), the teacher, eval tokens; rank 0 prepares the run directory
  3. Lightning fit of DistillModule with the StepDataModule (qat/data/module.py): once the processes have met, the
     training pool (corpus windows or teacher samples) and the student (the checkpoint's on resume, an existing PTQ
     student, or PTQ of a copy of the teacher with statistics reduced over the processes); checkpoints in
     <run_dir>/checkpoints, TensorBoard in <run_dir>/tb
  4. rank 0: the student checkpoint (qat.checkpoint.save_student) with the per-stage history in its meta, and
     distill_summary.png + distill_history.json beside it
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch

from qat.config import QuantSpec
from qat.dist import LostPeerError, comm_error_text, is_comm_failure
from qat.distill.recipe import Recipe, RecipeError
from qat.distill.stage import DistillContext, NonFiniteLossError  # noqa: F401  (re-exported for callers)

CKPT_DIR = "checkpoints"


class TrainingIncompleteError(RuntimeError):
    """fit() returned before the last stage ended (e.g. an interrupt Lightning handled); the run can be resumed."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resume_path(recipe: Recipe, resume: str | None) -> Path | None:
    if not resume:
        return None
    run_dir = Path(recipe.resolved_run_dir())
    p = run_dir / CKPT_DIR / "last.ckpt" if resume == "last" else Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {str(p)!r}" +
                                (" (the run directory has none yet: start without --resume)" if resume == "last" else ""))
    return p


def preflight(recipe: Recipe, resume: str | None, overwrite: bool) -> dict:
    """All the checks that need no model weights. Returns what later steps need."""
    from transformers import AutoConfig

    from qat.checkpoint import read_student_meta
    from qat.io import check_output_dir
    from qat.models import get_adapter
    from qat.models.loading import resolve_model_dir

    if not recipe.output:
        raise RecipeError("recipe needs an output directory (--output)")
    run_dir = Path(recipe.resolved_run_dir())
    ckpt = resume_path(recipe, resume)
    if ckpt is None and (run_dir / CKPT_DIR / "last.ckpt").exists() and not overwrite:
        raise FileExistsError(f"run directory {str(run_dir)!r} already holds a checkpoint; pass --resume last to "
                              "continue it or --overwrite to start over")
    check_output_dir(recipe.output, overwrite)
    meta = None
    if recipe.student:
        meta = read_student_meta(recipe.student)
    model_dir = recipe.model or (meta or {}).get("base_model")
    if not model_dir:
        raise RecipeError("recipe needs the FP teacher model directory (--model)")
    model_dir = resolve_model_dir(model_dir)
    spec = recipe.quant_spec()
    if meta is not None:
        student_spec = QuantSpec.from_dict(meta["spec"])
        if spec is None:
            spec = student_spec
        elif spec.to_dict() != student_spec.to_dict():
            raise RecipeError(f"recipe quant {spec.describe()} does not match the PTQ student {recipe.student!r} "
                              f"({student_spec.describe()}); fix quant: or drop --student")
        cfg_s = json.loads((Path(recipe.student) / "config.json").read_text())
        cfg_t = json.loads((model_dir / "config.json").read_text())
        for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
            if k in cfg_t and cfg_s.get(k) != cfg_t.get(k):
                raise RecipeError(f"PTQ student {recipe.student!r} has {k}={cfg_s.get(k)}, the model "
                                  f"{str(model_dir)!r} has {cfg_t.get(k)}")
    recipe.check_spec(spec)
    for path, what in ((recipe.data.train_file, "data.train_file"), (recipe.eval.file, "eval.file")):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path!r} does not exist")
    cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    adapter = get_adapter(cfg.model_type)
    if getattr(cfg, "use_parallel_residual", False) or adapter.parallel_residual:
        for i, s in enumerate(recipe.stages):
            if s.units == "acbq" and s.block_objective:
                raise RecipeError(f"stage {i} ({s.name}): units acbq needs sequential attention/MLP residuals; "
                                  f"{adapter.family} blocks are parallel-residual (use units: block)")
    return {"run_dir": run_dir, "ckpt": ckpt, "model_dir": model_dir, "spec": spec, "student_meta": meta}


# ---- processes -----------------------------------------------------------------------------------------------------

def launch_environment() -> dict | None:
    """What an external launcher started: {"name", "world", "per_node"} for torchrun (also two torchruns on two
    nodes) and SLURM srun; None when this process was started by hand or will start its peers itself."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env:
        return {"name": "torchrun", "world": int(env["WORLD_SIZE"]), "per_node": int(env["LOCAL_WORLD_SIZE"])}
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect() and "SLURM_NTASKS" in env:
        nnodes = int(env.get("SLURM_NNODES", "1"))
        world = int(env["SLURM_NTASKS"])
        return {"name": "SLURM", "world": world, "per_node": int(env.get("SLURM_NTASKS_PER_NODE", world // nnodes))}
    return None


def process_layout(recipe: Recipe) -> tuple[str, int, int]:
    """(accelerator, devices per node, num_nodes), checked against the machine and the launch environment."""
    dev = _device(recipe.device)
    accelerator = "gpu" if dev.type == "cuda" else "cpu"
    launched = launch_environment()
    devices = recipe.devices
    if devices == "auto":
        devices = launched["per_node"] if launched else 1
    if dev.type == "cuda":
        have = torch.cuda.device_count()
        if devices > have:
            raise RecipeError(f"devices {devices} is more than the {have} GPU(s) this machine has")
    else:
        have = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if devices > have:
            raise RecipeError(f"devices {devices} is more than the {have} CPU core(s) this machine has (on CPU each "
                              "device is a process)")
    if launched is not None:
        if devices != launched["per_node"] or devices * recipe.num_nodes != launched["world"]:
            nodes = launched["world"] // max(launched["per_node"], 1)
            raise RecipeError(f"num_nodes {recipe.num_nodes} x devices {devices} does not match the launch "
                              f"environment: {launched['name']} started {launched['world']} process(es), "
                              f"{launched['per_node']} per node (use --num_nodes {nodes} --devices "
                              f"{launched['per_node']})")
    elif recipe.num_nodes > 1 and "NODE_RANK" not in os.environ and "GROUP_RANK" not in os.environ:
        raise RecipeError(f"num_nodes {recipe.num_nodes} needs a launcher that starts a process on every node "
                          "(torchrun, SLURM srun, or NODE_RANK/MASTER_ADDR set on each node); none was found")
    return accelerator, devices, recipe.num_nodes


def launch_rank(devices: int) -> int:
    """This process's global rank, known before the processes meet (from what the launcher put in the environment;
    a process that will start its peers itself is rank 0)."""
    env = os.environ
    for key in ("RANK", "SLURM_PROCID"):
        if key in env:
            return int(env[key])
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    return node * devices + int(env.get("LOCAL_RANK", "0"))


def make_strategy(recipe: Recipe, accelerator: str, devices: int, num_nodes: int):
    """Lightning strategy for the recipe: `auto` (one process), our DDP without its module wrapper, or FSDP2."""
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    world = devices * num_nodes
    timeout = timedelta(seconds=recipe.dist_timeout)

    class DataParallelStrategy(DDPStrategy):
        """Lightning's DDP strategy (cluster environments, launchers, the process group, rank-0 checkpoint writes)
        without its DistributedDataParallel wrapper: DDP registers gradient hooks once, for the parameters that
        require grad when it wraps the model (none here: everything starts frozen, which DDP refuses), while the
        trainable set changes with every block-wise window. Stage.optimize averages exactly the gradients it
        trains instead (one all-reduce per 32 MB bucket)."""

        def configure_ddp(self) -> None:
            pass

    class ShardedStrategy(ModelParallelStrategy):
        """FSDP2 over all processes (DistillModule.configure_model shards student and teacher); checkpoints are full
        state dicts written by rank 0, so a resume can shard them over another number of processes. The stages
        gather their optimizer state themselves (Stage.opt_state), so Lightning's gathering it again is skipped."""

        def optimizer_state(self, optimizer) -> dict:
            return {}

    if recipe.strategy == "fsdp":
        return ShardedStrategy(data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=False,
                               timeout=timeout)
    if recipe.strategy == "ddp" or world > 1:
        return DataParallelStrategy(timeout=timeout, start_method="popen")
    return "auto"


def step_plan(recipe: Recipe, n_blocks: int):
    """The run's schedule of optimizer steps (qat/data/module.py): rows, global batch, windows, steps per window."""
    from qat.data.module import StagePlan, StepPlan
    from qat.distill.blockwise import make_units, make_windows
    from qat.distill.stage import stage_seed

    n_pool = recipe.data.num_samples
    stages = []
    for i, s in enumerate(recipe.stages):
        if s.block_objective:
            n = n_pool if s.samples is None else min(s.samples, n_pool)
            windows = len(make_windows(len(make_units(n_blocks, s.units)), s.window, s.overlap))
        else:
            n, windows = n_pool, 1
        stages.append(StagePlan(i, n, min(s.batch_size, n), windows, s.steps_for(n), stage_seed(recipe.seed, i)))
    return StepPlan(stages)


def _checkpoint_state(path: Path) -> dict:
    """The `qat distill` state of a checkpoint (memory-mapped: the weights are not read)."""
    from qat.distill.module import STATE_KEY

    ck = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if STATE_KEY not in ck:
        raise ValueError(f"checkpoint {str(path)!r} has no qat distill state (not written by `qat distill`)")
    return ck


def run_distill(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False, callbacks=(),
                tensorboard: bool = True) -> dict:
    """Returns, on rank 0, {"output", "run_dir", "history", "png", "global_steps", "seconds", "module", "rank": 0};
    on the other processes {"rank", "run_dir", "global_steps", "module"} (they write nothing)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from transformers import AutoConfig

    from qat.checkpoint import load_student
    from qat.data.module import StepDataModule
    from qat.distill import params as P
    from qat.distill.callbacks import DistillCheckpoint, StageProgressBar
    from qat.distill.data import corpus_windows, eval_ids, training_pool
    from qat.distill.faults import checkpoint_plugins
    from qat.distill.module import STATE_KEY, DistillModule
    from qat.models import get_adapter
    from qat.models.loading import load_fp_model, load_tokenizer
    from qat.nn import quantize_model

    t_start = time.time()
    pre = preflight(recipe, resume, overwrite)
    run_dir, ckpt, model_dir, spec = pre["run_dir"], pre["ckpt"], pre["model_dir"], pre["spec"]
    accelerator, devices, num_nodes = process_layout(recipe)
    rank = launch_rank(devices)
    world = devices * num_nodes
    n_blocks = AutoConfig.from_pretrained(str(model_dir), local_files_only=True).num_hidden_layers
    plan = step_plan(recipe, n_blocks)
    state = _checkpoint_state(ckpt)[STATE_KEY] if ckpt is not None else None
    try:
        for s in plan.stages:
            s.check_world(world, recipe.stages[s.index].name)
    except ValueError as e:
        if state is None:
            raise
        raise RecipeError(f"cannot resume on {world} process(es) (the checkpoint was written by "
                          f"{state['world_size']}): {e}") from None
    if recipe.strategy == "fsdp":
        if accelerator == "cpu" and not torch.distributed.is_gloo_available():
            raise RecipeError("strategy fsdp on CPU needs torch.distributed with the gloo backend, which this torch "
                              "lacks")
        for i, s in enumerate(recipe.stages):
            if s.rounding.enabled:  # its learner keeps whole-size offsets and bakes into unsharded weights
                raise RecipeError(f"stage {i} ({s.name}): rounding {s.rounding.method} does not run under strategy "
                                  "fsdp yet; use strategy ddp")

    ckpt_cb = DistillCheckpoint(run_dir / CKPT_DIR, recipe.checkpoint_every)
    cbs = [ckpt_cb, *callbacks]
    if recipe.progress:
        cbs.insert(0, StageProgressBar())
    logger = TensorBoardLogger(str(run_dir), name="tb", version="") if tensorboard else False
    try:
        trainer = Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes,
                          strategy=make_strategy(recipe, accelerator, devices, num_nodes), max_epochs=1, max_steps=-1,
                          precision=recipe.precision, logger=logger, callbacks=cbs, enable_checkpointing=False,
                          enable_model_summary=False, enable_progress_bar=recipe.progress, num_sanity_val_steps=0,
                          limit_val_batches=0, default_root_dir=str(run_dir), log_every_n_steps=1,
                          use_distributed_sampler=False, plugins=checkpoint_plugins(rank))
    except Exception as e:  # Lightning's own checks of devices / nodes / strategy against the machine
        raise RecipeError(f"cannot set up {world} process(es) ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0]})") from None
    if state is not None and state["finished"]:
        return _finish_from_checkpoint(recipe, ckpt, state, pre, t_start, rank)
    sharded = recipe.strategy == "fsdp"
    device = torch.device("cpu") if sharded else trainer.strategy.root_device

    tokenizer = load_tokenizer(model_dir)
    teacher = load_fp_model(model_dir, device=device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    skeleton = copy.deepcopy(teacher)
    quantize_model(skeleton, spec, init=False)
    for i, s in enumerate(recipe.stages):
        P.check_selectors(skeleton, s.train, f"stage {i} ({s.name})")

    if rank == 0:  # the other processes write nothing, and read the run directory only to resume
        if ckpt is None and overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=str))

    d = recipe.data
    ev_ids = eval_ids(recipe.eval.file, tokenizer) if recipe.eval.file else None
    calib = None
    init: dict = {}
    ptq = None
    if ckpt is not None:
        student = skeleton  # weights come from the Lightning checkpoint
        init = {"resumed_from": str(ckpt)}
    else:
        del skeleton
        if recipe.student:
            student, _ = load_student(recipe.student, device=device)
            init = {"student": recipe.student}
        else:
            ptq = recipe.ptq
            if d.source == "text":
                calib = corpus_windows(d, tokenizer, ptq.calib_samples, ptq.seq_len, recipe.seed)
            student = copy.deepcopy(teacher)

    def make_pool(dist):  # the training pool (also the calibration source of a teacher/mixed run)
        return training_pool(d, teacher, tokenizer, model_dir, recipe.seed, d.cache_dir or run_dir / "data",
                             progress=recipe.progress, dist=dist)

    module = DistillModule(recipe, student, teacher, spec=spec, adapter=get_adapter(student), plan=plan,
                           run_dir=run_dir, eval_ids=ev_ids, ptq=ptq, calib=calib, sharded=sharded,
                           last_checkpoint=lambda: str(ckpt_cb.last_path) if ckpt_cb.last_path else None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|bottleneck).*")
        warnings.filterwarnings("ignore", message=".*configure_optimizers.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # by design, see quantizer_train_mode
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        try:
            trainer.fit(module, datamodule=StepDataModule(plan, make_pool), ckpt_path=str(ckpt) if ckpt else None)
        except Exception as e:
            if world > 1 and is_comm_failure(e):
                last = ckpt_cb.last_path or ckpt
                why = str(e) if isinstance(e, LostPeerError) else (f"process {rank} of {world} lost contact with the "
                                                                   f"others ({comm_error_text(e)})")
                raise LostPeerError(f"{why}; the run stopped{f' (last checkpoint {last})' if last else ''}: "
                                    "continue with --resume last") from e
            raise
    if not module.finished:
        raise TrainingIncompleteError(f"training stopped before the last stage finished (at stage "
                                      f"{module.stage_index}); continue with --resume last")
    if ptq is not None:
        init = {"ptq": {"method": ptq.method, "calib_samples": ptq.calib_samples, "seq_len": ptq.seq_len,
                        "seconds": module.ptq_seconds}}
    if rank != 0:
        return {"rank": rank, "run_dir": str(run_dir), "global_steps": module.global_step_, "module": module}
    if sharded:  # the gathered full state into a plain skeleton
        student = copy.deepcopy(_skeleton(model_dir, spec))
        student.load_state_dict({k.removeprefix("student."): v for k, v in module.final_state.items()})
    return _write_outputs(recipe, student, tokenizer, spec, model_dir, module.history, module.loss_log, init,
                          module.global_step_, overwrite, t_start, module=module)


def _skeleton(model_dir, spec):
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.nn import quantize_model

    cfg = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg)
    quantize_model(model, spec, init=False)
    return model.eval()


def _finish_from_checkpoint(recipe, ckpt, state, pre, t_start, rank: int) -> dict:
    """--resume of a run whose last checkpoint was written after the last stage (killed before the student was
    saved): rank 0 writes the outputs from it, nothing trains."""
    from qat.distill.module import STATE_KEY
    from qat.models.loading import load_tokenizer

    if rank != 0:
        return {"rank": rank, "run_dir": str(pre["run_dir"]), "global_steps": state["global_step"], "module": None}
    ck = _checkpoint_state(ckpt)
    student = _skeleton(pre["model_dir"], pre["spec"])
    student.load_state_dict({k.removeprefix("student."): v for k, v in ck["state_dict"].items()})
    st = ck[STATE_KEY]
    return _write_outputs(recipe, student, load_tokenizer(pre["model_dir"]), pre["spec"], pre["model_dir"],
                          st["history"], st["loss_log"], {"resumed_from": str(ckpt)}, st["global_step"], False,
                          t_start)


def _write_outputs(recipe, student, tokenizer, spec, model_dir, history, loss_log, init, steps, overwrite, t_start,
                   module=None) -> dict:
    from qat.checkpoint import save_student
    from qat.distill.callbacks import write_summary_png

    student.eval()
    meta = {"base_model": str(model_dir), "history": history, "init": init,
            "distill": {"recipe": recipe.to_dict(), "global_steps": steps, "seconds": round(time.time() - t_start, 1)}}
    out = save_student(student, tokenizer, spec, recipe.output, meta=json.loads(json.dumps(meta, default=str)),
                       overwrite=overwrite)
    png = write_summary_png(history, loss_log, out / "distill_summary.png",
                            title=f"{spec.describe()} · {Path(model_dir).name}")
    (out / "distill_history.json").write_text(json.dumps(history, indent=2, default=str))
    return {"output": str(out), "run_dir": str(recipe.resolved_run_dir()), "history": history, "png": str(png),
            "global_steps": steps, "seconds": round(time.time() - t_start, 1), "module": module, "rank": 0}
