"""Reference numbers for scripts/bench_ptq.py: llm-compressor's GPTQ on the same model, calibration windows and
perplexity protocol. Runs in its own environment (llm-compressor pins its own transformers), so it imports nothing
from qat; the window sampling and the perplexity protocol are re-stated here in a few lines (same seed -> the same
calibration windows as qat.data.text.sample_windows).

    python -m venv .cache/venv-llmc && .cache/venv-llmc/bin/pip install torch==2.13.0 'llmcompressor==0.14.*'
    .cache/venv-llmc/bin/python scripts/bench_ptq_llmcompressor.py --model .cache/smollm2-135m   # -> docs/ptq/llmcompressor.json
    # one width, saved as a plain HF checkpoint holding the quantize-dequantize weights (scripts/bench_quality.py
    # evaluates it on both domains with `qat eval`):
    .cache/venv-llmc/bin/python scripts/bench_ptq_llmcompressor.py --model .cache/smollm2-135m --bits 2 --save DIR
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets" / "corpora"


def tokenize(path, tok):
    text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    return torch.tensor([tok.bos_token_id] + tok(text, add_special_tokens=False, verbose=False)["input_ids"])


def sample_windows(ids, n, seq_len, seed):  # == qat.data.text.sample_windows
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()]).long()


@torch.no_grad()
def perplexity(model, ids, seq_len, max_tokens, batch=4):
    ids = ids[:max_tokens]
    wins = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)
    nll, cnt = 0.0, 0
    for i in range(0, len(wins), batch):
        x = wins[i : i + batch]
        logits = model(x).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        cnt += x[:, 1:].numel()
    return math.exp(nll / cnt)


def save_plain(model, base_dir, tok, out, ppl, eval_ids, a) -> None:
    """GPTQModifier leaves each quantized linear's weight at its quantize-dequantize value; copy those into a fresh
    copy of the base model and save that as an ordinary checkpoint, checking it reproduces the in-memory perplexity."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if getattr(m, "quantization_scheme", None) is not None and hasattr(m, "weight"):
                plain.get_submodule(name).weight.copy_(m.weight)
    again = perplexity(plain, eval_ids, a.seq_len, a.eval_tokens)
    if abs(again / ppl - 1) > 1e-4:
        raise SystemExit(f"saved weights give perplexity {again:.4f}, the quantized model {ppl:.4f}: not saved")
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", default=str(ASSETS / "wikitext-2" / "valid.txt"))
    ap.add_argument("--eval", default=str(ASSETS / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 3, 2])
    ap.add_argument("--out", default=str(REPO / "docs" / "ptq" / "llmcompressor.json"))
    ap.add_argument("--save", default=None, help="with one --bits: write the quantized model here (plain HF weights)")
    a = ap.parse_args(argv)
    if a.save and len(a.bits) != 1:
        ap.error("--save takes exactly one --bits value")

    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    base = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    calib = sample_windows(tokenize(a.calib, tok), a.calib_samples, a.seq_len, a.seed)
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    eval_ids = tokenize(a.eval, tok)
    rows = [] if a.save else [{"config": "FP", "perplexity": perplexity(base, eval_ids, a.seq_len, a.eval_tokens)}]
    print(rows[-1:], file=sys.stderr)
    for bits in a.bits:
        t0 = time.time()
        model = copy.deepcopy(base)
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=False, strategy="group", group_size=64))
        oneshot(model=model, dataset=ds, recipe=GPTQModifier(config_groups={"g": scheme}, ignore=["lm_head"]),
                num_calibration_samples=a.calib_samples, max_seq_length=a.seq_len, shuffle_calibration_samples=False)
        rows.append({"config": f"W{bits}g64", "perplexity": perplexity(model, eval_ids, a.seq_len, a.eval_tokens),
                     "seconds": round(time.time() - t0, 1)})
        print(rows[-1], file=sys.stderr)
        if a.save:
            save_plain(model, a.model, tok, a.save, rows[-1]["perplexity"], eval_ids, a)
            return 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "version": llmcompressor.__version__, "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "command": "python scripts/bench_ptq_llmcompressor.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "gptq": "GPTQModifier defaults (actorder static, dampening 0.01, block 128), asymmetric int, group 64",
        "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
