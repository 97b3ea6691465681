"""`make demo`: the whole story on the bundled SmolLM2-135M, in minutes on a CPU.

    FP teacher -> RTN W4g64 (PTQ init) -> stage 1 block-wise learned rounding (SignRound) -> stage 2 end-to-end KD
    -> packed export -> reload, and generate beside the FP model on the same prompts

It runs the W4g64 recipe (configs/smollm2-135m/w4g64.yaml; --bits picks w{bits}g64.yaml) through the same code path as
`qat distill`, cut to a demo budget (a few steps per block on corpus windows; the recipe's mixed data needs the teacher to sample
first, which takes longer than the demo), and prints perplexity on held-out WikiText-2 after every step of the story.
4 bits because that is what generates sensible text at a demo's budget (2 bits needs the full recipe:
docs/RESULTS.md). Everything lands in runs/demo/ (student checkpoint, TensorBoard logs, the summary PNG, the packed
export, results.json/.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/smollm2-135m/w{bits}g64.yaml"  # the shipped recipe of that width (its stage-2 lr fits the step size)
PROMPTS = ("The capital of France is", "def fibonacci(n):", "The history of the Roman Empire")


def demo_overrides(a) -> list[str]:
    """The recipe cut to the demo budget; every one of these is an ordinary `qat distill` override."""
    return ["--quant.weight.bits", str(a.bits), "--ptq.method", a.ptq_method,
            "--ptq.calib_samples", str(a.calib_samples), "--eval.max_tokens", str(a.eval_tokens),
            "--eval.initial", "true",  # the PTQ init's perplexity too: every step of the story is measured
            "--data.source", "text", "--data.num_samples", str(a.samples),
            "--stages.0.steps", str(a.block_steps), "--stages.0.batch_size", "2", "--stages.0.samples", str(a.samples),
            "--stages.1.steps", str(a.e2e_steps), "--stages.1.batch_size", "2"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".cache/smollm2-135m")
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--bits", type=int, default=4, choices=[2, 3, 4], help="weight bits (uniform, groups of 64)")
    ap.add_argument("--ptq-method", default="rtn", choices=["gptq", "rtn"],
                    help="the student's PTQ init (the learned rounding starts from the FP weights: rtn)")
    ap.add_argument("--eval-tokens", type=int, default=16384, help="held-out WikiText-2 test tokens per evaluation")
    ap.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512 tokens (gptq)")
    ap.add_argument("--samples", type=int, default=16, help="distillation windows of 512 tokens")
    ap.add_argument("--block-steps", type=int, default=6, help="stage-1 optimizer steps per decoder block")
    ap.add_argument("--e2e-steps", type=int, default=6, help="stage-2 optimizer steps")
    ap.add_argument("--prompt", action="append", default=None, help=f"prompts to generate from (default: {PROMPTS})")
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy tokens generated per prompt")
    a = ap.parse_args(argv)

    from qat.distill.recipe_cli import parse_args
    from qat.distill.run import run_distill
    from qat.eval.perplexity import evaluate_file
    from qat.export.command import export_student
    from qat.export.generate import generate_ids, load_for_generation
    from qat.models.loading import load_fp_model, load_tokenizer

    t0 = time.time()
    out = Path(a.out)
    cli = ["--config", RECIPE.format(bits=a.bits), "--model", a.model, "--output", str(out / "student"), "--overwrite", "true",
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

    print("[4/4] reload the export and generate beside the FP model (greedy)", flush=True)
    low, tok = load_for_generation(out / "export")
    full, _ = load_for_generation(a.model)
    generations = []
    for prompt in a.prompt or PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        texts = {}
        for name, model in (("FP", full), (f"W{a.bits}g64", low)):
            new = generate_ids(model, ids, max_new_tokens=a.new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id)
            texts[name] = tok.decode(new[0], skip_special_tokens=True)
        generations.append({"prompt": prompt, **texts})
        print(f"      {prompt!r}", flush=True)
        for name, text in texts.items():
            print(f"        {name:>6}: {text!r}", flush=True)

    rows = [("FP teacher", fp)] + [(name if name != "ptq" else f"{a.ptq_method.upper()} W{a.bits}g64 (PTQ init)", p)
                                   for name, p in stages]
    table = ["| step | perplexity | x FP |", "| --- | ---: | ---: |"]
    table += [f"| {n} | {p:,.2f} | {p / fp:.2f} |" for n, p in rows]
    seconds = time.time() - t0
    (out / "results.json").write_text(json.dumps(
        {"command": "python scripts/demo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
         "distill_args": cli, "fp_perplexity": fp, "stages": stages, "export_bytes": report.file_bytes, "fp16_bytes": report.fp16_bytes,
         "generations": generations, "seconds": round(seconds, 1),
         "threads": torch.get_num_threads()}, indent=2))
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))
    print(f"\nmake demo: {seconds / 60:.1f} min ({seconds:.0f} s) on {torch.get_num_threads()} CPU threads; student, "
          f"TensorBoard logs, summary PNG and export in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
