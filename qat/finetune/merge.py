"""`qat merge --student DIR --adapter DIR --output DIR [--mode auto|exact|approx]`: fold a LoRA adapter back into the
low-bit student, which `qat export` then packs as usual.

exact   (uniform weight-only students, QA-LoRA adapters with the student's group size)
        QA-LoRA's branch is x D^T with D constant within each quantization group g (D[o, j] = d[o, g(j)]), so
            s (q - z) + d  =  s (q - (z - d / s))
        the adapter folds into the zero points: codes q and scales s stay, the dequantization zero becomes the float
        z - zero_shift with zero_shift = d / s (WeightSpec.float_zero; stored as float32, 32 instead of 8 bits per
        group). The merged weight W' equals W_hat + D up to float32 rounding of that storage and of the dequantization:
            |W' - (W_hat + D)| <= u (|W'| + s |q - z'| + s |z'| + |D|),  u = 2^-24,  z' = z - zero_shift
        which every merged layer is checked against (elementwise, in float64) before anything is written.
approx  (every format) latent weight += D (in the layer's rotated coordinates when it rotates its input), then the
        student's own quantizer re-derives codes from it with its trained parameters. A delta much smaller than the
        quantization step flips few codes, so most of the adapter's gain can be lost (docs/FINETUNE.md measures it).
        --refine-steps N then runs a short stage-1 pass (qat/distill/blockwise.py, N steps per block, latent weights
        and quantizer parameters) with the adapter model as the teacher, on windows of --data.
auto    exact when the adapter and the student allow it, else approx.
Adapters on floating-point layers (e.g. lm_head) are merged by W += D in both modes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

U32 = 2.0**-24  # float32 unit roundoff

MODES = ("auto", "exact", "approx")


def register(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into a student checkpoint (exact for QA-LoRA on uniform "
                                     "formats, approximate otherwise)")
    p.add_argument("--student", required=True, help="the student checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter directory written by qat finetune")
    p.add_argument("--output", required=True, help="merged student checkpoint to write")
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="approx: stage-1 steps per block against the adapter model afterwards (0 = none)")
    p.add_argument("--data", default=None, help="text for --refine-steps (e.g. the fine-tuning data)")
    p.add_argument("--refine-samples", type=int, default=16, help="windows of --data for --refine-steps")
    p.add_argument("--seq-len", type=int, default=512, help="window length for --refine-steps")
    p.set_defaults(func=run)


def exact_reason(spec, config) -> str | None:
    """None when the exact merge applies, else why not (one line)."""
    w = spec.weight
    if w.format != "uniform" or spec.act.enabled or w.float_zero:
        return f"the exact merge folds into integer group zero points of uniform weight-only students; this is " \
               f"{spec.describe()}"
    if not config.use_qalora:
        return "the exact merge needs a QA-LoRA adapter (qat finetune --lora.qalora true); this one is plain LoRA"
    if w.group_size == -1 or config.qalora_group_size != w.group_size:
        return f"the adapter pools groups of {config.qalora_group_size} inputs, the student's groups are " \
               f"{w.group_size}"
    if config.lora_bias:
        return "the adapter has a LoRA bias"
    return None


@torch.no_grad()
def fold_exact(layer, delta: torch.Tensor) -> float:
    """Fold a group-constant delta [out, in] (float64) into a float-zero uniform QuantLinear's zero_shift; returns the
    largest |W' - (W_hat + D)| / bound over the layer (<= 1 by the derivation above, else ValueError)."""
    q = layer.weight_quantizer
    g = q.group_size
    d = delta[:, ::g]  # [out, n_groups]; QA-LoRA's delta is constant within each group
    if not torch.equal(delta.view(q.out_features, q.n_groups, g), d.unsqueeze(-1).expand(-1, -1, g)):
        raise ValueError("delta is not constant within the quantization groups")
    w_before = layer.quantized_weight().double()
    s, z = q.scale_zero(layer.weight)
    q.zero_shift.copy_((d / s.double()).float())
    w_after = layer.quantized_weight().double()
    z1 = q.dequant_zero(z).double().repeat_interleave(g, 1)
    codes = (w_before / s.double().repeat_interleave(g, 1)) + z.double().repeat_interleave(g, 1)
    sg = s.double().repeat_interleave(g, 1)
    bound = U32 * (w_after.abs() + sg * (codes - z1).abs() + sg * z1.abs() + delta.abs()) * (1 + 4 * U32)
    err = (w_after - (w_before + delta)).abs()
    ratio = float((err / bound.clamp_min(1e-300)).max())
    if ratio > 1:
        raise ValueError(f"exact merge exceeded its float32 bound ({ratio:.3g}x)")
    return ratio


