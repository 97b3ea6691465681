"""run_distill(recipe): everything `qat distill` does, callable from Python (tests, benchmarks), on one process or
on each process of a multi-process run (every process runs it; rank 0 alone claims outputs and writes).

Order of work, cheapest checks first so that bad input fails in a second and writes nothing:
  1. checks (preflight): output and run directories (not under a file, not an input, not inside each other), model dir
     and its kind, data files, the given PTQ student's format against the recipe's quant spec, memory switches
     against the device, ACBQ units on a parallel-residual architecture; the processes (devices, num_nodes, strategy
     against the machine and the launch environment; every stage's batch splits evenly over them, also on resume)
  2. claims (qat.io, rank 0): exclusive locks on the output and the run directory, then, under them, the run
     directory's state: a fresh start never writes into entries another program put there, --overwrite removes only
     what distill wrote (RUN_ENTRIES); a resume finds a usable checkpoint (last.ckpt, else prev.ckpt) and refuses a
     recipe or input that differs from the run's in a way that changes the result (resume_differences)
  3. the Trainer (strategy, cluster environment), the teacher (every tensor checked), every stage's `train` entries
     against the student's parameter names (on a skeleton), eval tokens; rank 0 prepares the run directory
  4. Lightning fit of DistillModule with the StepDataModule (qat/data/module.py): once the processes have met, the
     training pool (corpus windows or teacher samples) and the student (the checkpoint's on resume, an existing PTQ
     student, or PTQ of a copy of the teacher with statistics reduced over the processes); checkpoints in
     <run_dir>/checkpoints, TensorBoard in <run_dir>/tb
  5. rank 0: the student checkpoint (qat.checkpoint.save_student) with the per-stage history in its meta, and
     distill_summary.png + distill_history.json inside it
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import os
import sys
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
# what qat distill writes inside a run directory; --overwrite removes these and nothing else
RUN_ENTRIES = (CKPT_DIR, "tb", "data", "cache", "recipe.json", "inputs.json")
# recipe keys a resume may change: they do not change the result (docs/RELIABILITY.md). `device` and the batch size
# of evaluation change floating-point rounding only; the input paths are compared by content instead (INPUT_KEYS).
SAFE_ON_RESUME = ("progress", "checkpoint_every", "output", "run_dir", "device", "devices", "num_nodes", "strategy",
                  "dist_timeout", "eval.batch_size", "data.cache_dir",
                  "stages.*.spill_mb")
INPUT_KEYS = ("model", "student", "data.train_file", "eval.file")


class TrainingIncompleteError(RuntimeError):
    """fit() returned before the last stage ended (e.g. an interrupt Lightning handled); the run can be resumed."""


def _device(name: str) -> torch.device:
    from qat.models.loading import resolve_device

    return resolve_device(name, what="device")


def _resolved(p) -> str:
    from qat.io import resolved

    return str(resolved(p))


def preflight(recipe: Recipe, resume: str | None, overwrite: bool) -> dict:
    """All the checks that need neither model weights nor the output locks. Returns what later steps need."""
    from transformers import AutoConfig

    from qat.checkpoint import read_student_meta
    from qat.io import check_output_path
    from qat.models import get_adapter
    from qat.models.loading import check_kind, resolve_device, resolve_model_dir

    if not recipe.output:
        raise RecipeError("recipe needs an output directory (--output)")
    run_dir = Path(recipe.resolved_run_dir())
    device = resolve_device(recipe.device, what="device")
    meta = None
    if recipe.student:
        check_kind(recipe.student, ("student",), "--student")
        meta = read_student_meta(recipe.student)
    model_dir = recipe.model or (meta or {}).get("base_model")
    if not model_dir:
        raise RecipeError("recipe needs the FP teacher model directory (--model)")
    model_dir = resolve_model_dir(model_dir)
    check_kind(model_dir, ("fp",), "--model")
    inputs = {"--model": model_dir, "--student": recipe.student}
    out = check_output_path(recipe.output, what="--output", inputs=inputs)
    run = check_output_path(run_dir, what="--run_dir", inputs=inputs)
    if out == run or out.is_relative_to(run) and out.relative_to(run).parts[0] in RUN_ENTRIES:
        raise RecipeError(f"--output {recipe.output!r} is the run directory or inside what the run writes there")
    if run.is_relative_to(out):
        raise RecipeError(f"--run_dir {str(run_dir)!r} lies inside --output {recipe.output!r}; writing the student "
                          "would delete the run")
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
    from qat.distill.memory import check_memory

    check_memory(recipe.memory, [s.optim.name for s in recipe.stages], device)
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
    return {"run_dir": run_dir, "model_dir": model_dir, "spec": spec, "student_meta": meta, "inputs": inputs,
            "device": device}


# ---- the run directory: fresh start, overwrite, resume ------------------------------------------------------------

def input_fingerprints(recipe: Recipe, model_dir: Path) -> dict[str, dict]:
    """What the run reads, by content (qat.io.file_fingerprint): the teacher's config and weights, the PTQ student's,
    the training and evaluation text."""
    from qat.checkpoint import STUDENT_WEIGHTS
    from qat.io import file_fingerprint
    from qat.models.loading import weight_files

    out = {"model": {"path": str(model_dir), "sha256": [file_fingerprint(f) for f in
                                                        [model_dir / "config.json", *weight_files(model_dir)]]}}
    if recipe.student:
        s = Path(recipe.student)
        out["student"] = {"path": recipe.student, "sha256": [file_fingerprint(s / "config.json"),
                                                             file_fingerprint(s / STUDENT_WEIGHTS)]}
    for key, path in (("data.train_file", recipe.data.train_file), ("eval.file", recipe.eval.file)):
        if path:
            out[key] = {"path": path, "sha256": [file_fingerprint(Path(path))]}
    return out


def _matches(key: str, patterns) -> bool:
    return any(key == pat or fnmatch.fnmatchcase(key, pat) or key.startswith(pat + ".") for pat in patterns)


def resume_differences(stored_recipe: dict, recipe, stored_inputs: dict | None, inputs: dict | None,
                       safe=SAFE_ON_RESUME, input_keys=INPUT_KEYS) -> list[str]:
    """The changes between the run's stored recipe/inputs and the current ones that alter the result, as
    'key (old -> new)': every key but the `safe` ones. Inputs (`input_keys`) are compared by content when the run
    recorded it (inputs.json), else by resolved path. qat finetune passes its own key lists."""
    from qat.checkpoint import differing_keys

    current = json.loads(json.dumps(recipe.to_dict(), default=str))
    changed = []
    for key, old, new in differing_keys(stored_recipe, current):
        if _matches(key, safe) or (key in input_keys and stored_inputs is not None):
            continue
        if key in input_keys and old and new and _resolved(old) == _resolved(new):
            continue
        changed.append(f"{key} ({old!r} -> {new!r})")
    if stored_inputs is not None and inputs is not None:
        for key in sorted(set(stored_inputs) | set(inputs)):
            a, b = stored_inputs.get(key), inputs.get(key)
            if (a or {}).get("sha256") != (b or {}).get("sha256"):
                what = "added" if a is None else "removed" if b is None else "content differs"
                changed.append(f"{key} ({what}: {(b or a)['path']!r})")
    return changed


def resume_refusal(stored_file: Path, changed: list[str], safe) -> RecipeError:
    """The one error line of a --resume whose recipe or inputs differ from the run's (distill and finetune)."""
    return RecipeError(f"--resume: the run ({stored_file}) was started with a different recipe or input: "
                       f"{'; '.join(changed)}. Resuming would mix two runs; start a new one (another --output or "
                       f"--run_dir, or --overwrite true). Keys a resume may change: {', '.join(safe)}")


