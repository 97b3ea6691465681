"""Export uniform-format students as compressed-tensors `pack-quantized` checkpoints (what llm-compressor writes and
vLLM / transformers+compressed-tensors read).

The mapping is exact, so a model loaded by that stack computes the same weights as the student:
  - codes: our packing (qat_kernels.packing) is a little-endian bit stream per row, which is exactly compressed-tensors'
    dense int32 packing of the offset codes q_signed + 2^(b-1); so `weight_packed` is our byte stream padded to whole
    int32 words and reinterpreted. Only bit widths that divide 32 (2, 4, 8) are written: their layout is the same in
    every compressed-tensors release (3/5/6/7-bit packing changed between releases).
  - zero points: ours are unsigned z; compressed-tensors stores signed zp = z - 2^(b-1), packed along the output dim
    with the same offset, i.e. the same unsigned z bit stream along dim 0. Symmetric grids (z = 2^(b-1), zp = 0) omit it.
  - scales: stored in the model dtype, as the format requires (fp16 scales are exact; bf16 would round them).
Weight-only: activation quantization, input rotations, binary11 and vq have no compressed-tensors equivalent.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from qat_kernels.packing import pack_bits
from safetensors.torch import save_file
from torch import nn

from qat.config import QuantConfigError, QuantSpec
from qat.export.pack import (
    WEIGHTS_FILE,
    ExportReport,
    _add_to_config,
    _export_config,
    fp16_baseline_bytes,
    reference_architecture,
)
from qat.io import atomic_output_dir

CT_BITS = (2, 4, 8)


def check_compressed_tensors_spec(spec: QuantSpec) -> None:
    w = spec.weight
    if w.format != "uniform":
        raise QuantConfigError(f"compressed-tensors export needs uniform weights, got format {w.format!r} "
                               f"(use --format native)")
    if w.bits not in CT_BITS:
        raise QuantConfigError(f"compressed-tensors export supports bits {CT_BITS}, got {w.bits} (use --format native)")
    if w.float_zero:
        raise QuantConfigError("compressed-tensors export stores integer zero points; this student has float zero "
                               f"points ({spec.describe()}, a merged QA-LoRA adapter) (use --format native)")
    if spec.act.enabled or spec.act.hadamard:
        raise QuantConfigError(f"compressed-tensors export is weight-only; this student quantizes activations "
                               f"({spec.describe()}) (use --format native)")


def bytes_to_int32_words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n_bytes] little-endian bit streams -> int32 [rows, ceil(n_bytes / 4)] holding the same bits."""
    if sys.byteorder != "little":
        raise RuntimeError("compressed-tensors export assumes a little-endian host")
    pad = (-packed.shape[-1]) % 4
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    return packed.contiguous().view(torch.int32)


def ct_module_tensors(qlin, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors for one QuantLinear (keys relative to the module)."""
    bits = qlin.spec.weight.bits
    with torch.no_grad():
        pk = qlin.weight_quantizer.pack(qlin.weight)
    out = {
        "weight_packed": bytes_to_int32_words(pk["qweight"].cpu()),
        "weight_scale": pk["scales"].to(dtype).cpu().contiguous(),
        "weight_shape": torch.tensor([qlin.out_features, qlin.in_features], dtype=torch.int64),
    }
    if not qlin.spec.weight.sym:  # unsigned z along the output dim == compressed-tensors' offset zero-point stream
        zt = pack_bits(pk["zeros"].cpu().to(torch.int32).t(), bits)  # [ng, bytes(out)]
        out["weight_zero_point"] = bytes_to_int32_words(zt).t().contiguous()  # [ceil(out*b/32), ng]
    if qlin.bias is not None:
        out["bias"] = qlin.bias.detach().to(dtype).cpu().contiguous()
    return out


def ct_quantization_config(spec: QuantSpec, ignore: list[str]) -> dict:
    w = spec.weight
    weights = {
        "num_bits": w.bits,
        "type": "int",
        "symmetric": bool(w.sym),
        "strategy": "channel" if w.group_size == -1 else "group",
        "group_size": None if w.group_size == -1 else w.group_size,
        "dynamic": False,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
    }


def export_compressed_tensors(model: nn.Module, tokenizer, spec: QuantSpec, out_dir, *,
                              dtype: torch.dtype = torch.float16, overwrite: bool = False) -> ExportReport:
    from qat.nn import model_bits_per_weight, quant_linears

    check_compressed_tensors_spec(spec)
    qlins = quant_linears(model)
    if not qlins:
        raise ValueError("the model has no quantized linear layers; nothing to export")
    ref = reference_architecture(model.config)
    for name in qlins:
        kind = type(ref.get_submodule(name)).__name__
        if kind != "Linear":  # targets are matched by class: a transposed linear (ArchAdapter) would not be found
            raise QuantConfigError(f"compressed-tensors export needs nn.Linear layers; {name!r} is a {kind} "
                                   f"(use --format native)")
    ignore = [n for n, m in ref.named_modules() if isinstance(m, nn.Linear) and n not in qlins]

    tensors: dict[str, torch.Tensor] = {}
    packed_bytes = 0
    for name, q in qlins.items():
        for k, v in ct_module_tensors(q, dtype).items():
            tensors[f"{name}.{k}"] = v
            if k.startswith("weight_"):
                packed_bytes += v.numel() * v.element_size()
    prefixes = tuple(f"{n}." for n in qlins)
    seen: set[tuple] = set()
    for name, t in model.state_dict().items():  # persistent tensors only, as transformers expects; tied stored once
        key = (t.data_ptr(), tuple(t.shape))
        if name.startswith(prefixes) or key in seen:
            continue
        seen.add(key)
        tensors[name] = (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()

    cfg = _export_config(model.config, dtype)
    with atomic_output_dir(out_dir, overwrite, kind="export") as tmp:
        cfg.save_pretrained(tmp)
        _add_to_config(tmp / "config.json", {"quantization_config": ct_quantization_config(spec, ignore)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        file_bytes = (tmp / WEIGHTS_FILE).stat().st_size
    acct = model_bits_per_weight(model)
    other = sum(v.numel() * v.element_size() for v in tensors.values()) - packed_bytes
    notes = []
    if dtype == torch.bfloat16:
        notes.append("scales are stored in bfloat16 (the format keeps them in the model dtype), so dequantized weights "
                     "differ slightly from the student's fp16-scale ones; export with --dtype float16 for an exact match")
    return ExportReport(Path(out_dir), f"compressed-tensors pack-quantized {spec.describe()}", len(qlins),
                        acct["bits_per_weight"], acct["quantized_params"], file_bytes, packed_bytes, other,
                        fp16_baseline_bytes(model), tuple(notes))
