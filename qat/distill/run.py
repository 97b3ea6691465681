"""run_distill(recipe): everything `qat distill` does, callable from Python (tests, benchmarks).

Order of work, cheapest checks first so that bad input fails in a second and writes nothing:
  1. checks: output/run directories, resume checkpoint, model dir, data files, the given PTQ student's format
     against the recipe's quant spec, ACBQ units on a parallel-residual architecture, every stage's `train` entries
     against the student's parameter names (on a skeleton student, no PTQ yet)
  2. teacher, data (corpus windows or cached teacher samples), eval tokens
  3. student: the Lightning checkpoint (resume), an existing PTQ student, or PTQ (rtn|gptq) of a copy of the teacher
  4. Lightning fit of DistillModule; checkpoints in <run_dir>/checkpoints, TensorBoard in <run_dir>/tb
  5. the student checkpoint (qat.checkpoint.save_student) with the per-stage history in its meta, and
     distill_summary.png + distill_history.json beside it
"""
from __future__ import annotations

import copy
import json
import shutil
import time
import warnings
from pathlib import Path

import torch

from qat.config import QuantSpec
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
    from qat.distill.memory import check_memory

    check_memory(recipe.memory, [s.optim.name for s in recipe.stages], _device(recipe.device))
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


def run_distill(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False, callbacks=(),
                tensorboard: bool = True) -> dict:
    from qat.checkpoint import load_student, save_student
    from qat.distill import params as P
    from qat.distill.callbacks import DistillCheckpoint, write_summary_png
    from qat.distill.data import corpus_windows, eval_ids, teacher_windows
    from qat.distill.module import DistillModule
    from qat.models import get_adapter
    from qat.models.loading import load_fp_model, load_tokenizer
    from qat.nn import quantize_model
    from qat.ptq.pipeline import ptq_quantize

    t_start = time.time()
    pre = preflight(recipe, resume, overwrite)
    run_dir, ckpt, model_dir, spec = pre["run_dir"], pre["ckpt"], pre["model_dir"], pre["spec"]
    device = _device(recipe.device)

    tokenizer = load_tokenizer(model_dir)
    teacher = load_fp_model(model_dir, device=device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    skeleton = copy.deepcopy(teacher)
    quantize_model(skeleton, spec, init=False)
    for i, s in enumerate(recipe.stages):
        P.check_selectors(skeleton, s.train, f"stage {i} ({s.name})")

    if ckpt is None and overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=str))

    # data: the training pool (also the calibration source), and the held-out eval tokens
    d = recipe.data
    if d.source == "teacher":
        train = teacher_windows(d, teacher, tokenizer, model_dir, recipe.seed, d.cache_dir or run_dir / "data",
                                progress=recipe.progress)
    else:
        train = corpus_windows(d, tokenizer, d.num_samples, d.seq_len, recipe.seed)
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

    ckpt_cb = DistillCheckpoint(run_dir / CKPT_DIR, recipe.checkpoint_every)
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
    out = save_student(student, tokenizer, spec, recipe.output, meta=json.loads(json.dumps(meta, default=str)),
                       overwrite=overwrite)
    png = write_summary_png(module.history, module.loss_log, out / "distill_summary.png",
                            title=f"{spec.describe()} · {Path(model_dir).name}")
    (out / "distill_history.json").write_text(json.dumps(module.history, indent=2, default=str))
    return {"output": str(out), "run_dir": str(run_dir), "history": module.history, "png": str(png),
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
