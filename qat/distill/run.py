"""run_distill(recipe): everything `qat distill` does, callable from Python (tests, benchmarks).

Order of work, cheapest checks first so that bad input fails in a second and writes nothing:
  1. checks (preflight): output and run directories (not under a file, not an input, not inside each other), model dir
     and its kind, data files, the given PTQ student's format against the recipe's quant spec, ACBQ units on a
     parallel-residual architecture
  2. claims (qat.io): exclusive locks on the output and the run directory, then, under them, the run directory's
     state: a fresh start never writes into entries another program put there, --overwrite removes only what distill
     wrote (RUN_ENTRIES); a resume finds a usable checkpoint (last.ckpt, else prev.ckpt) and refuses a recipe or
     input that differs from the run's in a way that changes the result (resume_differences)
  3. teacher (every tensor checked), every stage's `train` entries against the student's parameter names (on a
     skeleton student), data (corpus windows or cached teacher samples), eval tokens
  4. student: the Lightning checkpoint (resume), an existing PTQ student, or PTQ (rtn|gptq) of a copy of the teacher
  5. Lightning fit of DistillModule; checkpoints in <run_dir>/checkpoints, TensorBoard in <run_dir>/tb
  6. the student checkpoint (qat.checkpoint.save_student) with the per-stage history in its meta, and
     distill_summary.png + distill_history.json beside it
"""
from __future__ import annotations

import copy
import fnmatch
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from qat.config import QuantSpec
from qat.distill.recipe import Recipe, RecipeError
from qat.distill.stage import DistillContext, NonFiniteLossError  # noqa: F401  (re-exported for callers)

CKPT_DIR = "checkpoints"
# what qat distill writes inside a run directory; --overwrite removes these and nothing else
RUN_ENTRIES = (CKPT_DIR, "tb", "data", "cache", "recipe.json", "inputs.json")
# recipe keys a resume may change: they do not change the result (docs/RELIABILITY.md). `device` and the batch size
# of evaluation change floating-point rounding only; the input paths are compared by content instead (INPUT_KEYS).
SAFE_ON_RESUME = ("progress", "checkpoint_every", "output", "run_dir", "device", "eval.batch_size", "data.cache_dir",
                  "stages.*.spill_mb")
INPUT_KEYS = ("model", "student", "data.train_file", "eval.file")


class TrainingIncompleteError(RuntimeError):
    """fit() returned before the last stage ended (e.g. an interrupt Lightning handled); the run can be resumed."""


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


def _safe_on_resume(key: str) -> bool:
    return any(key == pat or fnmatch.fnmatchcase(key, pat) or key.startswith(pat + ".") for pat in SAFE_ON_RESUME)


def resume_differences(stored_recipe: dict, recipe: Recipe, stored_inputs: dict | None,
                       inputs: dict | None) -> list[str]:
    """The changes between the run's stored recipe/inputs and the current ones that alter the result, as
    'key (old -> new)'. Inputs are compared by content when the run recorded it (inputs.json), else by path."""
    from qat.checkpoint import differing_keys

    current = json.loads(json.dumps(recipe.to_dict(), default=str))
    changed = []
    for key, old, new in differing_keys(stored_recipe, current):
        if _safe_on_resume(key) or (key in INPUT_KEYS and stored_inputs is not None):
            continue
        if key in INPUT_KEYS and old and new and _resolved(old) == _resolved(new):
            continue
        changed.append(f"{key} ({old!r} -> {new!r})")
    if stored_inputs is not None and inputs is not None:
        for key in sorted(set(stored_inputs) | set(inputs)):
            a, b = stored_inputs.get(key), inputs.get(key)
            if (a or {}).get("sha256") != (b or {}).get("sha256"):
                what = "added" if a is None else "removed" if b is None else "content differs"
                changed.append(f"{key} ({what}: {(b or a)['path']!r})")
    return changed


