"""Native export: a student's QuantLinears become packed tensors on disk, everything else stays floating point.

    OUT/config.json         the HF config (dtype = the export dtype) + `quantization_config` (see quantization_config())
    OUT/tokenizer files     copied from the student
    OUT/model.safetensors   for each quantized linear `<m>`: its weight quantizer's pack() tensors as `<m>.<key>`,
                            `<m>.bias`, `<m>.act_quantizer.<key>` (activation runtime parameters, when activations are
                            quantized), `<m>.rotation_signs` (input rotation); then every other parameter in the export
                            dtype and every buffer (non-persistent ones too, e.g. RoPE inv_freq) in its own dtype.

No latent FP weight of a quantized layer is written. qat.export.load.load_quantized reads this back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qat.config import QuantSpec
from qat.io import atomic_output_dir

QUANT_METHOD = "qat-distill"
EXPORT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class ExportReport:
    """What an export wrote, with honest size accounting (bytes)."""

    out_dir: Path
    format: str
    modules: int
    bits_per_weight: float  # over the quantized linears' weights, metadata included
    quantized_params: int
    file_bytes: int  # model.safetensors on disk
    packed_bytes: int  # tensors that encode quantized weights (pack() outputs)
    other_bytes: int  # everything else in the file: FP params, buffers, biases, act params, rotation signs
    fp16_bytes: int  # the same model with every parameter in fp16 (the usual baseline)
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        mb = 1e6
        return "\n".join([(f"exported {self.modules} quantized modules ({self.format}, {self.bits_per_weight:.3f} bits/weight) to "
                f"{self.out_dir}: {WEIGHTS_FILE} {self.file_bytes / mb:.2f} MB (packed weights "
                f"{self.packed_bytes / mb:.2f} MB + other tensors {self.other_bytes / mb:.2f} MB); fp16 model "
                f"{self.fp16_bytes / mb:.2f} MB, {self.fp16_bytes / max(self.file_bytes, 1):.2f}x smaller"),
                          *(f"note: {n}" for n in self.notes)])


def reference_architecture(config) -> nn.Module:
    """The unquantized architecture on the meta device (costs no memory): tells which modules are nn.Linear."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def fp16_baseline_bytes(model: nn.Module) -> int:
    """Bytes of the model with every (unique) parameter in fp16; quantized linears count as their weight + bias."""
    return sum(p.numel() * 2 for name, p in model.named_parameters() if "_quantizer." not in name)


