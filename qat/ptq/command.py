"""`qat ptq`: load a local HF model, quantize it block-sequentially (RTN or GPTQ-style init) and write a student
checkpoint that `qat eval`, `qat distill` and `qat export` read."""
from __future__ import annotations

import argparse
import json
import time
from typing import Literal

import torch

from qat.args import QUANT_KEY, add_quant_arguments, argument_error
from qat.config import QuantConfigError, QuantSpec, from_dict
from qat.ptq.pipeline import PTQ_METHODS

# short flags kept from before the --quant.* keys (README, scripts and tests use them): flag -> (quant key, type);
# a bool alias is a switch that sets its key to true
ALIASES = {
    "--format": ("weight.format", str), "--bits": ("weight.bits", int), "--group-size": ("weight.group_size", int),
    "--sym": ("weight.sym", bool), "--lwc": ("weight.lwc", bool),
    "--act-bits": ("act.bits", int), "--act-mode": ("act.mode", str), "--act-hadamard": ("act.hadamard", bool),
}


def register(sub: argparse._SubParsersAction) -> None:
    # prefix_chars="+": argparse must not interpret --options; every word after `ptq` goes to jsonargparse (run())
    p = sub.add_parser("ptq", help="post-training quantization (RTN / GPTQ init) -> student checkpoint",
                       add_help=False, prefix_chars="+")
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=run)


def build_parser():
    """`qat ptq`'s options: its own, the quant keys exactly as recipes have them (qat.args), and the short aliases."""
    from jsonargparse import ActionYesNo, ArgumentParser

    p = ArgumentParser(prog="qat ptq", exit_on_error=False, description=(
        "Post-training quantization (RTN / GPTQ init) of a local HF model into a student checkpoint that `qat eval`, "
        "`qat distill` and `qat export` read. The number format is set with the --quant.* keys of recipes or their "
        "short aliases (--format, --bits, --group-size, --sym, --lwc, --act-bits, --act-mode, --act-hadamard)."))
    p.add_argument("--model", type=str, required=True, help="local Hugging Face model directory")
    p.add_argument("--data", type=str | None, default=None,
                   help="calibration text file (.txt/.raw/.jsonl); needed by gptq and A4/A8")
    p.add_argument("--method", type=Literal[PTQ_METHODS], default="gptq", help="initializer")
    for flag, (key, typ) in ALIASES.items():
        if typ is bool:
            p.add_argument(flag, action="store_true", help=f"alias of --{QUANT_KEY}.{key} true")
        else:
            p.add_argument(flag, type=typ | None, default=None, help=f"alias of --{QUANT_KEY}.{key}")
    p.add_argument("--calib-samples", type=int, default=128, help="number of calibration sequences")
    p.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    p.add_argument("--act-order", action=ActionYesNo(no_prefix="no-"), default=True,
                   help="GPTQ (uniform): quantize columns by decreasing Hessian diagonal (measured better at every "
                        "width: docs/PTQ.md)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ: damping as a fraction of mean(diag H)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--output", type=str, required=True, help="student checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_quant_arguments(p)
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, QuantSpec]:
    """(options, validated QuantSpec) from `qat ptq`'s words; an alias and its --quant key may not disagree."""
    from jsonargparse import ArgumentError

    try:
        d = build_parser().parse_args([str(a) for a in argv]).as_dict()
    except ArgumentError as e:
        raise argument_error(e, "arguments") from None
    quant = d.pop(QUANT_KEY, None) or {}
    for flag, (key, _) in ALIASES.items():
        value = d.pop(flag.lstrip("-").replace("-", "_"))
        if value is None or value is False:
            continue
        group, name = key.split(".")
        given = quant.setdefault(group, {})
        if name in given and given[name] != value:
            raise QuantConfigError(f"arguments: {flag} {value} contradicts --{QUANT_KEY}.{key} {given[name]}")
        given[name] = value
    return argparse.Namespace(**d), from_dict(QuantSpec, quant, QUANT_KEY)


def run(words) -> int:
    from qat.io import claim_output
    from qat.models.loading import check_kind, resolve_device

    # every cheap check before any expensive work, so bad input fails in a second and writes nothing
    a, spec = parse_args(list(words.argv))
    device = resolve_device(a.device)
    check_kind(a.model, ("fp",), "--model")
    with claim_output(a.output, "student", overwrite=a.overwrite, inputs={"--model": a.model}):
        return _quantize(a, spec, device)


def _quantize(a, spec: QuantSpec, device) -> int:
    from qat.checkpoint import save_student
    from qat.data.text import read_text, sample_windows, tokenize_file
    from qat.models.loading import load_fp_model, load_tokenizer, meta_model
    from qat.nn import check_spec_fits, model_bits_per_weight
    from qat.ptq.pipeline import ptq_quantize

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
    model = load_fp_model(a.model, device=device)  # every tensor read from the file, or one clear error
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
