"""Intel AutoRound (SignRound PTQ) on the default model, for the side-by-side in docs/RESULTS.md.

Runs in AutoRound's own environment (it pins its own dependencies), so it imports nothing from qat: the calibration
windows come ready-made as a tensor file written by scripts/bench_quality.py (the very windows our recipes train on).
The result is written as an ordinary fp32 HF checkpoint whose linear weights are AutoRound's dequantized codes,
s * (q - zp), recomputed in fp32 from the codes and scales it learned; bench_quality evaluates it with `qat eval`
like every other row. (AutoRound 0.16.1's own `quantize_and_save(format="fake")` on CPU writes back the *original*
fp32 weights: it restores tensors it had cast to bf16 for tuning, quantized weights included. Checked here: its saved
down_proj weights equal the unquantized ones, 26 distinct values per group of 64.)

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


def save_dequantized(qmodel, base_dir: str, tok, out: str, bits: int) -> int:
    """Every tuned linear holds its quantize-dequantize weight (in the tuning dtype) with `scale` and `zp`: recover the
    integer codes, dequantize them in fp32 into a fresh copy of the base model, and save that. Returns how many
    linears were written; refuses a model where a weight is not on its grid."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    n = 0
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if not (hasattr(m, "scale") and hasattr(m, "zp") and hasattr(m, "weight")):
                continue
            w = m.weight.float()
            g = w.numel() // m.scale.numel()
            wg = w.reshape(-1, g)
            s = m.scale.float().reshape(-1, 1)
            z = m.zp.float().reshape(-1, 1) if torch.is_tensor(m.zp) else float(m.zp)
            q = torch.clamp(torch.round(wg / s) + z, 0, 2**bits - 1)
            deq = s * (q - z)
            if ((wg - deq).abs() > deq.abs() * 2**-7 + 1e-8).any():  # beyond bf16 rounding (2^-8) of s*(q - z)
                raise SystemExit(f"{name}: weight is not on its quantization grid")
            plain.get_submodule(name).weight.copy_(deq.reshape(w.shape))
            n += 1
    if n == 0:
        raise SystemExit("no quantized linear found in AutoRound's model")
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    return n


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
    ar.quantize()
    seconds = time.time() - t0
    n = save_dequantized(ar.model, a.model, tok, a.out, a.bits)
    info = {"version": auto_round.__version__, "bits": a.bits, "group_size": a.group_size, "sym": a.sym,
            "iters": a.iters, "batch_size": a.batch_size, "amp": bool(a.amp), "nsamples": len(windows),
            "seqlen": int(windows.shape[1]), "seconds": round(seconds, 1), "quantized_linears": n,
            "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
            "command": "python scripts/bench_autoround.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(a.out, "autoround_run.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