def check_run_dir(recipe: Recipe, pre: dict, resume: str | None, overwrite: bool) -> dict:
    """Under the run directory's lock: may this run start or resume here? Returns the checkpoint to resume, its files
    (the writer), whether the run directory is distill's, and the fingerprints of the inputs."""
    from qat.distill.callbacks import CheckpointFiles
    from qat.io import MARKER, dir_kind

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
            raise RecipeError(f"--resume: the run ({stored_file}) was started with a different recipe or input: "
                              f"{'; '.join(changed)}. Resuming would mix two runs; start a new one (another --output "
                              f"or --run_dir, or --overwrite true). Keys a resume may change: "
                              f"{', '.join(SAFE_ON_RESUME)}")
    fork = ckpt is not None and ckpt.resolve().parent.parent != run_dir.resolve()  # --resume PATH of another run
    if (ckpt is None or fork) and run_dir.is_dir():
        if ours and (files.last.exists() or files.prev.exists()) and not overwrite:
            raise FileExistsError(f"run directory {str(run_dir)!r} already holds a checkpoint; pass --resume last to "
                                  "continue it or --overwrite true to start over")
        if not ours:
            clash = [e for e in (*RUN_ENTRIES, MARKER) if (run_dir / e).exists()]
            if clash:
                raise FileExistsError(f"--run_dir {str(run_dir)!r} already holds {clash[0]!r}, which qat distill did "
                                      "not write; not touching it: choose another --run_dir")
    return {"ckpt": ckpt, "files": files, "ours": ours, "inputs": inputs, "fresh_run_dir": ckpt is None or fork}


def clear_run_dir(run_dir: Path) -> None:
    """--overwrite: remove what qat distill wrote in the run directory (RUN_ENTRIES, the marker), nothing else."""
    from qat.io import MARKER

    for name in (*RUN_ENTRIES, MARKER):
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def run_distill(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False, callbacks=(),
                tensorboard: bool = True) -> dict:
    from qat.io import claim_output

    t_start = time.time()
    pre = preflight(recipe, resume, overwrite)
    with claim_output(recipe.output, "student", overwrite=overwrite, inputs=pre["inputs"]), \
            claim_output(pre["run_dir"], "distill-run", overwrite=overwrite, what="--run_dir", inputs=pre["inputs"]):
        pre.update(check_run_dir(recipe, pre, resume, overwrite))
        return _train(recipe, pre, overwrite, callbacks, tensorboard, t_start)