@torch.no_grad()
def add_to_latent(layer, delta: torch.Tensor) -> None:
    """latent += delta, in the rotated coordinates the latent weight is stored in (x W^T = (x T)(W T)^T)."""
    d = delta.to(torch.float32)
    if layer.rotation_block:
        d = layer.rotate_weight(d)
    layer.weight.add_(d.to(layer.weight.dtype))


def _float_zero_copy(layer, spec) -> None:
    """Give a uniform QuantLinear a float-zero quantizer with the same parameters (zero_shift = 0)."""
    from qat.quantizers import make_weight_quantizer

    old = layer.weight_quantizer
    new = make_weight_quantizer(spec.weight, layer.out_features, layer.in_features).to(layer.weight.device)
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    if unexpected or missing != ["zero_shift"]:
        raise ValueError(f"cannot convert {old.extra_repr()} to float zero points")
    new.train(old.training)
    layer.weight_quantizer, layer.spec = new, spec


def refine(student, teacher, spec, data, *, steps: int, samples: int, seq_len: int, tokenizer, progress: bool = False,
           batch_size: int = 2) -> list[dict]:
    """A short stage-1 pass: every block of `student` (latent weights + quantizer parameters, one window per block)
    against the same block of `teacher` (the adapter model), through the distillation trainer. Returns its history."""
    import shutil
    import tempfile

    from qat.distill import params as P
    from qat.data.module import StepDataModule
    from qat.distill.data import corpus_windows
    from qat.distill.module import DistillModule
    from qat.distill.recipe_cli import recipe_from_dict
    from qat.distill.run import fit, step_plan
    from qat.models import get_adapter

    run_dir = Path(tempfile.mkdtemp(prefix="qat-merge-refine-"))  # ours alone: removed at the end
    try:
        recipe = recipe_from_dict({
            "quant": spec.to_dict(), "data": {"train_file": str(data), "seq_len": seq_len, "num_samples": samples},
            "eval": {"file": None}, "output": str(run_dir / "unused"), "run_dir": str(run_dir), "progress": progress,
            "stages": [{"kind": "blockwise", "name": "refine", "train": ["latent", "wq"], "steps": steps,
                        "batch_size": batch_size, "loss": {"kind": "cosine"},
                        "optim": {"lr": {"latent": 1e-4, "wq": 1e-3}}}]})
        ids = corpus_windows(recipe.data, tokenizer, samples, seq_len, recipe.seed)
        device = next(student.parameters()).device
        adapter = get_adapter(student)
        plan = step_plan(recipe, len(adapter.blocks(student)))
        module = DistillModule(recipe, student, teacher, spec=spec, adapter=adapter, plan=plan, run_dir=run_dir)
        fit(module, device=device, run_dir=run_dir, precision="32-true", progress=progress, callbacks=[],
            tensorboard=False, datamodule=StepDataModule(plan, lambda dist: ids))
        P.freeze_all(student)
        return module.history
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def merge_adapter(student_dir, adapter_dir, output, *, mode: str = "auto", overwrite: bool = False,
                  refine_steps: int = 0, data=None, refine_samples: int = 16, seq_len: int = 512) -> dict:
    """Merge and save; returns a report (mode, merged layers, the exact merge's worst bound ratio, the check). The
    output is claimed (checked and locked, qat.io) before any work."""
    from qat.io import claim_output

    with claim_output(output, "student", overwrite=overwrite,
                      inputs={"--student": student_dir, "--adapter": adapter_dir, "--data": data}):
        return _merge_adapter(student_dir, adapter_dir, output, mode=mode, overwrite=overwrite,
                              refine_steps=refine_steps, data=data, refine_samples=refine_samples, seq_len=seq_len)


