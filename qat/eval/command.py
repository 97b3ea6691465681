"""`qat eval`: perplexity of any model directory qat reads (FP model, student, native or compressed-tensors export) on
a local text file."""
from __future__ import annotations

import argparse
import json
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity on a text file (non-overlapping windows, bos prepended once)")
    p.add_argument("--model", required=True, help="HF model directory, qat student checkpoint or export")
    p.add_argument("--data", required=True, help="text file (any extension) or .jsonl/.json with a text field")
    p.add_argument("--seq-len", type=int, required=True, help="window length in tokens")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens (default: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-field", default="text", help="field of .jsonl/.json records (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--json", action="store_true", help="print exactly one JSON line on stdout")
    p.add_argument("--adapter", default=None, help="a LoRA adapter written by qat finetune for this model")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from qat.data.text import read_text, tokenize_file
    from qat.eval.perplexity import perplexity
    from qat.models.loading import load_model, resolve_device

    for name in ("seq_len", "batch_size", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    device = resolve_device(args.device)
    read_text(args.data, args.text_field)  # a missing/empty data file fails before the model is loaded
    loaded = load_model(args.model, dtype=DTYPES[args.dtype], device=device)  # any directory kind, checked
    model, tokenizer = loaded.model, loaded.tokenizer
    if args.adapter:
        from qat.finetune.lora import load_adapter

        model = load_adapter(model, args.adapter)
    ids = tokenize_file(args.data, tokenizer, add_bos=True, field=args.text_field)
    t0 = time.perf_counter()
    res = perplexity(model, ids, args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)
    seconds = time.perf_counter() - t0
    bpw = loaded.bits_per_weight
    if args.json:
        print(json.dumps({"perplexity": res["perplexity"], "nll": res["nll"], "tokens": res["tokens"],
                          "model": str(args.model), "bits_per_weight": bpw,
                          **({"adapter": str(args.adapter)} if args.adapter else {})}), flush=True)
    else:
        print(f"{args.model}{' + ' + str(args.adapter) if args.adapter else ''}: perplexity {res['perplexity']:.4f} (nll {res['nll']:.5f}) on {res['tokens']} tokens of "
              f"{args.data} ({res['windows']} x {args.seq_len}), {bpw:.3f} bits/weight, {seconds:.1f}s on {device}")
    return 0
