"""Reading exports back: load_quantized (native, see pack.py for the layout) and load_compressed_tensors.

load_quantized builds the architecture on the meta device (no memory, no random init), swaps each quantized linear
for a PackedLinear whose buffers have the shapes the format's pack() produces for that layer, then checks the file
against that model before anything is materialized: every tensor present, none unexpected, each with its shape (the
packed shapes fix the bits and group size) and, for packed tensors, its exact dtype; the quantization_config's summary
fields against its spec, and its module list against what the spec quantizes in this architecture. After reading, the
packed values are checked against the spec (qat/verify.py: zero points within the grid, positive scales, ...). Every
problem is one ValueError line naming the file and the tensor, so a tampered or truncated export never yields a
silently wrong model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.config import QuantSpec
from qat.export.pack import EXPORT_VERSION, QUANT_METHOD, WEIGHTS_FILE, act_runtime_params, parse_dtype
from qat.export.runtime import PackedLinear


def read_export_config(path) -> tuple[Path, dict[str, Any]]:
    """(directory, quantization_config) of a native export, or one clear error."""
    from qat.models.loading import read_config

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"export directory {str(path)!r} does not exist or is not a directory")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{p}: missing config.json; not a qat export directory")
    qc = read_config(p).get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(  # noqa: TRY004 - a data problem in the directory, reported like the others
            f"{cfg_file}: no quantization_config; not a quantized export (load FP models with "
            f"qat.models.loading.load_model)")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        hint = " (load it with qat.models.loading.load_model)" if method == "compressed-tensors" else ""
        raise ValueError(f"{cfg_file}: quant_method {method!r} is not {QUANT_METHOD!r}{hint}")
    try:
        version = int(qc.get("version", 0))
    except (TypeError, ValueError):
        raise ValueError(f"{cfg_file}: quantization_config version {qc.get('version')!r} is not a number") from None
    if version > EXPORT_VERSION:
        raise ValueError(f"{cfg_file}: export version {version} is newer than this code reads ({EXPORT_VERSION})")
    for key in ("spec", "modules"):
        if key not in qc:
            raise ValueError(f"{cfg_file}: quantization_config has no {key!r}")
    if not (p / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{p}: missing {WEIGHTS_FILE}")
    return p, qc


def export_spec(cfg_file: Path, qc: dict[str, Any]) -> QuantSpec:
    """The spec an export was written with; its summary fields (format, bits, ...) must say the same."""
    try:
        spec = QuantSpec.from_dict(qc["spec"])
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{cfg_file}: invalid quantization_config spec ({e})") from None
    w, a = spec.weight, spec.act
    summary = {"format": w.format, "bits": w.bits, "group_size": w.group_size, "act_bits": a.bits,
               "act_mode": a.mode, "act_sym": a.sym, "act_hadamard": a.hadamard}
    for k, v in summary.items():
        if k in qc and qc[k] != v:
            raise ValueError(f"{cfg_file}: quantization_config says {k}={qc[k]!r} but its spec has {v!r} "
                             f"({spec.describe()})")
    return spec


_EXPECTED_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def expected_runtime_tensors(spec: QuantSpec, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
    """What the export holds for one [out, in] layer (packed weight + act params), taken from the format's own pack()
    of a random weight, so every format is checked the same way: shapes and dtypes (the values of the floating-point
    entries mean nothing; the ones the spec fixes, e.g. vq's hadamard_blocks, are compared by qat.verify)."""
    from qat.quantizers import make_act_quantizer, make_weight_quantizer

    key = (json.dumps(spec.to_dict(), sort_keys=True), out_f, in_f)
    if key not in _EXPECTED_CACHE:
        with torch.device("cpu"), torch.no_grad():  # real tensors even when called under a meta-device context
            wq = make_weight_quantizer(spec.weight, out_f, in_f)
            w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
            try:
                packed = wq.pack(w)
            except Exception:  # noqa: BLE001 - a format that can only pack after its PTQ init
                wq.init_from(w)
                packed = wq.pack(w)
            act = make_act_quantizer(spec.act, in_f)
            if act is not None:
                packed.update({f"act_quantizer.{k}": v for k, v in act_runtime_params(act).items()})
        _EXPECTED_CACHE[key] = packed
    return _EXPECTED_CACHE[key]


def _build_packed_model(p: Path, qc: dict[str, Any], spec: QuantSpec, dtype: torch.dtype):
    """(meta-device model with PackedLinears, {module: (out, in)}, packed tensor names, quantize-order names)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models import get_adapter
    from qat.nn import check_spec_fits

    cfg_file = p / "config.json"
    cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    if hasattr(cfg, "quantization_config"):  # ours, not a transformers quantizer's: keep transformers out of it
        del cfg.quantization_config
    adapter = get_adapter(cfg.model_type)  # an unsupported architecture fails with the list of supported ones
    modules = qc["modules"]
    if not isinstance(modules, list) or not all(isinstance(n, str) for n in modules):
        raise ValueError(f"{cfg_file}: quantization_config modules is not a list of module names")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        order = check_spec_fits(model, spec, adapter)  # the modules the spec quantizes, in quantize_model's order
        if sorted(order) != sorted(modules):
            extra, lacking = sorted(set(modules) - set(order)), sorted(set(order) - set(modules))
            raise ValueError(f"{cfg_file}: quantized modules do not match what {spec.describe()} quantizes in "
                             f"{cfg.model_type} (listed but not quantizable: {extra[:2]}, quantizable but not "
                             f"listed: {lacking[:2]})")
        shapes: dict[str, tuple[int, int]] = {}
        packed_names: set[str] = set()
        for name in modules:
            mod = model.get_submodule(name)
            out_f, in_f = shapes[name] = adapter.linear_shape(mod)
            exp = expected_runtime_tensors(spec, out_f, in_f)
            packed = {k: torch.empty_like(v, device="meta") for k, v in exp.items() if not k.startswith("act_quantizer.")}
            act = {k.split(".", 1)[1]: torch.empty_like(v, device="meta")
                   for k, v in exp.items() if k.startswith("act_quantizer.")}
            bias = torch.empty(out_f, dtype=dtype) if getattr(mod, "bias", None) is not None else None
            signs = torch.empty(in_f, dtype=torch.int8) if spec.act.enabled and spec.act.hadamard else None
            runtime = PackedLinear(spec, out_f, in_f, packed, bias, act or None, signs)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, runtime)
            packed_names.update(f"{name}.{k}" for k in packed)
    return model, cfg, shapes, packed_names, order


def load_quantized(path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> nn.Module:
    """A runnable model (eval mode) from a native qat export; dtype defaults to the export's own dtype."""
    from safetensors import SafetensorError

    from qat.models.loading import check_kind, check_tensor_file, open_safetensors, resolve_device
    from qat.verify import verify_packed
    from qat_kernels.hadamard import random_signs

    device = resolve_device(device, what="device")
    if Path(path).is_dir() and (Path(path) / "config.json").is_file():
        check_kind(path, ("native",), "export directory")  # a student or FP directory: say which it is
    p, qc = read_export_config(path)
    spec = export_spec(p / "config.json", qc)
    dtype = parse_dtype(dtype if dtype is not None else qc.get("dtype", "float16"))
    wfile = p / WEIGHTS_FILE
    handle = open_safetensors(wfile)
    model, cfg, shapes, packed_names, order = _build_packed_model(p, qc, spec, dtype)

    wanted: dict[str, torch.Tensor] = dict(model.named_parameters())
    wanted.update(model.named_buffers())
    check_tensor_file(handle, wfile, wanted, exact_dtype=packed_names, describe=spec.describe())

    model.to_empty(device=device)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty gives each module its own copy; re-share the embedding with lm_head
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(model.named_buffers())
    with torch.no_grad():
        for name, t in targets.items():
            try:
                src = handle.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{wfile}: cannot read tensor {name!r} ({str(e).splitlines()[0]})") from None
            t.copy_(src)
        for i, name in enumerate(order):
            mod = model.get_submodule(name)
            out_f, in_f = shapes[name]
            act = dict(mod.act_quantizer.named_buffers()) if getattr(mod, "act_quantizer", None) is not None else {}
            signs = getattr(mod, "rotation_signs", None) if mod.rotation_block else None
            verify_packed(str(wfile), name, spec, mod.packed(), act, signs, expected_runtime_tensors(spec, out_f, in_f))
            if signs is not None and not torch.equal(signs.cpu(), random_signs(in_f, i)):
                raise ValueError(f"{wfile}: {name}.rotation_signs differ from the signs {spec.describe()} builds for "
                                 "this layer")
    return model.eval()


def native_bits_per_weight(path) -> float:
    """Stored bits per weight of a native export's quantized linears (the student's accounting, from its spec)."""
    from qat.quantizers import make_weight_quantizer

    p, qc = read_export_config(path)
    spec = export_spec(p / "config.json", qc)
    model, _, shapes, _, _ = _build_packed_model(p, qc, spec, torch.float16)
    n = bits = 0
    for out_f, in_f in shapes.values():
        with torch.device("meta"):
            bpw = make_weight_quantizer(spec.weight, out_f, in_f).bits_per_weight
        n += out_f * in_f
        bits += out_f * in_f * bpw
    return bits / n if n else 16.0


# ---- compressed-tensors ------------------------------------------------------------------------------------------------

CT_INT_BITS = (2, 4, 8)


def _ct_scheme(cfg_file: Path, qc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(weights scheme, ignore list) of a pack-quantized, weight-only, integer compressed-tensors config: the layout
    `qat export --format compressed-tensors` writes and the only one these checks understand."""
    groups = qc.get("config_groups")
    fmt = qc.get("format")
    if fmt != "pack-quantized" or not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError(f"{cfg_file}: compressed-tensors format {fmt!r} with {len(groups or {})} config group(s) is "
                         "not one qat reads (it reads one pack-quantized integer weight group)")
    (group,) = groups.values()
    w = group.get("weights") or {}
    if group.get("targets") != ["Linear"] or group.get("input_activations") or group.get("output_activations"):
        raise ValueError(f"{cfg_file}: compressed-tensors config targets {group.get('targets')} with activation "
                         "quantization; qat reads weight-only groups that target Linear")
    if w.get("type") != "int" or w.get("num_bits") not in CT_INT_BITS or w.get("strategy") not in ("group", "channel"):
        raise ValueError(f"{cfg_file}: compressed-tensors weights {w.get('type')}{w.get('num_bits')} "
                         f"({w.get('strategy')}) are not a layout qat reads (int{CT_INT_BITS}, group or channel)")
    ignore = qc.get("ignore") or []
    return w, list(ignore)


def _ct_ignored(name: str, ignore: list[str]) -> bool:
    import re

    return any(name == pat or (pat.startswith("re:") and re.match(pat[3:], name)) for pat in ignore)


def check_compressed_tensors_dir(p: Path, cfg: dict[str, Any]):
    """Check a compressed-tensors export's tensors against its config and architecture, before transformers reads
    it: exact coverage and shapes (the packed width fixes the bits), weight_shape values, positive finite scales.
    Returns the bits per weight stored for the quantized linears."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models import get_adapter
    from qat.models.loading import check_tensor_file, fmt_shape, open_safetensors, weight_files

    cfg_file = p / "config.json"
    w, ignore = _ct_scheme(cfg_file, cfg["quantization_config"])
    bits, sym = int(w["num_bits"]), bool(w.get("symmetric"))
    files = weight_files(p)
    if [f.name for f in files] != [WEIGHTS_FILE]:
        raise ValueError(f"{p}: qat reads single-file compressed-tensors exports ({WEIGHTS_FILE})")
    wfile = files[0]
    handle = open_safetensors(wfile)
    hf_cfg = AutoConfig.from_pretrained(str(p), local_files_only=True)
    if hasattr(hf_cfg, "quantization_config"):
        del hf_cfg.quantization_config
    get_adapter(hf_cfg.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    params = dict(model.named_parameters())  # tied weights once
    wanted = {n: t for n, t in model.state_dict().items() if n in params or n in dict(model.named_buffers())}
    quantized: dict[str, tuple[int, int]] = {}
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or _ct_ignored(name, ignore):
            continue
        out_f, in_f = mod.out_features, mod.in_features
        g = in_f if w["strategy"] == "channel" else int(w.get("group_size") or 0)
        if g < 1 or in_f % g:
            raise ValueError(f"{cfg_file}: group_size {w.get('group_size')} does not divide {name}'s width {in_f}")
        quantized[name] = (out_f, in_f)
        wanted.pop(f"{name}.weight", None)
        wanted[f"{name}.weight_packed"] = torch.empty(out_f, -(-in_f * bits // 32), dtype=torch.int32)
        wanted[f"{name}.weight_scale"] = torch.empty(out_f, in_f // g)
        wanted[f"{name}.weight_shape"] = torch.empty(2, dtype=torch.int64)
        if not sym:
            wanted[f"{name}.weight_zero_point"] = torch.empty(-(-out_f * bits // 32), in_f // g, dtype=torch.int32)
    tied = {n for n in model.state_dict() if n not in wanted and n not in params and not n.endswith("inv_freq")}
    packed_names = {n for n in wanted if n.rsplit(".", 1)[-1] in ("weight_packed", "weight_zero_point")}
    check_tensor_file(handle, wfile, wanted, optional=tied, exact_dtype=packed_names,
                      describe=f"int{bits} {'symmetric ' if sym else ''}{w['strategy']}-wise")
    n = nbytes = 0
    for name, (out_f, in_f) in quantized.items():
        shape = handle.get_tensor(f"{name}.weight_shape")
        if shape.tolist() != [out_f, in_f]:
            raise ValueError(f"{wfile}: {name}.weight_shape is {fmt_shape(shape.tolist())}, the layer is "
                             f"{fmt_shape([out_f, in_f])}")
        s = handle.get_tensor(f"{name}.weight_scale")
        if not (torch.isfinite(s).all() and (s > 0).all()):
            raise ValueError(f"{wfile}: {name}.weight_scale holds a non-positive or non-finite scale")
        n += out_f * in_f
        for k in ("weight_packed", "weight_scale", "weight_zero_point"):
            if f"{name}.{k}" in wanted:
                sl = handle.get_slice(f"{name}.{k}")
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                nbytes += numel * wanted[f"{name}.{k}"].element_size()
    return 8 * nbytes / n if n else 16.0


def load_compressed_tensors(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, bits per weight) from a compressed-tensors export, checked first, then read by transformers
    (dequantized at load: its compressed path refuses asymmetric pack-quantized zero points, and on CPU the math is
    the same dense matmul anyway); transformers' loading info must be empty too."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qat.models.loading import check_loading_info, quiet_transformers, read_config, resolve_model_dir

    p = resolve_model_dir(path)
    bpw = check_compressed_tensors_dir(p, read_config(p))
    with quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(
            str(p), dtype=dtype, local_files_only=True, output_loading_info=True,
            quantization_config=CompressedTensorsConfig(dequantize=True))
    check_loading_info(p, info)
    return model.to(device).eval(), bpw