def check_run_dir(recipe: Recipe, pre: dict, resume: str | None, overwrite: bool) -> dict:
    """Under the run directory's lock: may this run start or resume here? Returns the checkpoint to resume, its files
    (the writer), whether the run directory is distill's, and the fingerprints of the inputs."""
    from qat.distill.callbacks import CheckpointFiles
    from qat.io import dir_kind

    run_dir: Path = pre["run_dir"]
    ours = run_dir.is_dir() and dir_kind(run_dir) == "distill-run"
    files = CheckpointFiles(run_dir / CKPT_DIR)
    inputs = input_fingerprints(recipe, pre["model_dir"])
    ckpt = None
    if resume:
        if resume == "last":
            ckpt, warning = files.find_resumable()
            if warning:
                print(f"qat distill: warning: {warning}", file=sys.stderr)
        else:
            from qat.models.loading import zip_problem

            ckpt = Path(resume)
            if not ckpt.is_file():
                raise FileNotFoundError(f"no checkpoint to resume at {resume!r}")
            problem = zip_problem(ckpt)
            if problem:
                raise ValueError(f"checkpoint {resume!r} is unusable: {problem}")
        stored_dir = ckpt.resolve().parent.parent  # the run the checkpoint belongs to
        stored_file = stored_dir / "recipe.json"
        if not stored_file.is_file():
            raise FileNotFoundError(f"cannot check the recipe against the run's: {stored_file} is missing")
        stored_inputs_file = stored_dir / "inputs.json"
        stored_inputs = json.loads(stored_inputs_file.read_text()) if stored_inputs_file.is_file() else None
        changed = resume_differences(json.loads(stored_file.read_text()), recipe, stored_inputs, inputs)
        if changed:
            raise resume_refusal(stored_file, changed, SAFE_ON_RESUME)
    fork = ckpt is not None and ckpt.resolve().parent.parent != run_dir.resolve()  # --resume PATH of another run
    if ckpt is None or fork:
        refuse_run_dir_clash(run_dir, files, ours, overwrite, RUN_ENTRIES, "qat distill")
    return {"ckpt": ckpt, "files": files, "ours": ours, "inputs": inputs, "fresh_run_dir": ckpt is None or fork}


