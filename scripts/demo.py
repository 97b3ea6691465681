"""`make demo`: the whole story on the bundled SmolLM2-135M, in minutes on a CPU.

    FP teacher -> GPTQ W2g64 (PTQ init) -> stage 1 block-wise distillation -> stage 2 end-to-end KD
    -> packed export -> reload and generate

It runs the EfficientQAT W2g64 recipe (configs/smollm2-135m/efficientqat-w2g64.yaml) through the same code path as
`qat distill`, cut to a demo budget (a few steps per block; the recipe itself runs epochs), and prints perplexity on
held-out WikiText-2 after every step of the story. Everything lands in runs/demo/ (student checkpoint, TensorBoard
logs, the summary PNG, the packed export, results.json/.md). Lower perplexity needs more budget: see
docs/DISTILL_RESULTS.md and scripts/bench_distill.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/smollm2-135m/efficientqat-w2g64.yaml"


def demo_overrides(a) -> list[str]:
    """The recipe cut to the demo budget; every one of these is an ordinary `qat distill` override."""
    return ["--ptq.method", a.ptq_method, "--ptq.calib_samples", str(a.calib_samples),
            "--ptq.act_order", str(a.ptq_method == "gptq").lower(), "--eval.max_tokens", str(a.eval_tokens),
            "--data.num_samples", str(a.samples),
            "--stages.0.epochs", "null", "--stages.0.steps", str(a.block_steps), "--stages.0.batch_size", "2",
            "--stages.0.samples", str(a.samples),
            "--stages.1.epochs", "null", "--stages.1.steps", str(a.e2e_steps), "--stages.1.batch_size", "2"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".cache/smollm2-135m")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--ptq-method", default="gptq", choices=["gptq", "rtn"], help="the student's PTQ init")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out WikiText-2 test tokens per evaluation")
    ap.add_argument("--calib-samples", type=int, default=32, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--samples", type=int, default=32, help="distillation windows of 512 tokens")
    ap.add_argument("--block-steps", type=int, default=8, help="stage-1 optimizer steps per decoder block")
    ap.add_argument("--e2e-steps", type=int, default=8, help="stage-2 optimizer steps")
    ap.add_argument("--prompt", default="The capital of France is")
    a = ap.parse_args(argv)

    from qat.distill.recipe_cli import parse_args
    from qat.distill.run import run_distill
    from qat.eval.perplexity import evaluate_file
    from qat.export.command import export_student
    from qat.export.generate import generate_ids, load_for_generation
    from qat.models.loading import load_fp_model, load_tokenizer

    t0 = time.time()
    out = Path(a.out)
    cli = ["--config", RECIPE, "--model", a.model, "--output", str(out / "student"), "--overwrite", "true",
           *demo_overrides(a)]
    recipe, _ = parse_args(cli)
    ev = recipe.eval

    print(f"[1/4] FP teacher {a.model}: perplexity on the first {ev.max_tokens} tokens of {Path(ev.file).name}",
          flush=True)
    fp = evaluate_file(load_fp_model(a.model), load_tokenizer(a.model), ev.file, ev.seq_len,
                       max_tokens=ev.max_tokens, batch_size=ev.batch_size)["perplexity"]
    print(f"      FP perplexity {fp:.2f}", flush=True)

    print(f"[2/4] qat distill {' '.join(cli)}", flush=True)
    result = run_distill(recipe, overwrite=True)
    stages = [(h["stage"], h["val_ppl"]) for h in result["history"] if "val_ppl" in h]

    print("[3/4] packed export", flush=True)
    report = export_student(out / "student", out / "export", overwrite=True)
    print("      " + report.summary().replace("\n", "\n      "), flush=True)

    print("[4/4] reload the export and generate", flush=True)
    model, tok = load_for_generation(out / "export")
    ids = tok(a.prompt, return_tensors="pt").input_ids
    new = generate_ids(model, ids, max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    text = tok.decode(new[0], skip_special_tokens=True)
    print(f"      {a.prompt!r} -> {text!r}", flush=True)

    rows = [("FP teacher", fp)] + [(name if name != "ptq" else f"{a.ptq_method.upper()} W2g64 (PTQ init)", p) for name, p in stages]
    table = ["| step | perplexity | x FP |", "| --- | ---: | ---: |"]
    table += [f"| {n} | {p:,.2f} | {p / fp:.2f} |" for n, p in rows]
    seconds = time.time() - t0
    (out / "results.json").write_text(json.dumps(
        {"command": "python scripts/demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
         "distill_args": cli, "fp_perplexity": fp, "stages": stages, "export_bytes": report.file_bytes, "fp16_bytes": report.fp16_bytes,
         "generation": {"prompt": a.prompt, "text": text}, "seconds": round(seconds, 1),
         "threads": torch.get_num_threads()}, indent=2))
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\n{seconds:.0f} s on {torch.get_num_threads()} CPU threads; student, TensorBoard logs, summary PNG and "
          f"export in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
