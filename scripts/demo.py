"""`make demo`: the whole story on the bundled SmolLM2-135M, in minutes on a CPU.

FP -> PTQ (RTN and GPTQ at W4g64 and W3g64) perplexity on held-out WikiText-2 text, with progress bars; results go
to runs/demo/ (JSON, markdown table, PNG).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "assets" / "corpora"

CONFIGS = [
    ("RTN W4g64", "rtn", {"bits": 4, "group_size": 64}),
    ("GPTQ W4g64", "gptq", {"bits": 4, "group_size": 64}),
    ("RTN W3g64", "rtn", {"bits": 3, "group_size": 64}),
    ("GPTQ W3g64", "gptq", {"bits": 3, "group_size": 64}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=str(REPO / ".cache" / "smollm2-135m"))
    ap.add_argument("--calib", default=str(CORPORA / "wikitext-2" / "valid.txt"))
    ap.add_argument("--eval", default=str(CORPORA / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "runs" / "demo"))
    a = ap.parse_args(argv)

    from qat.config import QuantSpec
    from qat.data.text import pack_windows, sample_windows, tokenize_file
    from qat.models.loading import load_fp_model, load_tokenizer
    from qat.ptq.sweep import ptq_sweep

    t0 = time.time()
    tok = load_tokenizer(a.model)
    model = load_fp_model(a.model)
    calib = sample_windows(tokenize_file(a.calib, tok), a.calib_samples, a.seq_len, 0)
    eval_ids = pack_windows(tokenize_file(a.eval, tok), a.seq_len, a.eval_tokens)
    print(f"model {a.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; eval on "
          f"{eval_ids.numel()} tokens of {Path(a.eval).name} (seq {a.seq_len}); calibration {a.calib_samples} x "
          f"{a.seq_len} tokens of {Path(a.calib).name}", flush=True)
    configs = [(n, m, QuantSpec.from_dict({"weight": w}), {}) for n, m, w in CONFIGS]
    rows = ptq_sweep(model, configs, calib, eval_ids, a.seq_len,
                     on_row=lambda r: print(f"  {r.name:12s} perplexity {r.perplexity:9.2f}  "
                                            f"({r.bits_per_weight:.3f} bits/weight, {r.seconds:.0f} s)", flush=True))
    fp = rows[0].perplexity
    table = ["| model | perplexity | x FP | bits/weight |", "| --- | ---: | ---: | ---: |"]
    table += [f"| {r.name} | {r.perplexity:.2f} | {r.perplexity / fp:.2f} | {r.bits_per_weight:.3f} |" for r in rows]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\n{time.time() - t0:.0f} s on {torch.get_num_threads()} CPU threads; results in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
