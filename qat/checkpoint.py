"""Student checkpoints: a directory that `qat eval`, `qat distill` and `qat export` read.

    config.json, tokenizer files    the HF model's (so the architecture can be rebuilt offline)
    student.safetensors             the full state dict: latent weights + quantizer parameters, original names
    qat_student.json                {"spec": QuantSpec, "quantized": [module names], "history": [...], ...}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from qat.config import QuantSpec
from qat.io import atomic_output_dir

STUDENT_META = "qat_student.json"
STUDENT_WEIGHTS = "student.safetensors"


def save_student(model, tokenizer, spec: QuantSpec, out_dir, *, meta: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    from qat.nn import model_bits_per_weight, quant_linears

    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / STUDENT_WEIGHTS), metadata={"format": "pt"})
        info = {
            "format_version": 1,
            "spec": spec.to_dict(),
            "quantized": sorted(quant_linears(model)),
            **model_bits_per_weight(model),
            **(meta or {}),
        }
        (tmp / STUDENT_META).write_text(json.dumps(info, indent=2, sort_keys=True))
    return Path(out_dir)


def read_student_meta(path) -> dict[str, Any]:
    p = Path(path) / STUDENT_META
    if not p.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a qat student checkpoint (no {STUDENT_META})")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: corrupt student metadata ({e})") from None


def load_student(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """Rebuild the student (architecture from config.json, QuantLinears from the spec) and load its state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.nn import quantize_model

    path = Path(path)
    meta = read_student_meta(path)
    spec = QuantSpec.from_dict(meta["spec"])
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    names = quantize_model(model, spec, init=False)
    if sorted(names) != meta["quantized"]:
        raise ValueError(f"{path}: quantized modules in {STUDENT_META} do not match the architecture")
    wfile = path / STUDENT_WEIGHTS
    if not wfile.is_file():
        raise FileNotFoundError(f"{path}: missing {STUDENT_WEIGHTS}")
    try:
        missing, unexpected = load_model(model, str(wfile), strict=False)
    except Exception as e:  # truncated/corrupt safetensors
        raise ValueError(f"{wfile}: cannot read student weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ValueError(f"{wfile}: state dict does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), meta
