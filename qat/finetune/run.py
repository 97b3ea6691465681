"""run_finetune(recipe): everything `qat finetune` does, callable from Python (tests, benchmarks).

  1. checks that need no weights: output / run directories, resume checkpoint, model kind, data files, teacher,
     loss vs teacher, memory switches vs device, LoRA targets (on the base's module tree built on the meta device)
  2. the frozen base (qat/finetune/base.py), the teacher (FP, int8 or nf4), training windows, eval tokens
  3. peft LoRA around the quantized linears (qat/finetune/lora.py), optional activation checkpointing
  4. Lightning fit of FinetuneModule; checkpoints in <run_dir>/checkpoints, TensorBoard in <run_dir>/tb
  5. the adapter directory (peft format + qat_adapter.json) and finetune_summary.png beside it
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from qat.distill.recipe import RecipeError
from qat.distill.run import CKPT_DIR, TrainingIncompleteError, fit
from qat.finetune.recipe import FinetuneRecipe


RUN_ENTRIES = (CKPT_DIR, "tb", "finetune.json")  # what qat finetune writes in its run directory
# recipe keys a --resume may change: they do not alter the adapter it trains (activation checkpointing recomputes the
# same forward); every other change is refused. Inputs are compared by resolved path.
SAFE_ON_RESUME = ("progress", "checkpoint_every", "output", "run_dir", "device", "eval.batch_size",
                  "memory.grad_checkpointing")
INPUT_KEYS = ("model", "teacher", "data", "eval.file")


def resume_path(files, resume: str | None) -> Path | None:
    """The checkpoint to resume: --resume last (the newest good one of the run directory, falling back to the
    previous when the last is damaged) or a path."""
    if not resume:
        return None
    if resume == "last":
        p, warning = files.find_resumable()
        if warning:
            print(f"qat finetune: warning: {warning}", file=sys.stderr)
        return p
    from qat.models.loading import zip_problem

    p = Path(resume)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint to resume at {resume!r}")
    problem = zip_problem(p)
    if problem:
        raise ValueError(f"checkpoint {resume!r} is unusable: {problem}")
    return p


def check_run_dir(recipe: FinetuneRecipe, run_dir: Path, resume: str | None, overwrite: bool) -> dict:
    """Under the run directory's lock: the checkpoint to resume, its files (the writer), and whether the directory
    starts fresh. A resume with a recipe that would change the result is refused (the run's finetune.json against
    this one). A directory qat finetune did not write is never cleared; one it wrote is cleared only with
    --overwrite (and only of RUN_ENTRIES)."""
    from qat.distill.callbacks import CheckpointFiles
    from qat.distill.run import refuse_run_dir_clash, resume_differences, resume_refusal
    from qat.io import dir_kind

    files = CheckpointFiles(run_dir / CKPT_DIR)
    ckpt = resume_path(files, resume)
    if ckpt is not None:
        stored = ckpt.resolve().parent.parent / "finetune.json"  # the recipe of the run the checkpoint belongs to
        if not stored.is_file():
            raise FileNotFoundError(f"cannot check the recipe against the run's: {stored} is missing")
        changed = resume_differences(json.loads(stored.read_text()), recipe, None, None, safe=SAFE_ON_RESUME,
                                     input_keys=INPUT_KEYS)
        if changed:
            raise resume_refusal(stored, changed, SAFE_ON_RESUME)
    ours = run_dir.is_dir() and dir_kind(run_dir) == "finetune-run"
    if ckpt is None:
        refuse_run_dir_clash(run_dir, files, ours, overwrite, RUN_ENTRIES, "qat finetune")
    return {"ckpt": ckpt, "files": files, "ours": ours}


def clear_run_dir(run_dir: Path) -> None:
    from qat.io import clear_entries

    clear_entries(run_dir, RUN_ENTRIES)


def lora_targets(recipe: FinetuneRecipe, base) -> list[str] | str:
    """peft target_modules: the recipe's list (an entry 're:<regex>' is one regular expression), or every quantized
    linear of `base` (a module tree, real or meta)."""
    from qat.finetune.lora import default_targets

    t = recipe.lora.targets
    if t is None:
        return default_targets(base)
    if isinstance(t, str):
        t = [t]
    if len(t) == 1 and t[0].startswith("re:"):
        return t[0][3:]
    if any(x.startswith("re:") for x in t):
        raise RecipeError("lora.targets: give module names, or exactly one 're:<regex>'")
    return list(t)


def qalora_group(recipe: FinetuneRecipe, spec: dict | None, modules) -> int:
    """QA-LoRA's pooling group: the student's quantization group, checked to be foldable into its zero points."""
    if not recipe.lora.qalora:
        return 0
    from qat.config import QuantSpec

    if spec is None:
        raise RecipeError("lora.qalora pools over quantization groups; the model is not quantized")
    qs = QuantSpec.from_dict(spec)
    w = qs.weight
    if w.format != "uniform" or w.group_size == -1 or qs.act.enabled or w.float_zero:
        raise RecipeError(f"lora.qalora needs uniform group-wise weights with floating-point activations (its merge "
                          f"folds into the group zero points); the model is {qs.describe()}")
    for name, m in modules:
        if m.in_features % w.group_size:
            raise RecipeError(f"lora.qalora: group {w.group_size} does not divide {name}'s {m.in_features} inputs")
    return w.group_size


def preflight(recipe: FinetuneRecipe, resume: str | None, overwrite: bool) -> dict:
    from transformers import AutoConfig

    from qat.distill.memory import check_memory
    from qat.finetune.base import base_kind, base_spec, meta_base
    from qat.finetune.lora import check_targets
    from qat.io import check_output_path
    from qat.models.loading import resolve_device, resolve_model_dir

    run_dir = Path(recipe.resolved_run_dir())
    inputs = {"--model": recipe.model, "--teacher": recipe.teacher, "--data": recipe.data,
              "--eval.file": recipe.eval.file}
    check_output_path(recipe.output, inputs=inputs)
    check_output_path(run_dir, what="--run_dir", inputs=inputs)
    model_dir = resolve_model_dir(recipe.model)
    kind, spec = base_kind(model_dir), base_spec(model_dir)
    for path, what in ((recipe.data, "--data"), (recipe.eval.file, "--eval.file")):
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path!r} does not exist")
    if recipe.teacher:
        cfg_t = AutoConfig.from_pretrained(str(resolve_model_dir(recipe.teacher)), local_files_only=True)
        cfg_b = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        for k in ("model_type", "vocab_size"):
            if getattr(cfg_t, k, None) != getattr(cfg_b, k, None):
                raise RecipeError(f"--teacher {recipe.teacher!r} has {k}={getattr(cfg_t, k, None)}, the model "
                                  f"{str(model_dir)!r} has {getattr(cfg_b, k, None)}")
    device = resolve_device(recipe.device, what="device")
    check_memory(recipe.memory, [recipe.optim.name], device)
    skeleton = meta_base(model_dir)
    targets = lora_targets(recipe, skeleton)
    names = check_targets(skeleton, targets)
    group = qalora_group(recipe, spec, [(n, skeleton.get_submodule(n)) for n in names])
    return {"run_dir": run_dir, "inputs": inputs, "model_dir": model_dir, "kind": kind, "spec": spec, "device": device,
            "targets": targets, "qalora_group": group}


def run_finetune(recipe: FinetuneRecipe, *, resume: str | None = None, overwrite: bool = False, callbacks=(),
                 tensorboard: bool = True) -> dict:
    from qat.io import claim_output

    t_start = time.time()
    pre = preflight(recipe, resume, overwrite)
    with claim_output(recipe.output, "adapter", overwrite=overwrite, inputs=pre["inputs"]), \
            claim_output(pre["run_dir"], "finetune-run", overwrite=overwrite, what="--run_dir", inputs=pre["inputs"]):
        pre.update(check_run_dir(recipe, pre["run_dir"], resume, overwrite))
        return _train(recipe, pre, overwrite, callbacks, tensorboard, t_start)


def _train(recipe: FinetuneRecipe, pre: dict, overwrite: bool, callbacks, tensorboard: bool, t_start: float) -> dict:
    from peft import get_peft_model

    from qat.config import QuantSpec
    from qat.distill import params as P
    from qat.distill.callbacks import DistillCheckpoint, write_summary_png
    from qat.distill.data import eval_ids
    from qat.distill.memory import ActivationCheckpointing, load_teacher
    from qat.data.module import StagePlan, StepPlan
    from qat.distill.stage import DistillContext, stage_seed
    from qat.finetune.base import load_base
    from qat.finetune.lora import base_fingerprint, lora_config, peft_warnings, save_adapter
    from qat.finetune.module import FinetuneModule
    from qat.models import get_adapter

    from qat.io import write_marker

    run_dir, ckpt, device = pre["run_dir"], pre["ckpt"], pre["device"]

    base, tokenizer, kind = load_base(pre["model_dir"], device=device)
    teacher = load_teacher(recipe.teacher, device, recipe.memory.teacher) if recipe.teacher else None
    train = training_windows(recipe, tokenizer)
    ev_ids = eval_ids(recipe.eval.file, tokenizer) if recipe.eval.file else None

    if ckpt is None:  # a fresh run: the directory gets its marker and the recipe
        if overwrite and pre["ours"]:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_marker(run_dir, "finetune-run")
        (run_dir / "finetune.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=str))

    lora = recipe.lora
    cfg = lora_config(lora.r, lora.alpha, pre["targets"], dropout=lora.dropout, qalora_group=pre["qalora_group"])
    torch.manual_seed(recipe.seed)  # LoRA A's initialisation
    with peft_warnings():
        model = get_peft_model(base, cfg)
    adapted = [n for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    fingerprint = base_fingerprint(model.get_base_model(), adapted)
    if recipe.memory.grad_checkpointing:
        ActivationCheckpointing(model.get_base_model())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    ckpt_cb = DistillCheckpoint(pre["files"], recipe.checkpoint_every)
    spec = QuantSpec.from_dict(pre["spec"]) if pre["spec"] else QuantSpec()
    stage_spec = recipe.stage_spec()
    n = len(train)
    plan = StepPlan([StagePlan(0, n, min(stage_spec.batch_size, n), 1, stage_spec.steps_for(n),
                               stage_seed(recipe.seed, 0))])
    ctx = DistillContext(student=model, teacher=teacher, adapter=get_adapter(base), spec=spec, train_ids=train,
                         device=device, run_dir=run_dir, seed=recipe.seed, designed=P.snapshot_trainable(model),
                         plan=plan, last_checkpoint=lambda: str(ckpt_cb.last_path) if ckpt_cb.last_path else None)
    module = FinetuneModule(ctx, stage_spec, recipe.eval, ev_ids, fingerprint)
    ctx.backward = module.manual_backward
    fit(module, device=device, run_dir=run_dir, precision=recipe.precision, progress=recipe.progress,
        callbacks=[ckpt_cb, *callbacks], tensorboard=tensorboard, ckpt=ckpt)
    if not module.finished:
        raise TrainingIncompleteError("training stopped before the adapter finished; continue with --resume last")

    model.eval()
    hist = module.history
    meta = {"base": str(pre["model_dir"]), "base_kind": kind, "base_fingerprint": fingerprint, "spec": pre["spec"], "history": hist,
            "trainable_params": trainable, "tokens": hist[-1].get("tokens"), "global_steps": module.global_step_,
            "teacher": recipe.teacher, "recipe": recipe.to_dict(), "seconds": round(time.time() - t_start, 1)}

    def summary(tmp: Path) -> None:  # written with the adapter, inside its temporary directory
        write_summary_png(hist, module.loss_log, tmp / "finetune_summary.png",
                          title=f"LoRA r={lora.r} on {Path(pre['model_dir']).name}")

    out = save_adapter(model, recipe.output, json.loads(json.dumps(meta, default=str)), overwrite=overwrite,
                       extra=summary)
    return {"output": str(out), "run_dir": str(run_dir), "history": hist, "png": str(out / "finetune_summary.png"),
            "module": module,
            "model": model, "trainable_params": trainable, "global_steps": module.global_step_,
            "seconds": meta["seconds"]}


def training_windows(recipe: FinetuneRecipe, tokenizer) -> torch.Tensor:
    """`num_samples` windows of `seq_len` tokens at seeded offsets of --data (the distillation data path)."""
    from qat.distill.data import corpus_windows
    from qat.distill.recipe import DataSpec

    return corpus_windows(DataSpec(train_file=recipe.data), tokenizer, recipe.num_samples, recipe.seq_len,
                          recipe.seed)
