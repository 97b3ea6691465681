"""Intel AutoRound (SignRound PTQ) on the default model, for the side-by-side in docs/RESULTS.md.

Runs in AutoRound's own environment (it pins its own dependencies), so it imports nothing from qat: the calibration
windows come ready-made as a tensor file written by scripts/bench_quality.py (the very windows our recipes train on),
and the result is AutoRound's "fake" (quantize-dequantize) checkpoint, which bench_quality evaluates with `qat eval`
like every other row.

    python -m venv .cache/venv-autoround && .cache/venv-autoround/bin/pip install torch==2.13.0 auto-round==0.16.1
    .cache/venv-autoround/bin/python scripts/bench_autoround.py --model .cache/smollm2-135m \
        --windows runs/quality/calib-64x512.pt --bits 2 --group-size 64 --iters 50 --batch-size 4 --out runs/quality/ar-w2g64
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="local HF model directory")
    ap.add_argument("--windows", required=True, help="torch file holding an int64 [n, seq_len] tensor of token windows")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--amp", type=int, default=1, help="AutoRound's amp (bf16 tuning on CPU); 1 = its default")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import auto_round
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    windows = torch.load(a.windows, weights_only=True).long()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    t0 = time.time()
    # a list of [1, seq_len] id tensors is used as-is (no re-tokenization): the same windows as our runs
    ar = AutoRound(model, tokenizer=tok, bits=a.bits, group_size=a.group_size, sym=a.sym,
                   dataset=[w.unsqueeze(0) for w in windows], nsamples=len(windows), seqlen=windows.shape[1],
                   iters=a.iters, batch_size=a.batch_size, device_map="cpu", amp=bool(a.amp), seed=0)
    ar.quantize_and_save(a.out, format="fake")
    seconds = time.time() - t0
    info = {"version": auto_round.__version__, "bits": a.bits, "group_size": a.group_size, "sym": a.sym,
            "iters": a.iters, "batch_size": a.batch_size, "amp": bool(a.amp), "nsamples": len(windows),
            "seqlen": int(windows.shape[1]), "seconds": round(seconds, 1),
            "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
            "command": "python scripts/bench_autoround.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(a.out, "autoround_run.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
