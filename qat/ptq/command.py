"""`qat ptq`: load a local HF model, quantize it block-sequentially (RTN or GPTQ-style init) and write a student
checkpoint that `qat eval`, `qat distill` and `qat export` read."""
from __future__ import annotations

import argparse
import json
import time

import torch

from qat.config import ActSpec, QuantSpec, WeightSpec
from qat.ptq.pipeline import PTQ_METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ptq", help="post-training quantization (RTN / GPTQ init) -> student checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--data", default=None, help="calibration text file (.txt/.raw/.jsonl); needed by gptq and A4/A8")
    p.add_argument("--method", default="gptq", choices=PTQ_METHODS)
    p.add_argument("--format", default="uniform", help="weight format: uniform | binary11 | vq")
    p.add_argument("--bits", type=int, default=None, help="weight bits (default: the format's)")
    p.add_argument("--group-size", type=int, default=128, help="group size along in_features; -1 = per channel")
    p.add_argument("--sym", action="store_true", help="symmetric uniform grid")
    p.add_argument("--lwc", action="store_true", help="learnable weight clipping (OmniQuant) for uniform")
    p.add_argument("--act-bits", type=int, default=16, help="dynamic per-token activation bits: 4, 8 or 16 (off)")
    p.add_argument("--act-mode", default="uniform", help="activation quantizer: uniform | knee")
    p.add_argument("--act-hadamard", action="store_true", help="rotate linear inputs by a random Hadamard (W4A4)")
    p.add_argument("--calib-samples", type=int, default=128, help="number of calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ (uniform): quantize columns by decreasing Hessian diagonal (measured better at every "
                        "width: docs/PTQ.md)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: damping as a fraction of mean(diag H)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", required=True, help="student checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


def spec_from_args(a) -> QuantSpec:
    return QuantSpec(
        weight=WeightSpec(format=a.format, bits=a.bits, group_size=a.group_size, sym=a.sym, lwc=a.lwc),
        act=ActSpec(bits=a.act_bits, mode=a.act_mode, hadamard=a.act_hadamard),
    )


def run(a) -> int:
    from qat.checkpoint import save_student
    from qat.data.text import read_text, sample_windows, tokenize_file
    from qat.io import check_output_dir
    from qat.models.loading import load_fp_model, load_tokenizer, meta_model
    from qat.nn import check_spec_fits, model_bits_per_weight
    from qat.ptq.pipeline import ptq_quantize

    # every cheap check before any expensive work, so bad input fails in a second and writes nothing
    spec = spec_from_args(a)
    check_output_dir(a.output, a.overwrite)
    check_spec_fits(meta_model(a.model), spec)  # architecture + shapes, without reading weights
    needs_data = a.method == "gptq" or spec.act.enabled
    if needs_data and not a.data:
        raise ValueError(f"--method {a.method}{' with --act-bits' if spec.act.enabled else ''} needs --data")
    if a.calib_samples < 1 or a.seq_len < 2:
        raise ValueError("--calib-samples must be >= 1 and --seq-len >= 2")
    if a.data:
        read_text(a.data)  # missing or empty data fails here, before the model is loaded

    t0 = time.time()
    tokenizer = load_tokenizer(a.model)
    model = load_fp_model(a.model, device=a.device)
    calib = sample_windows(tokenize_file(a.data, tokenizer), a.calib_samples, a.seq_len, a.seed) if needs_data else None
    torch.manual_seed(a.seed)
    names = ptq_quantize(model, spec, calib, a.method, act_order=a.act_order, damp=a.damp, batch_size=a.batch_size)
    meta = {"ptq": {"method": a.method, "calib_samples": a.calib_samples, "seq_len": a.seq_len,
                    "act_order": a.act_order, "damp": a.damp, "seed": a.seed, "data": a.data,
                    "seconds": round(time.time() - t0, 1)},
            "base_model": str(a.model)}
    save_student(model, tokenizer, spec, a.output, meta=meta, overwrite=a.overwrite)
    acct = model_bits_per_weight(model)
    print(json.dumps({"output": a.output, "spec": spec.describe(), "quantized_linears": len(names),
                      "bits_per_weight": round(acct["bits_per_weight"], 4), "seconds": meta["ptq"]["seconds"]}))
    return 0
