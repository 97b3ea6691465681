"""The frozen base of a fine-tuning run, an adapter's evaluation or a merge: every model-directory read of
qat/finetune goes through here (one place to switch to the project-wide loader).

    student   a `qat ptq` / `qat distill` checkpoint (qat_student.json): QuantLinear layers, fake-quant forward
    export    a native `qat export` directory: PackedLinear layers (Triton kernels on GPU, dequantize-once on CPU)
    fp        a plain Hugging Face directory (LoRA on the FP model, for comparison)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def base_kind(path) -> str:
    """student | export | fp, from the project-wide qat.models.loading.detect_kind (which checks the directory)."""
    from qat.models.loading import detect_kind

    kind = detect_kind(path)
    if kind == "compressed-tensors":
        raise ValueError(f"{path}: a compressed-tensors export cannot be fine-tuned here; use the qat student or "
                         "its native export")
    return {"native": "export"}.get(kind, kind)


def base_spec(path) -> dict | None:
    """The quant spec (as a dict) of a student or export directory; None for an FP model. Reads JSON only."""
    kind = base_kind(path)
    if kind == "student":
        from qat.checkpoint import read_student_meta

        return read_student_meta(path)["spec"]
    if kind == "export":
        return json.loads((Path(path) / "config.json").read_text())["quantization_config"]["spec"]
    return None


def load_base(path, device="cpu", dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer, kind). Exports load in `dtype` (float32 for training on CPU); on CPU their layers
    dequantize once and keep the dense weight (the reference path would dequantize on every call)."""
    from qat.models.loading import load_any, load_tokenizer

    kind = base_kind(path)
    if kind == "export":
        from qat.export.load import load_quantized
        from qat.export.runtime import set_dense_cache

        model = load_quantized(path, device=device, dtype=dtype)
        if torch.device(device).type == "cpu":
            set_dense_cache(model, True)
        tok = load_tokenizer(path)
    else:
        model, tok = load_any(path, dtype=dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tok, kind


def meta_base(path):
    """The base's module tree on the meta device (no weights read): QuantLinear for a student, the plain architecture
    otherwise (an export's PackedLinears sit at the same names). For target checks before any loading."""
    from qat.config import QuantSpec
    from qat.models.loading import meta_model
    from qat.nn import quantize_model

    model = meta_model(path)
    spec = base_spec(path)
    if spec is not None:
        with torch.device("meta"):
            quantize_model(model, QuantSpec.from_dict(spec), init=False)
    return model