def _train(recipe: Recipe, pre: dict, overwrite: bool, callbacks, tensorboard: bool, t_start: float) -> dict:
    from qat.checkpoint import load_student, save_student
    from qat.distill import params as P
    from qat.distill.callbacks import DistillCheckpoint, write_summary_png
    from qat.distill.data import corpus_windows, eval_ids, training_pool
    from qat.distill.module import DistillModule
    from qat.io import write_marker
    from qat.models import get_adapter
    from qat.models.loading import load_fp_model, load_tokenizer
    from qat.nn import quantize_model
    from qat.ptq.pipeline import ptq_quantize

    run_dir, ckpt, model_dir, spec = pre["run_dir"], pre["ckpt"], pre["model_dir"], pre["spec"]
    device = pre["device"]

    tokenizer = load_tokenizer(model_dir)
    teacher = load_fp_model(model_dir, device=device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    skeleton = copy.deepcopy(teacher)
    quantize_model(skeleton, spec, init=False)
    for i, s in enumerate(recipe.stages):
        P.check_selectors(skeleton, s.train, f"stage {i} ({s.name})")

    if pre["fresh_run_dir"]:  # the run directory gets its marker, the recipe and the inputs it was started with
        if overwrite and pre["ours"]:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run_dir, "distill-run")
        (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=str))
        (run_dir / "inputs.json").write_text(json.dumps(pre["inputs"], indent=2))

    # data: the training pool (also the calibration source), and the held-out eval tokens
    d = recipe.data
    train = training_pool(d, teacher, tokenizer, model_dir, recipe.seed, d.cache_dir or run_dir / "data",
                          progress=recipe.progress)
    ev_ids = eval_ids(recipe.eval.file, tokenizer) if recipe.eval.file else None

    init: dict = {}
    if ckpt is not None:
        student = skeleton  # weights come from the Lightning checkpoint
        init = {"resumed_from": str(ckpt)}
    else:
        del skeleton
        if recipe.student:
            student, _ = load_student(recipe.student, device=device)
            init = {"student": recipe.student}
        else:
            pt = recipe.ptq
            if d.source == "text":
                calib = corpus_windows(d, tokenizer, pt.calib_samples, pt.seq_len, recipe.seed)
            else:
                calib = train[: pt.calib_samples, : pt.seq_len]
            student = copy.deepcopy(teacher)
            t0 = time.time()
            ptq_quantize(student, spec, calib, pt.method, act_order=pt.act_order, damp=pt.damp,
                         progress=recipe.progress)
            init = {"ptq": {"method": pt.method, "calib_samples": pt.calib_samples, "seq_len": pt.seq_len,
                            "seconds": round(time.time() - t0, 1)}}
    student.to(device)
    if recipe.memory.teacher != "fp":  # the student came from the FP weights; the targets come from int8/nf4 now
        from qat.distill.memory import load_teacher

        del teacher
        teacher = load_teacher(model_dir, device, recipe.memory.teacher)
    if recipe.memory.grad_checkpointing:
        from qat.distill.memory import ActivationCheckpointing

        ActivationCheckpointing(student)
    designed = P.snapshot_trainable(student)
    P.freeze_all(student)

    ckpt_cb = DistillCheckpoint(pre["files"], recipe.checkpoint_every)
    ctx = DistillContext(student=student, teacher=teacher, adapter=get_adapter(student), spec=spec, train_ids=train,
                         device=device, run_dir=run_dir, seed=recipe.seed, designed=designed,
                         last_checkpoint=lambda: str(ckpt_cb.last_path) if ckpt_cb.last_path else None)
    module = DistillModule(ctx, recipe, ev_ids)
    ctx.backward = module.manual_backward
    fit(module, device=device, run_dir=run_dir, precision=recipe.precision, progress=recipe.progress,
        callbacks=[ckpt_cb, *callbacks], tensorboard=tensorboard, ckpt=ckpt)
    if not module.finished:
        raise TrainingIncompleteError(f"training stopped before the last stage finished (at stage "
                                      f"{module.stage_index}); continue with --resume last")

    student.eval()
    meta = {"base_model": str(model_dir), "history": module.history, "init": init,
            "distill": {"recipe": recipe.to_dict(), "global_steps": module.global_step_,
                        "seconds": round(time.time() - t_start, 1)}}

    def summaries(tmp: Path) -> None:  # written with the student, inside its temporary directory
        write_summary_png(module.history, module.loss_log, tmp / "distill_summary.png",
                          title=f"{spec.describe()} · {Path(model_dir).name}")
        (tmp / "distill_history.json").write_text(json.dumps(module.history, indent=2, default=str))

    out = save_student(student, tokenizer, spec, recipe.output, meta=json.loads(json.dumps(meta, default=str)),
                       overwrite=overwrite, extra=summaries)
    return {"output": str(out), "run_dir": str(run_dir), "history": module.history,
            "png": str(out / "distill_summary.png"),
            "global_steps": module.global_step_, "seconds": round(time.time() - t_start, 1), "module": module}


def fit(module, *, device: torch.device, run_dir: Path, precision: str, progress: bool, callbacks, tensorboard: bool,
        ckpt: Path | None = None) -> None:
    """Lightning fit of a tick-driven module (DistillModule, FinetuneModule: one optimizer step per tick, manual
    optimization, own checkpoint callback); TensorBoard in <run_dir>/tb, the stage progress bar when `progress`."""
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
        trainer.fit(module, ckpt_path=str(ckpt) if ckpt else None)