def _merge_adapter(student_dir, adapter_dir, output, *, mode: str, overwrite: bool, refine_steps: int, data,
                   refine_samples: int, seq_len: int) -> dict:
    import dataclasses

    from qat.checkpoint import read_student_meta, save_student
    from qat.config import QuantSpec
    from qat.finetune.base import base_kind, load_base
    from qat.finetune.lora import load_adapter, read_adapter
    from qat.nn import QuantLinear

    if mode not in MODES:
        raise ValueError(f"unknown merge mode {mode!r}; choose one of {', '.join(MODES)}")
    if refine_steps < 0 or refine_samples < 1 or seq_len < 2:
        raise ValueError("need --refine-steps >= 0, --refine-samples >= 1 and --seq-len >= 2")
    if refine_steps and mode == "exact":
        raise ValueError("--refine-steps refines an approximate merge; the exact merge needs none (use --mode approx)")
    if refine_steps and not (data and Path(data).is_file()):
        raise FileNotFoundError("--refine-steps needs --data, a text file to refine on (e.g. the fine-tuning data)"
                                if data is None else f"--refine-steps: --data {str(data)!r} does not exist")
    if base_kind(student_dir) != "student":
        raise ValueError(f"--student {str(student_dir)!r} is not a student checkpoint (merge into the `qat ptq` / "
                         "`qat distill` checkpoint the adapter or its export came from)")
    meta = read_student_meta(student_dir)
    spec = QuantSpec.from_dict(meta["spec"])
    config, _ = read_adapter(adapter_dir)
    why = exact_reason(spec, config)
    if mode == "exact" and why is not None:
        raise ValueError(f"--mode exact: {why}; use --mode approx")
    exact = mode != "approx" and why is None and not refine_steps

    model, tok, _ = load_base(student_dir)
    peft_model = load_adapter(model, adapter_dir)  # checks shapes and the base fingerprint
    check_ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = peft_model(input_ids=check_ids, use_cache=False).logits.double()
    new_spec = QuantSpec(weight=dataclasses.replace(spec.weight, float_zero=True), act=spec.act, skip=spec.skip) \
        if exact else spec
    layers, worst = [], 0.0
    base = peft_model.get_base_model()
    for name, m in list(base.named_modules()):
        if not (hasattr(m, "lora_A") and "default" in m.lora_A):
            continue
        delta = m.get_delta_weight("default").double()
        target = m.get_base_layer()
        if isinstance(target, QuantLinear):
            if exact:
                _float_zero_copy(target, new_spec)
                worst = max(worst, fold_exact(target, delta))
            else:
                add_to_latent(target, delta)
        else:  # a floating-point layer (lm_head): W += D
            with torch.no_grad():
                target.weight.add_(delta.to(target.weight.dtype))
        layers.append(name)
    merged = peft_model.unload()  # the base modules back in place of the LoRA wrappers, without peft's merge
    if exact:  # every other quantized linear keeps zero_shift = 0 (exactly its integer zero)
        for m in merged.modules():
            if isinstance(m, QuantLinear) and m.spec is not new_spec:
                _float_zero_copy(m, new_spec)
    history = None
    if refine_steps:
        from qat.finetune.base import meta_base
        from qat.finetune.lora import load_adapter as reload

        teacher = reload(load_base(student_dir)[0], adapter_dir).get_base_model()  # the un-merged adapter model
        skeleton = meta_base(student_dir)
        for name, p in merged.named_parameters():  # trainable as designed (a symmetric grid's zero never is)
            p.requires_grad_(skeleton.get_parameter(name).requires_grad)
        history = refine(merged, teacher, spec, data, steps=refine_steps, samples=refine_samples, seq_len=seq_len,
                         tokenizer=tok)
    merged.eval()
    with torch.no_grad():
        got = merged(input_ids=check_ids, use_cache=False).logits.double()
    check = {"tokens": check_ids.numel(), "max_abs_logit_diff": float((got - ref).abs().max()),
             "mean_abs_logit_diff": float((got - ref).abs().mean()), "max_abs_logit": float(ref.abs().max())}
    info = {"merge": {"mode": "exact" if exact else "approx", "adapter": str(adapter_dir), "student": str(student_dir),
                      "layers": len(layers), "exact_bound_ratio": worst if exact else None, "check": check,
                      **({"refine": {"steps_per_block": refine_steps, "data": str(data), "samples": refine_samples,
                                     "seq_len": seq_len, "history": history}} if refine_steps else {}),
                      **({"why_not_exact": why} if why and not exact else {})}}
    out_meta = {k: v for k, v in meta.items() if k not in ("spec", "quantized", "bits_per_weight", "quantized_params",
                                                          "fp_params", "format_version")}
    save_student(merged, tok, new_spec, output, meta={**out_meta, **info}, overwrite=overwrite)
    return {"output": str(output), **info["merge"], "spec": new_spec.describe()}


def run(args: argparse.Namespace) -> int:
    r = merge_adapter(args.student, args.adapter, args.output, mode=args.mode, overwrite=args.overwrite,
                      refine_steps=args.refine_steps, data=args.data, refine_samples=args.refine_samples,
                      seq_len=args.seq_len)
    r.pop("refine", None)
    print(json.dumps(r))
    return 0

