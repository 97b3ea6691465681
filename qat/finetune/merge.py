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
auto    exact when the adapter and the student allow it, else approx.
Adapters on floating-point layers (e.g. lm_head) are merged by W += D in both modes.
"""
from __future__ import annotations

import argparse
import json

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


def merge_adapter(student_dir, adapter_dir, output, *, mode: str = "auto", overwrite: bool = False) -> dict:
    """Merge and save; returns a report (mode, merged layers, the exact merge's worst bound ratio, the check)."""
    import dataclasses

    from qat.checkpoint import read_student_meta, save_student
    from qat.config import QuantSpec
    from qat.finetune.base import base_kind, load_base
    from qat.finetune.lora import load_adapter, read_adapter
    from qat.io import check_output_dir
    from qat.nn import QuantLinear

    if mode not in MODES:
        raise ValueError(f"unknown merge mode {mode!r}; choose one of {', '.join(MODES)}")
    check_output_dir(output, overwrite)
    if base_kind(student_dir) != "student":
        raise ValueError(f"--student {str(student_dir)!r} is not a student checkpoint (merge into the `qat ptq` / "
                         "`qat distill` checkpoint the adapter or its export came from)")
    meta = read_student_meta(student_dir)
    spec = QuantSpec.from_dict(meta["spec"])
    config, _ = read_adapter(adapter_dir)
    why = exact_reason(spec, config)
    if mode == "exact" and why is not None:
        raise ValueError(f"--mode exact: {why}; use --mode approx")
    exact = mode != "approx" and why is None

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
    merged.eval()
    with torch.no_grad():
        got = merged(input_ids=check_ids, use_cache=False).logits.double()
    check = {"tokens": check_ids.numel(), "max_abs_logit_diff": float((got - ref).abs().max()),
             "max_abs_logit": float(ref.abs().max())}
    info = {"merge": {"mode": "exact" if exact else "approx", "adapter": str(adapter_dir), "student": str(student_dir),
                      "layers": len(layers), "exact_bound_ratio": worst if exact else None, "check": check,
                      **({"why_not_exact": why} if why and not exact else {})}}
    out_meta = {k: v for k, v in meta.items() if k not in ("spec", "quantized", "bits_per_weight", "quantized_params",
                                                          "fp_params", "format_version")}
    save_student(merged, tok, new_spec, output, meta={**out_meta, **info}, overwrite=overwrite)
    return {"output": str(output), **info["merge"], "spec": new_spec.describe()}


def run(args: argparse.Namespace) -> int:
    r = merge_adapter(args.student, args.adapter, args.output, mode=args.mode, overwrite=args.overwrite)
    print(json.dumps(r))
    return 0