def quantized_module_tensors(qlin, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(packed weight tensors, other runtime tensors) for one QuantLinear, keys relative to the module."""
    with torch.no_grad():
        packed = {k: v.detach().cpu().contiguous() for k, v in qlin.weight_quantizer.pack(qlin.weight).items()}
    other: dict[str, torch.Tensor] = {}
    if qlin.bias is not None:
        other["bias"] = qlin.bias.detach().to(dtype).cpu().contiguous()
    if qlin.act_quantizer is not None:
        for k, v in act_runtime_params(qlin.act_quantizer).items():
            other[f"act_quantizer.{k}"] = v.detach().cpu().contiguous()
    if qlin.rotation_block:
        other["rotation_signs"] = qlin.rotation_signs.detach().cpu().contiguous()
    clash = sorted(set(packed) & {k.split(".")[0] for k in other})
    if clash:
        raise ValueError(f"{qlin.weight_quantizer.format}.pack() uses reserved tensor name(s) {clash}")
    return packed, other


def act_runtime_params(act_quantizer: nn.Module) -> dict[str, torch.Tensor]:
    """The activation quantizer's learned runtime values (export_params()'s floats: clip_hi, clip_lo and, in knee mode,
    knee_hi, knee_lo) as float32 0-d tensors, which hold them exactly. Its static entries (mode, bits, sym, knee
    levels) are implied by the spec; a quantizer whose statics differ from what the runtime rebuilds is refused."""
    from qat.export.runtime import act_static_params

    params = dict(act_quantizer.export_params())
    static = act_static_params(act_quantizer.spec)
    for k, v in params.items():
        if not isinstance(v, float) and static.get(k) != v:
            raise ValueError(f"activation quantizer {k}={v!r} differs from what the spec implies ({static.get(k)!r})")
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in params.items() if isinstance(v, float)}


def quantization_config(spec: QuantSpec, modules: list[str], skipped: list[str], bits_per_weight: float,
                        dtype: torch.dtype) -> dict[str, Any]:
    w, a = spec.weight, spec.act
    return {
        "quant_method": QUANT_METHOD,
        "version": EXPORT_VERSION,
        "format": w.format,
        "bits": w.bits,
        "group_size": w.group_size,
        "act_bits": a.bits,
        "act_mode": a.mode,
        "act_sym": a.sym,
        "act_hadamard": a.hadamard,
        "description": spec.describe(),
        "bits_per_weight": bits_per_weight,
        "dtype": dtype_name(dtype),
        "modules": sorted(modules),
        "skipped_modules": sorted(skipped),
        "spec": spec.to_dict(),  # the full spec (sym, lwc, vq_dim, ...): what load_quantized rebuilds from
    }


def export_native(model: nn.Module, tokenizer, spec: QuantSpec, out_dir, *, dtype: torch.dtype = torch.float16,
                  overwrite: bool = False) -> ExportReport:
    """Write the packed export of a student (a model holding QuantLinears) to `out_dir`, atomically."""
    from qat.nn import model_bits_per_weight, quant_linears

    qlins = quant_linears(model)
    if not qlins:
        raise ValueError("the model has no quantized linear layers; nothing to export")
    from qat.models import get_adapter

    ref = reference_architecture(model.config)
    adapter = get_adapter(ref)
    ref_linears = {n for n, m in ref.named_modules() if adapter.is_linear(m)}
    skipped = sorted(ref_linears - set(qlins))  # linears left in floating point (lm_head, spec.skip)

    tensors: dict[str, torch.Tensor] = {}
    packed_bytes = 0
    for name, q in qlins.items():
        packed, other = quantized_module_tensors(q, dtype)
        for k, v in packed.items():
            tensors[f"{name}.{k}"] = v
            packed_bytes += v.numel() * v.element_size()
        for k, v in other.items():
            tensors[f"{name}.{k}"] = v
    prefixes = tuple(f"{n}." for n in qlins)
    for name, p in model.named_parameters():  # deduplicated: a tied lm_head is stored once, under its source
        if not name.startswith(prefixes):
            tensors[name] = p.detach().to(dtype).cpu().contiguous()
    for name, b in model.named_buffers():  # non-persistent buffers too: the loader builds on the meta device
        if not name.startswith(prefixes):
            tensors[name] = b.detach().cpu().contiguous()

    soft = [n for n, q in qlins.items() if getattr(q.weight_quantizer, "is_hard", True) is False]
    notes = []
    if soft:
        notes.append(f"{len(soft)} binary11 layer(s) are not hardened (e.g. {soft[0]}): the export stores the hard "
                     f"bitmap, which is what harden() gives, not the student's soft forward")
    acct = model_bits_per_weight(model)
    qc = quantization_config(spec, list(qlins), skipped, acct["bits_per_weight"], dtype)
    cfg = _export_config(model.config, dtype)
    with atomic_output_dir(out_dir, overwrite, kind="export") as tmp:
        cfg.save_pretrained(tmp)
        _add_to_config(tmp / "config.json", {"quantization_config": qc})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "quant_method": QUANT_METHOD})
        file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
    other_bytes = sum(v.numel() * v.element_size() for v in tensors.values()) - packed_bytes
    return ExportReport(Path(out_dir), spec.describe(), len(qlins), acct["bits_per_weight"],
                        acct["quantized_params"], file_bytes, packed_bytes, other_bytes, fp16_baseline_bytes(model),
                        tuple(notes))


def _export_config(config, dtype: torch.dtype):
    import copy

    cfg = copy.deepcopy(config)
    cfg.dtype = dtype
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    return cfg


def _add_to_config(path: Path, extra: dict[str, Any]) -> None:
    d = json.loads(path.read_text())
    d.update(extra)
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