def refuse_run_dir_clash(run_dir: Path, files, ours: bool, overwrite: bool, entries, command: str) -> None:
    """A fresh run may not start in a run directory that holds a checkpoint of its own kind (unless --overwrite), nor
    in one that holds any entry of the run (`entries`, the marker) it did not write: nothing is ever clobbered."""
    from qat.io import MARKER

    if not run_dir.is_dir():
        return
    if ours and (files.last.exists() or files.prev.exists()) and not overwrite:
        raise FileExistsError(f"run directory {str(run_dir)!r} already holds a checkpoint; pass --resume last to "
                              "continue it or --overwrite true to start over")
    if not ours:
        clash = [e for e in (*entries, MARKER) if (run_dir / e).exists()]
        if clash:
            raise FileExistsError(f"--run_dir {str(run_dir)!r} already holds {clash[0]!r}, which {command} did not "
                                  "write; not touching it: choose another --run_dir")


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove what qat distill wrote in the run directory (RUN_ENTRIES, the marker), nothing else."""
    from qat.io import clear_entries

    clear_entries(run_dir, RUN_ENTRIES)


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
    from qat.io import claim_output

    t_start = time.time()
    pre = preflight(recipe, resume, overwrite)
    pre["layout"] = process_layout(recipe)
    pre["rank"] = launch_rank(pre["layout"][1])
    with contextlib.ExitStack() as claims:
        if pre["rank"] == 0:  # one writer: the other processes hold no claim (they would wait on rank 0's lock)
            claims.enter_context(claim_output(recipe.output, "student", overwrite=overwrite, inputs=pre["inputs"]))
            claims.enter_context(claim_output(pre["run_dir"], "distill-run", overwrite=overwrite, what="--run_dir",
                                              inputs=pre["inputs"]))
        pre.update(check_run_dir(recipe, pre, resume, overwrite))
        return _train(recipe, pre, overwrite, callbacks, tensorboard, t_start)


def _train(recipe: Recipe, pre: dict, overwrite: bool, callbacks, tensorboard: bool, t_start: float) -> dict:
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
    from qat.io import write_marker
    from qat.models import get_adapter
    from qat.models.loading import load_fp_model, load_tokenizer
    from qat.nn import quantize_model

    run_dir, ckpt, model_dir, spec = pre["run_dir"], pre["ckpt"], pre["model_dir"], pre["spec"]
    accelerator, devices, num_nodes = pre["layout"]
    rank = pre["rank"]
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

    ckpt_cb = DistillCheckpoint(pre["files"], recipe.checkpoint_every)
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

    if rank == 0 and pre["fresh_run_dir"]:  # the run directory gets its marker, the recipe and the inputs it was
        if overwrite and pre["ours"]:       # started with; the other processes write nothing
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run_dir, "distill-run")
        (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=str))
        (run_dir / "inputs.json").write_text(json.dumps(pre["inputs"], indent=2))

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

    if recipe.memory.teacher != "fp":  # the student came from the FP weights; the targets come from int8/nf4 now
        from qat.distill.memory import load_teacher

        del teacher
        teacher = load_teacher(model_dir, device, recipe.memory.teacher)
    if recipe.memory.grad_checkpointing:
        from qat.distill.memory import ActivationCheckpointing

        ActivationCheckpointing(student)

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

    def summaries(tmp: Path) -> None:  # written with the student, inside its temporary directory
        write_summary_png(history, loss_log, tmp / "distill_summary.png",
                          title=f"{spec.describe()} · {Path(model_dir).name}")
        (tmp / "distill_history.json").write_text(json.dumps(history, indent=2, default=str))

    out = save_student(student, tokenizer, spec, recipe.output, meta=json.loads(json.dumps(meta, default=str)),
                       overwrite=overwrite, extra=summaries)
    return {"output": str(out), "run_dir": str(recipe.resolved_run_dir()), "history": history,
            "png": str(out / "distill_summary.png"),
            "global_steps": steps, "seconds": round(time.time() - t_start, 1), "module": module, "rank": 0}


def fit(module, *, device: torch.device, run_dir: Path, precision: str, progress: bool, callbacks, tensorboard: bool,
        ckpt: Path | None = None, datamodule=None) -> None:
    """Lightning fit on one device of a manually optimized module with its own checkpoint callback (FinetuneModule,
    or DistillModule with its StepDataModule for `qat merge --refine-steps`); TensorBoard in <run_dir>/tb, the
    stage progress bar when `progress`."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from qat.distill.callbacks import StageProgressBar

    cbs = [StageProgressBar(), *callbacks] if progress else list(callbacks)
    logger = TensorBoardLogger(str(run_dir), name="tb", version="") if tensorboard else False
    trainer = Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=1, max_steps=-1,
                      precision=precision, logger=logger, callbacks=cbs, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                      limit_val_batches=0, default_root_dir=str(run_dir), log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|bottleneck).*")
        warnings.filterwarnings("ignore", message=".*configure_optimizers.*")
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*__len__.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # by design, see quantizer_train_mode
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
