"""Student vs export inference speed (docs/TRAIN_SPEED.md, section "inference"): what `qat eval` and `qat generate`
do, timed on a student checkpoint and on its native export, interleaved round by round.

For each format an RTN student of the default model is saved (qat.checkpoint.save_student) and exported
(`qat export --dtype float32`, so both hold the same float32 values); then, every round, for
    student         the student checkpoint as `qat eval` / `qat generate` load it (quantizers in eval mode, the
                    dequantized weights cached until a parameter changes: qat.speed lever cache_eval_weight)
    student-nocache the same with that lever off (every forward dequantizes every layer again: the code before it)
    export          the export as `qat generate` loads it on CPU (qat.load_quantized, dense weights cached)
    fp              the FP model, for scale
it times perplexity over --eval-tokens tokens of WikiText-2 raw test (qat.eval.perplexity, windows of 512, batch 4)
and greedy generation of --new-tokens tokens (qat.export.generate.generate_ids, KV cache on) after a one-token warm-up,
exactly as `qat generate` times it. Before timing, it checks that student and export give the same logits.

    python scripts/bench_infer.py                       # W2g64 and VQ2 on .cache/smollm2-135m
    python scripts/bench_infer.py --formats W2g64 --rounds 2 --label infer-quick
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import DOCS, FORMATS, REPO, Students, _cpu_model, write_section  # noqa: E402

TEST_TEXT = REPO.parent / "shared" / "assets" / "corpora" / "wikitext-2-raw" / "wiki.test.raw"
PROMPT = "The history of the city begins"


def prepare(fmt: str, students: Students, tokenizer, work: Path) -> tuple[Path, Path]:
    """(student dir, export dir) for `fmt`, written once into work/."""
    from qat.checkpoint import save_student
    from qat.export.command import export_student

    sdir, edir = work / fmt / "student", work / fmt / "export"
    if not sdir.is_dir():
        save_student(students[fmt], tokenizer, students.specs[fmt], sdir, overwrite=True)
    if not edir.is_dir():
        export_student(sdir, edir, dtype="float32", overwrite=True)
    return sdir, edir


def load(path: Path):
    """The model as `qat generate` loads it on CPU (float32; an export with its dense weights cached)."""
    from qat.export.generate import load_for_generation

    model, _ = load_for_generation(path, device="cpu", dtype=torch.float32)
    return model


def time_eval(model, ids, seq_len: int, max_tokens: int) -> float:
    """One `qat eval` worth of perplexity, from cold caches (the student drops its cache when perplexity() switches
    it to eval mode; the export's dense copies are dropped here)."""
    from qat.eval.perplexity import perplexity
    from qat.export.runtime import set_dense_cache

    set_dense_cache(model, True)
    t = time.perf_counter()
    perplexity(model, ids, seq_len, batch_size=4, max_tokens=max_tokens, progress=False)
    return time.perf_counter() - t


def time_generate(model, prompt_ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    from qat.export.generate import generate_ids

    with torch.inference_mode():  # the warm-up `qat generate` does before its clock starts
        model(prompt_ids[:, :1])
    t = time.perf_counter()
    out = generate_ids(model, prompt_ids, max_new_tokens=new_tokens)
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/smollm2-135m")
    ap.add_argument("--formats", nargs="+", default=["W2g64", "VQ2"], choices=list(FORMATS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--label", default="inference")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from qat.config import QuantSpec
    from qat.data.text import tokenize_file
    from qat.models.loading import load_fp_model, load_tokenizer
    from qat.speed import levers

    work = REPO / "runs" / "bench-infer"
    fp = load_fp_model(args.model)
    tok = load_tokenizer(args.model)
    students = Students(fp, args.model, {f: QuantSpec.from_dict(copy.deepcopy(FORMATS[f])) for f in args.formats},
                        REPO / "runs" / "bench-train")
    ids = tokenize_file(TEST_TEXT, tok)
    prompt = tok(PROMPT, return_tensors="pt").input_ids
    models = {"fp": fp}
    for fmt in args.formats:
        sdir, edir = prepare(fmt, students, tok, work)
        models[f"{fmt} student"] = load(sdir)
        models[f"{fmt} export"] = load(edir)
        x = ids[: args.seq_len].unsqueeze(0)
        with torch.no_grad():
            a, b = models[f"{fmt} student"](x).logits, models[f"{fmt} export"](x).logits
        if not torch.equal(a, b):
            raise SystemExit(f"bench_infer: {fmt} student and export logits differ (max {float((a - b).abs().max())})")
    students.model = None

    cells = [(name, cache) for name in models for cache in ((True, False) if name.endswith("student") else (True,))]
    times: dict = {}
    load_avg = [os.getloadavg()[0]]
    t0 = time.time()
    for r in range(args.rounds):
        for name, cache in cells:
            with levers(cache_eval_weight=cache):
                te = time_eval(models[name], ids, args.seq_len, args.eval_tokens)
                tg, out = time_generate(models[name], prompt, args.new_tokens)
            key = name if cache else f"{name} (no cache)"
            times.setdefault(key, {"eval": [], "gen": [], "tokens": tok.decode(out[0])})["eval"].append(te)
            times[key]["gen"].append(tg)
            print(f"[round {r + 1}: {key}: eval {te:.1f}s, generate {tg:.1f}s]", file=sys.stderr, flush=True)
        load_avg.append(os.getloadavg()[0])
    rows = []
    for key, t in times.items():
        fmt = key.split(" ")[0]
        ref = times.get(f"{fmt} export")
        rows.append({"model": key, "eval_s": round(statistics.median(t["eval"]), 2),
                     "generate_s": round(statistics.median(t["gen"]), 2),
                     "tokens_per_s": round(args.new_tokens / statistics.median(t["gen"]), 2),
                     "eval_x_export": None if ref is None else round(statistics.median(
                         [a / b for a, b in zip(t["eval"], ref["eval"])]), 2),
                     "generate_x_export": None if ref is None else round(statistics.median(
                         [a / b for a, b in zip(t["gen"], ref["gen"])]), 2),
                     "same_tokens_as_export": None if ref is None else t["tokens"] == ref["tokens"]})
    res = {"label": args.label, "command": "python scripts/bench_infer.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                        else argv),
           "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "threads": args.threads,
           "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {_cpu_model()}",
           "loadavg_1min": [round(x, 1) for x in load_avg], "wall_s": round(time.time() - t0), "rows": rows,
           "eval_tokens": args.eval_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds}
    out = DOCS / "train_speed" / f"{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"Measured {res['date']} by `{res['command']}` on {args.model} ({res['machine']}, torch {res['torch']}, "
             f"{args.threads} threads, float32, {args.rounds} interleaved rounds, 1-min load average "
             f"{min(load_avg):.1f}-{max(load_avg):.1f}). Eval: perplexity over {args.eval_tokens} tokens of WikiText-2 "
             f"raw test (windows of {args.seq_len}, batch 4) as `qat eval` runs it; generate: {args.new_tokens} greedy "
             "tokens, KV cache on, as `qat generate` times it. Student and export logits were checked identical "
             "before timing.", "",
             "| model | eval (s) | eval x export | generate (s) | tokens/s | generate x export | same tokens as export |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        def fx(v):
            return "—" if v is None else f"{v:.2f}"
        same = "—" if r["same_tokens_as_export"] is None else "yes" if r["same_tokens_as_export"] else "no"
        lines.append(f"| {r['model']} | {r['eval_s']:.1f} | {fx(r['eval_x_export'])} | {r['generate_s']:.1f} | "
                     f"{r['tokens_per_s']:.2f} | {fx(r['generate_x_export'])} | {same} |")
    body = "\n".join(lines)
    write_section(DOCS / "TRAIN_SPEED.md", args.label, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
