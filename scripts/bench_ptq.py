"""PTQ quality benchmark on a real model: FP vs RTN vs GPTQ (ours) at several bit widths, optionally beside
llm-compressor's GPTQ (scripts/bench_ptq_llmcompressor.py writes its numbers; this script merges them).

Protocol (issue #3): perplexity on the first --eval-tokens tokens of WikiText-2 raw test, windows of --seq-len,
bos prepended once; calibration --calib-samples x --seq-len tokens sampled (seeded) from WikiText-2 valid.

    python scripts/bench_ptq.py --model .cache/smollm2-135m            # writes docs/PTQ.md, docs/ptq/*.json|png
    python scripts/bench_ptq.py --model .cache/smollm2-135m --only VQ2 # one row; the others are kept
    python scripts/bench_ptq.py --report-only                           # rebuild docs/PTQ.md from docs/ptq/results.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets" / "corpora"

DEFAULT_CONFIGS = [  # in priority order: results are written after every row, so a cut-short run still reports
    # name, method, weight spec, ptq kwargs[, activation spec]
    ("GPTQ W4g64 act-order", "gptq", {"bits": 4, "group_size": 64}, {"act_order": True}),
    ("GPTQ W3g64 act-order", "gptq", {"bits": 3, "group_size": 64}, {"act_order": True}),
    ("GPTQ W2g64 act-order", "gptq", {"bits": 2, "group_size": 64}, {"act_order": True}),
    # the seed formats' PTQ starting points (issue #4)
    ("GPTQ W(1+1)g64", "gptq", {"format": "binary11", "group_size": 64}, {}),
    ("GPTQ VQ2", "gptq", {"format": "vq"}, {}),
    ("GPTQ W(1+1)g64A4", "gptq", {"format": "binary11", "group_size": 64}, {}, {"bits": 4}),
    ("RTN W4g64A4", "rtn", {"bits": 4, "group_size": 64}, {}, {"bits": 4}),
    # the same two with a random block-Hadamard in front of every linear (QuaRot-style, `--act-hadamard`)
    ("GPTQ W(1+1)g64A4 hadamard", "gptq", {"format": "binary11", "group_size": 64}, {}, {"bits": 4, "hadamard": True}),
    ("RTN W4g64A4 hadamard", "rtn", {"bits": 4, "group_size": 64}, {}, {"bits": 4, "hadamard": True}),
    ("RTN W2g64", "rtn", {"bits": 2, "group_size": 64}, {}),
    ("RTN W4g64", "rtn", {"bits": 4, "group_size": 64}, {}),
    ("RTN W3g64", "rtn", {"bits": 3, "group_size": 64}, {}),
    ("GPTQ W4g64", "gptq", {"bits": 4, "group_size": 64}, {}),
    ("GPTQ W3g64", "gptq", {"bits": 3, "group_size": 64}, {}),
    ("GPTQ W2g64", "gptq", {"bits": 2, "group_size": 64}, {}),
    ("GPTQ W4g64A4 hadamard", "gptq", {"bits": 4, "group_size": 64}, {}, {"bits": 4, "hadamard": True}),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".cache/smollm2-135m")
    ap.add_argument("--calib", default=str(ASSETS / "wikitext-2" / "valid.txt"))
    ap.add_argument("--eval", default=str(ASSETS / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run only configs whose name contains one of these strings")
    ap.add_argument("--out", default=str(REPO / "docs"))
    ap.add_argument("--report-only", action="store_true", help="rebuild docs/PTQ.md and the plot from results.json")
    a = ap.parse_args(argv)
    if a.report_only:
        out = Path(a.out)
        ref_path = out / "ptq" / "llmcompressor.json"
        write_report(out, json.loads((out / "ptq" / "results.json").read_text()),
                     json.loads(ref_path.read_text()) if ref_path.is_file() else None)
        return 0

    from qat.config import QuantSpec
    from qat.data.text import pack_windows, sample_windows, tokenize_file
    from qat.models.loading import load_fp_model, load_tokenizer
    from qat.ptq.sweep import ptq_sweep

    torch.manual_seed(a.seed)
    tok = load_tokenizer(a.model)
    model = load_fp_model(a.model)
    calib = sample_windows(tokenize_file(a.calib, tok), a.calib_samples, a.seq_len, a.seed)
    eval_ids = pack_windows(tokenize_file(a.eval, tok), a.seq_len, a.eval_tokens)
    configs = [(c[0], c[1], QuantSpec.from_dict({"weight": c[2], "act": c[4] if len(c) > 4 else None}), c[3])
               for c in DEFAULT_CONFIGS if not a.only or any(s in c[0] for s in a.only)]
    t0 = time.time()
    out = Path(a.out)
    (out / "ptq").mkdir(parents=True, exist_ok=True)
    done = []

    def on_row(r):
        print(f"{r.name:24s} ppl {r.perplexity:12.2f}  bpw {r.bits_per_weight:.3f}  {r.seconds:6.1f}s",
              file=sys.stderr, flush=True)
        done.append(r)
        save(a, argv, out, done, eval_ids, time.time() - t0)

    ptq_sweep(model, configs, calib, eval_ids, a.seq_len, on_row=on_row)
    return 0


def save(a, argv, out: Path, rows, eval_ids, seconds: float) -> None:
    n = torch.get_num_threads()
    env = {"device": f"CPU ({platform.processor() or platform.machine()}, {n} thread{'s' if n > 1 else ''})",
           "torch": torch.__version__, "total_seconds": round(seconds, 1),
           "command": "python scripts/bench_ptq.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "protocol": {"eval": Path(a.eval).name, "eval_tokens": int(eval_ids.numel()), "seq_len": a.seq_len,
                        "calib": Path(a.calib).name, "calib_samples": a.calib_samples, "seed": a.seed}}
    # rows from earlier invocations (other --only selections) are kept unless re-measured now; each row remembers the
    # command and thread count that measured it, so the report can say so
    path = out / "ptq" / "results.json"
    kept = []
    if path.is_file():
        prev = json.loads(path.read_text())
        for r in prev["rows"]:
            r.setdefault("command", prev["env"]["command"])
            r.setdefault("device", prev["env"]["device"])
            if prev["env"]["protocol"] == env["protocol"] and r["name"] not in {x.name for x in rows}:
                kept.append(r)
    now = [dict(r.__dict__, command=env["command"], device=env["device"]) for r in rows]
    order = ["FP"] + [c[0] for c in DEFAULT_CONFIGS]
    merged = sorted(kept + now, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    results = {"env": env, "rows": merged}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)
    ref_path = out / "ptq" / "llmcompressor.json"
    ref = json.loads(ref_path.read_text()) if ref_path.is_file() else None
    write_report(out, results, ref)


def write_report(out: Path, results: dict, ref: dict | None) -> None:
    env, rows = results["env"], results["rows"]
    fp = rows[0]["perplexity"]
    lines = [
        "# PTQ starting points on the default model: RTN, GPTQ and the seed formats",
        "",
        ("Measured by `scripts/bench_ptq.py` (the commands are listed under the table) with torch "
        f"{env['torch']}."),
        (f"Perplexity on the first {env['protocol']['eval_tokens']} tokens of {env['protocol']['eval']} "
        f"(windows of {env['protocol']['seq_len']}, bos once); calibration {env['protocol']['calib_samples']} x "
        f"{env['protocol']['seq_len']} tokens sampled from {env['protocol']['calib']} (seed {env['protocol']['seed']})."),
        ("Bits/weight are the stored bits of the quantized linears with all metadata (scales, zeros, (alpha, mu) pairs, "
         "affine maps, rotation signs). PTQ times were taken while other benchmark runs shared the CPU: upper bounds. "
         "For W(1+1) and VQ, 'GPTQ' is the format's Hessian-aware initializer run inside GPTQ's block-sequential "
         "loop (EM grouping, BlockLDLQ)."),
        "",
        "| config | perplexity | x FP | bits/weight (with scales, zeros) | PTQ time (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {r['perplexity'] / fp:.2f} | "
                     f"{r['bits_per_weight']:.3f} | {r['seconds']:.0f} |")
    lines += ["", ("Commands (each row was measured by one of these; `--only` picks rows, results accumulate in "
              "docs/ptq/results.json):"), ""]
    for cmd in dict.fromkeys(r.get("command", env["command"]) for r in rows):
        names = [r["name"] for r in rows if r.get("command", env["command"]) == cmd]
        dev = next(r.get("device", env["device"]) for r in rows if r.get("command", env["command"]) == cmd)
        lines.append(f"- `{cmd}` on {dev}: {', '.join(names)}")
    if ref:
        lines += ["", (f"llm-compressor {ref['version']} GPTQ ({ref['gptq']}), same model, calibration windows and "
                  f"protocol (`{ref['command']}`, {ref['device']}), beside ours with act-order (what its default "
                  "`actorder: static` does) and the same calibration budget:"), "",
                  "| config | llm-compressor | ours | ours / theirs |", "| --- | ---: | ---: | ---: |"]
        ours = {r["name"]: r["perplexity"] for r in rows}
        for r in ref["rows"]:
            if r["config"] == "FP":
                continue
            mine = ours.get(f"GPTQ {r['config']} act-order")
            ratio = f"{mine / r['perplexity']:.3f}" if mine else "-"
            lines.append(f"| {r['config']} | {r['perplexity']:.2f} | {mine:.2f} | {ratio} |" if mine else
                         f"| {r['config']} | {r['perplexity']:.2f} | - | - |")
    (out / "PTQ.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        series = {"RTN (uniform)": lambda n: n.startswith("RTN W") and n.endswith("g64"),
                  "GPTQ act-order (uniform)": lambda n: n.startswith("GPTQ W") and n.endswith("act-order")}
        for label, pick in series.items():
            pts = sorted((r["bits_per_weight"], r["perplexity"]) for r in rows if pick(r["name"]))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        for r in rows:  # the other formats as labelled points
            if r["name"] != "FP" and not any(pick(r["name"]) for pick in series.values()):
                ax.scatter(r["bits_per_weight"], r["perplexity"], marker="x")
                ax.annotate(r["name"], (r["bits_per_weight"], r["perplexity"]), fontsize=7)
        ax.axhline(fp, color="k", ls="--", label=f"FP ({fp:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (incl. metadata)")
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_title("PTQ: perplexity vs bits")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "ptq" / "ppl_vs_bits.png", dpi=120)
    except ImportError:  # pragma: no cover
        pass


if __name__ == "__main__":
    sys.exit(main())
