"""Student checkpoints: a directory that `qat eval`, `qat distill` and `qat export` read.

    config.json, tokenizer files    the HF model's (so the architecture can be rebuilt offline)
    student.safetensors             the full state dict: latent weights + quantizer parameters, original names; its
                                    header metadata records the quant spec it was written with ("qat_spec")
    qat_student.json                {"spec": QuantSpec, "quantized": [module names], "history": [...], ...}
    .qat-output.json                the output marker (qat.io)

load_student checks everything it reads: the metadata's keys and spec, the spec against the one the weights were
written with, the quantized module list against the architecture, every tensor's presence and shape, and the
quantizer values against the spec (qat.verify).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from qat.config import QuantConfigError, QuantSpec
from qat.io import atomic_output_dir

STUDENT_META = "qat_student.json"
STUDENT_WEIGHTS = "student.safetensors"
SPEC_METADATA_KEY = "qat_spec"


def save_student(model, tokenizer, spec: QuantSpec, out_dir, *, meta: dict[str, Any] | None = None,
                 overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """Write the student checkpoint atomically; `extra(tmp_dir)` may add files (plots, histories) to it."""
    from qat.nn import model_bits_per_weight, quant_linears

    with atomic_output_dir(out_dir, overwrite, kind="student") as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / STUDENT_WEIGHTS),
                   metadata={"format": "pt", SPEC_METADATA_KEY: json.dumps(spec.to_dict(), sort_keys=True)})
        info = {
            "format_version": 1,
            "spec": spec.to_dict(),
            "quantized": sorted(quant_linears(model)),
            **model_bits_per_weight(model),
            **(meta or {}),
        }
        (tmp / STUDENT_META).write_text(json.dumps(info, indent=2, sort_keys=True))
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def flat_items(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.0.c': leaf} for nested dicts/lists (to name the keys two configurations differ in)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat_items(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    if isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        out = {}
        for i, v in enumerate(d):
            out.update(flat_items(v, f"{prefix}{i}."))
        return out or {prefix[:-1]: []}
    return {prefix[:-1]: d}


def differing_keys(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """[(dotted key, value in a, value in b)] where two nested configurations differ ('<absent>' when missing)."""
    fa, fb = flat_items(a), flat_items(b)
    return [(k, fa.get(k, "<absent>"), fb.get(k, "<absent>")) for k in sorted(set(fa) | set(fb))
            if fa.get(k, "<absent>") != fb.get(k, "<absent>")]


def read_student_meta(path) -> dict[str, Any]:
    """qat_student.json, checked: a JSON object with a valid 'spec' and a 'quantized' list of names."""
    d = Path(path)
    p = d / STUDENT_META
    if not p.is_file():
        hint = f" (it has {STUDENT_WEIGHTS}: an incomplete student checkpoint)" if (d / STUDENT_WEIGHTS).exists() else ""
        raise FileNotFoundError(f"{str(path)!r} is not a qat student checkpoint (no {STUDENT_META}){hint}")
    try:
        meta = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: corrupt student metadata ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{p}: corrupt student metadata (not a JSON object)")  # noqa: TRY004
    for key in ("spec", "quantized"):
        if key not in meta:
            raise ValueError(f"{p}: corrupt student metadata (no {key!r})")
    if not isinstance(meta["quantized"], list) or not all(isinstance(n, str) for n in meta["quantized"]):
        raise ValueError(f"{p}: corrupt student metadata ('quantized' is not a list of module names)")
    try:
        QuantSpec.from_dict(meta["spec"])
    except (QuantConfigError, TypeError, AttributeError) as e:
        raise ValueError(f"{p}: invalid spec ({e})") from None
    return meta


def student_spec(path) -> QuantSpec:
    return QuantSpec.from_dict(read_student_meta(path)["spec"])


def load_student(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """Rebuild the student (architecture from config.json, QuantLinears from the spec) and load its state, checked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models import get_adapter
    from qat.models.loading import check_tensor_file, open_safetensors, read_config
    from qat.nn import quantize_model
    from qat.verify import fixed_buffers, verify_student

    path = Path(path)
    meta = read_student_meta(path)
    spec = QuantSpec.from_dict(meta["spec"])
    read_config(path)
    wfile = path / STUDENT_WEIGHTS
    if not wfile.is_file():
        raise FileNotFoundError(f"{path}: missing {STUDENT_WEIGHTS}")
    handle = open_safetensors(wfile)
    written = (handle.metadata() or {}).get(SPEC_METADATA_KEY)
    if written is not None:  # students written before the spec was embedded carry none
        try:
            written_spec = QuantSpec.from_dict(json.loads(written))
        except (ValueError, TypeError, AttributeError):
            raise ValueError(f"{wfile}: corrupt {SPEC_METADATA_KEY} metadata") from None
        diff = differing_keys(written_spec.to_dict(), spec.to_dict())
        if diff:
            keys = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diff[:3])
            raise ValueError(f"{path / STUDENT_META}: spec {spec.describe()} disagrees with the spec "
                             f"{STUDENT_WEIGHTS} was written with ({written_spec.describe()}: {keys})")
    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    get_adapter(cfg.model_type)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    names = quantize_model(model, spec, init=False)
    if sorted(names) != sorted(meta["quantized"]):
        extra = sorted(set(meta["quantized"]) - set(names))
        lacking = sorted(set(names) - set(meta["quantized"]))
        raise ValueError(f"{path}: quantized modules in {STUDENT_META} do not match the architecture (listed but not "
                         f"quantizable: {extra[:2]}, quantizable but not listed: {lacking[:2]})")
    state = model.state_dict()
    shared = {n for n, t in state.items() for m, u in state.items() if m != n and t.data_ptr() == u.data_ptr()}
    check_tensor_file(handle, wfile, state, optional=shared | {k for k in state if k.endswith("rotary_emb.inv_freq")},
                      describe=spec.describe())
    fresh = fixed_buffers(model)
    load_model(model, str(wfile), strict=False)
    verify_student(model, spec, str(wfile), fresh)
    return model.to(device).eval(), meta
