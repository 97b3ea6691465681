"""Distillation benchmark on the real default model: PTQ students once (`qat ptq`), then recipes and ablations through
the `qat distill` CLI under a compute budget; every experiment's perplexity history (after PTQ, after each stage) is
kept in docs/distill/<name>.json, and docs/DISTILL_RESULTS.md + docs/distill_results.png are rebuilt
from all stored results (so experiments can be run in separate invocations).

Protocol: perplexity on the first 16,384 tokens of WikiText-2 raw test at seq-len 512 (bos once), the recipes'
eval block; training/calibration windows sampled (seeded) from WikiText-2 valid.

    python scripts/bench_distill.py --model .cache/smollm2-135m --budget small               # everything
    python scripts/bench_distill.py --model .cache/smollm2-135m --budget small --only w2g64  # names containing w2g64
    python scripts/bench_distill.py --report-only                                             # rebuild the docs

Budgets (a CPU-sized cut of the recipes; `full` runs the recipes as written):
    tiny    calib 16, stage-1 16 windows x 4 steps/block (batch 2), stage-2 2 steps (batch 1)   smoke test
    small   calib 32, stage-1 32 windows x 12 steps/block (batch 2), stage-2 8 steps (batch 2)   10-27 min/run, 1 thread
    medium  calib 64, stage-1 64 windows x 48 steps/block (batch 4), stage-2 48 steps (batch 2)  ~45 min/run, 1 thread
(measured with up to four runs sharing a 2-core CPU; see docs/DISTILL_RESULTS.md)
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CORPORA = "../shared/assets/corpora"
WORK_REL = Path("runs") / "bench-distill"  # commands use repo-relative paths (they run with cwd = the repo root)
WORK = REPO / WORK_REL
# results are small and are the evidence behind docs/DISTILL_RESULTS.md: they live in the repo, not in runs/
RESULTS = REPO / "docs" / "distill"
CFG = "configs/smollm2-135m"

BUDGETS = {
    "tiny": {"calib": 16, "samples": 16, "s1_steps": 4, "s1_bs": 2, "s2_steps": 2, "s2_bs": 1, "s3_steps": 2},
    "small": {"calib": 32, "samples": 32, "s1_steps": 12, "s1_bs": 2, "s2_steps": 8, "s2_bs": 2, "s3_steps": 4},
    "medium": {"calib": 64, "samples": 64, "s1_steps": 48, "s1_bs": 4, "s2_steps": 48, "s2_bs": 2, "s3_steps": 16},
    "full": None,
}

# PTQ students shared by experiments: name -> `qat ptq` options (calibration count comes from the budget)
PTQ = {
    "w2g64-gptq": ["--method", "gptq", "--bits", "2", "--group-size", "64", "--no-act-order"],
    "w2g64-gptq-ao": ["--method", "gptq", "--bits", "2", "--group-size", "64", "--act-order"],
    "w2g64-rtn": ["--method", "rtn", "--bits", "2", "--group-size", "64"],
    "w1p1a4-gptq": ["--method", "gptq", "--format", "binary11", "--group-size", "64", "--act-bits", "4"],
    "w1p1a4h-gptq": ["--method", "gptq", "--format", "binary11", "--group-size", "64", "--act-bits", "4",
                     "--act-hadamard"],
    "vq2-gptq": ["--method", "gptq", "--format", "vq"],
    "w4a4-gptq": ["--method", "gptq", "--bits", "4", "--group-size", "-1", "--act-bits", "4", "--no-act-order"],
}


def stage0(recipe: str, **changes) -> str:
    """The recipe's first stage with `changes`, as a one-stage --stages value (stage-1-only ablations)."""
    s = yaml.safe_load((REPO / CFG / f"{recipe}.yaml").read_text())["stages"][0]
    for k, v in changes.items():
        node = s
        *path, leaf = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return json.dumps([s], separators=(",", ":"))


TEXT = ["--data.source", "text"]  # corpus windows only (the recipes before mixed data)

# name, group, recipe, PTQ student, extra CLI overrides, what it shows
EXPERIMENTS = [
    ("w2g64-efficientqat", "main", "efficientqat-w2g64", "w2g64-gptq", [],
     "W2g64: GPTQ -> block-wise scales/zeros (frozen codes, token_mse) -> E2E-QP (scales, frozen codes, KL)"),
    ("w2g64-efficientqat-cosine", "main", "efficientqat-w2g64", "w2g64-gptq", ["--stages.0.loss.kind", "cosine"],
     "same, stage-1 loss cosine"),
    ("w2g64-ao-cosine", "main", "efficientqat-w2g64", "w2g64-gptq-ao", ["--stages.0.loss.kind", "cosine"],
     "same, act-order GPTQ init, stage-1 loss cosine"),
    # the recipes now default to mixed data and (W(1+1)A4) the Hadamard: these rows keep what they measured
    ("w1p1a4-lbllm", "main", "lbllm-w1p1a4", "w1p1a4-gptq", ["--quant.act.hadamard", "false", *TEXT],
     "W(1+1)A4: WAT -> E2E polish -> AAR"),
    ("w1p1a4h-lbllm", "main", "lbllm-w1p1a4", "w1p1a4h-gptq", ["--quant.act.hadamard", "true", *TEXT],
     "W(1+1)A4 with a random Hadamard before every linear (QuaRot-style): WAT -> E2E polish -> AAR"),
    ("vq2-lcqat", "main", "lcqat-vq2", "vq2-gptq", TEXT, "VQ 2-bit: block FT -> E2E QAT"),
    ("w2g64-loss-mse", "loss", "efficientqat-w2g64", "w2g64-gptq",
     ["--stages", stage0("efficientqat-w2g64", **{"loss.kind": "mse"})], "stage 1 only, plain MSE"),
    ("w2g64-loss-mse-nosink", "loss", "efficientqat-w2g64", "w2g64-gptq",
     ["--stages", stage0("efficientqat-w2g64", **{"loss.kind": "mse", "loss.sink_weight": 0.0})],
     "stage 1 only, MSE without position 0"),
    ("w2g64-loss-token_mse", "loss", "efficientqat-w2g64", "w2g64-gptq",
     ["--stages", stage0("efficientqat-w2g64", **{"loss.kind": "token_mse"})], "stage 1 only, token-normalised MSE"),
    ("w2g64-loss-cosine", "loss", "efficientqat-w2g64", "w2g64-gptq",
     ["--stages", stage0("efficientqat-w2g64", **{"loss.kind": "cosine"})], "stage 1 only, 1 - cos per token"),
    ("w2g64-rtn-init-mse", "loss", "efficientqat-w2g64", "w2g64-rtn",
     ["--stages", stage0("efficientqat-w2g64", **{"loss.kind": "mse", "train": ["latent", "wq"], "freeze_codes": False,
                                                 "optim.lr": {"latent": 1e-4, "wq": 1e-3}})],
     "stage 1 only, RTN init, latent + scales (LSQ), plain MSE (naive Block-AP)"),
    ("w2g64-rtn-init-token_mse", "loss", "efficientqat-w2g64", "w2g64-rtn",
     ["--stages", stage0("efficientqat-w2g64", **{"loss.kind": "token_mse", "train": ["latent", "wq"],
                                                 "freeze_codes": False, "optim.lr": {"latent": 1e-4, "wq": 1e-3}})],
     "stage 1 only, RTN init, latent + scales (LSQ), token_mse"),
    ("w2g64-gptq-latent-lsq", "loss", "efficientqat-w2g64", "w2g64-gptq",
     ["--stages", stage0("efficientqat-w2g64", **{"train": ["latent", "wq"], "freeze_codes": False,
                                                 "optim.lr": {"latent": 1e-4, "wq": 1e-3}})],
     "stage 1 only, GPTQ init, latent + scales (LSQ, no frozen codes)"),
    ("w2g64-cbq-k2s1", "cbq", "cbq-w2g64", "w2g64-gptq", [], "CBQ windows k=2, overlap s=1, homologous"),
    ("w2g64-cbq-k1s0", "cbq", "cbq-w2g64", "w2g64-gptq",
     ["--stages.0.window", "1", "--stages.0.overlap", "0", "--stages.0.loss.homologous", "false"],
     "same budget, one block per window"),
    ("w4a4-acbq-units", "acbq", "acbq-w4a4", "w4a4-gptq", [], "ACBQ attention/MLP units + cross-unit term"),
    ("w4a4-acbq-blocks", "acbq", "acbq-w4a4", "w4a4-gptq",
     ["--stages.0.units", "block", "--stages.0.loss.cross_unit_weight", "0.0"], "same budget, whole blocks, no cross term"),
]


def budget_overrides(recipe: str, budget: str, stages_given: bool) -> list[str]:
    b = BUDGETS[budget]
    if b is None:
        return []
    raw = yaml.safe_load((REPO / CFG / f"{recipe}.yaml").read_text())
    o = ["--data.num_samples", str(b["samples"])]
    n = 1 if stages_given else len(raw["stages"])
    for i in range(n):
        kind = raw["stages"][i]["kind"]
        steps, bs = {"blockwise": (b["s1_steps"], b["s1_bs"]), "e2e": (b["s2_steps"], b["s2_bs"]),
                     "act": (b["s3_steps"], b["s1_bs"])}[kind]
        o += [f"--stages.{i}.epochs", "null", f"--stages.{i}.steps", str(steps), f"--stages.{i}.batch_size", str(bs)]
        if kind != "e2e":
            o += [f"--stages.{i}.samples", str(b["samples"])]
    return o


def sh(cmd: list[str], env: dict, log: Path) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    return rc, time.time() - t0


def show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python")


def ensure_ptq(name: str, a, env) -> tuple[Path, dict]:
    out = WORK_REL / "ptq" / f"{name}-c{a.calib}"
    info = REPO / out.parent / f"{out.name}.json"
    if (REPO / out / "qat_student.json").is_file() and info.is_file():
        return out, json.loads(info.read_text())
    info.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "qat.cli", "ptq", "--model", a.model, "--data", f"{CORPORA}/wikitext-2/valid.txt",
           *PTQ[name], "--calib-samples", str(a.calib), "--seq-len", "512", "--output", str(out), "--overwrite"]
    print(f"[ptq] {show(cmd)}", flush=True)
    rc, secs = sh(cmd, env, REPO / out.parent / f"{out.name}.log")
    if rc:
        raise SystemExit(f"PTQ {name} failed (rc {rc}); see {REPO / out.parent / (out.name + '.log')}")
    meta = {"command": show(cmd), "seconds": round(secs, 1)}
    info.write_text(json.dumps(meta, indent=2))
    return out, meta


def result_key(name: str, budget: str) -> str:
    """Stored-result name: the small budget (the default) keeps the bare name, other budgets add '@budget'."""
    return name if budget == "small" else f"{name}@{budget}"


def run_experiment(exp, a, env) -> dict:
    name, group, recipe, ptq, extra, what = exp
    student, ptq_meta = ensure_ptq(ptq, a, env)
    key = result_key(name, a.budget)
    out = WORK_REL / "out" / key
    (REPO / out.parent).mkdir(parents=True, exist_ok=True)
    stages_given = "--stages" in extra
    cmd = [sys.executable, "-m", "qat.cli", "distill", "--config", f"{CFG}/{recipe}.yaml", "--model", a.model,
           "--student", str(student), "--output", str(out), "--overwrite", "true", "--progress", "false",
           *budget_overrides(recipe, a.budget, stages_given), *extra]
    print(f"[{key}] {show(cmd)}", flush=True)
    rc, secs = sh(cmd, env, WORK / "out" / f"{key}.log")
    res = {"name": name, "key": key, "group": group, "recipe": recipe, "ptq": ptq, "what": what, "budget": a.budget,
           "command": show(cmd), "ptq_command": ptq_meta["command"], "ptq_seconds": ptq_meta["seconds"],
           "seconds": round(secs, 1), "rc": rc, "threads": a.threads, "date": time.strftime("%Y-%m-%d %H:%M")}
    if rc == 0:
        meta = json.loads((REPO / out / "qat_student.json").read_text())
        res["history"] = [{k: h[k] for k in ("stage", "kind", "val_ppl", "final_loss", "steps", "seconds")
                           if k in h} for h in meta["history"]]
        res["bits_per_weight"] = meta.get("bits_per_weight")
        res["spec"] = meta["spec"]
    else:
        res["error"] = (WORK / "out" / f"{key}.log").read_text()[-2000:]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{key}.json").write_text(json.dumps(res, indent=2).replace(str(REPO) + "/", ""))
    print(f"[{key}] rc={rc} {secs:.0f}s " + " ".join(f"{h['stage']}={h['val_ppl']:.1f}" for h in res.get("history", [])
                                                    if "val_ppl" in h), flush=True)
    return res


def fp_perplexity(a) -> dict:
    f = RESULTS / "_fp.json"
    if f.is_file():
        return json.loads(f.read_text())
    import torch

    from qat.eval.perplexity import evaluate_file
    from qat.models.loading import load_fp_model, load_tokenizer

    torch.set_num_threads(a.threads)
    t0 = time.time()
    r = evaluate_file(load_fp_model(a.model), load_tokenizer(a.model), REPO / CORPORA / "wikitext-2-raw" / "wiki.test.raw",
                      512, max_tokens=16384, progress=False)
    r["seconds"] = round(time.time() - t0, 1)
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(r, indent=2))
    return r


def _ppl(res: dict, stage_kind: str | None = None, index: int | None = None):
    hs = [h for h in res.get("history", []) if "val_ppl" in h]
    if index is not None:
        return hs[index]["val_ppl"] if index < len(hs) else None
    return next((h["val_ppl"] for h in hs if h["kind"] == stage_kind), None)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        return f"{names[0]} ({len(names)} logical CPUs)"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def _findings(results: list[dict]) -> list[str]:
    """One computed sentence per group: the experiments ranked by their final perplexity."""
    out = []
    for group, title in (("loss", "stage-1 loss / init (W2g64, stage 1 only)"), ("cbq", "CBQ window"),
                         ("acbq", "ACBQ units")):
        rows = [(r["key"], [h["val_ppl"] for h in r["history"] if "val_ppl" in h][-1]) for r in results
                if r["group"] == group and not r.get("rc")]
        if len(rows) > 1:
            rows.sort(key=lambda x: x[1])
            out.append(f"* {title}: " + " < ".join(f"{n} ({v:,.1f})" for n, v in rows))
    for r in results:
        if r["group"] == "main" and not r.get("rc"):
            ppl = [h["val_ppl"] for h in r["history"] if "val_ppl" in h]
            mono = all(b < a for a, b in itertools.pairwise(ppl))
            out.append(f"* {r['key']}: " + " -> ".join(f"{v:,.1f}" for v in ppl) +
                       (" (every stage lowers perplexity)" if mono else " (NOT monotone)"))
    return out


def report(out_dir: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json")) if p.name != "_fp.json"]
    for r in results:
        r.setdefault("key", result_key(r["name"], r["budget"]))
    order = {e[0]: i for i, e in enumerate(EXPERIMENTS)}
    budgets = list(BUDGETS)
    results.sort(key=lambda r: (order.get(r["name"], 999), budgets.index(r["budget"])))
    for r in results:  # the current description (results store the one from their run)
        if r["name"] in order:
            r["what"] = EXPERIMENTS[order[r["name"]]][5]
    fp = json.loads((RESULTS / "_fp.json").read_text()) if (RESULTS / "_fp.json").is_file() else {}
    fmt = lambda v: "—" if v is None else (f"{v:,.1f}" if v < 1e5 else f"{v:.3g}")
    lines = [
        "# Distillation results (SmolLM2-135M-Instruct)",
        "",
        ("Written by `scripts/bench_distill.py` from the runs it stored; every number below is a measurement of the "
        "command shown with it. Perplexity: first 16,384 tokens of WikiText-2 raw test, windows of 512, bos once "
        f"(FP teacher: **{fp.get('perplexity', float('nan')):.2f}**). Training/calibration text: WikiText-2 valid."),
        "",
        (f"Machine: {_cpu()}, CPU only, shared with other jobs; torch threads per "
        "run as listed. Budgets are CPU-sized cuts of the recipes (see the script's docstring), far below the "
        "recipes' own epochs — these are trends at a small budget, not converged results. Up to four runs shared "
        "the 2 cores, so wall times are upper bounds."),
        "",
        "| budget | PTQ calibration | stage-1 tokens per block (steps x batch x 512) | stage-2 tokens | "
        "stage-3 tokens per block |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(f"| {k} | {b['calib']} x 512 | {b['s1_steps'] * b['s1_bs'] * 512:,} ({b['s1_steps']} x {b['s1_bs']}) | "
          f"{b['s2_steps'] * b['s2_bs'] * 512:,} ({b['s2_steps']} x {b['s2_bs']}) | "
          f"{b['s3_steps'] * b['s1_bs'] * 512:,} ({b['s3_steps']} x {b['s1_bs']}) |"
          for k, b in BUDGETS.items() if b and any(r["budget"] == k for r in results)),
        "",
        "The PTQ column is the student each run started from (its own calibration count and window draw; at 2 bits "
        "GPTQ is sensitive to both: act-order W2g64 with 64 windows measured 2,272 in docs/PTQ.md and 3,112 here, "
        "with 32 windows 4,195).",
        "",
        ("| experiment | what | budget | bits/weight | PTQ | after stage 1 | after stage 2 | after stage 3 | "
         "wall (distill) |"),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if r.get("rc"):
            lines.append(f"| {r['key']} | {r['what']} | {r['budget']} | | failed (rc {r['rc']}) | | | | "
                         f"{r['seconds']:.0f} s |")
            continue
        hs = [h for h in r["history"] if "val_ppl" in h]
        ptq = next((h["val_ppl"] for h in hs if h["kind"] == "ptq"), None)
        st = [h["val_ppl"] for h in hs if h["kind"] != "ptq"] + [None] * 3
        bpw = r.get("bits_per_weight")
        mark = " †" if r.get("restored_from") else ""
        lines.append(f"| {r['key']}{mark} | {r['what']} | {r['budget']} | {'' if bpw is None else f'{bpw:.3f}'} | "
                     f"{fmt(ptq)} | {fmt(st[0])} | {fmt(st[1])} | {fmt(st[2])} | {r['seconds']:.0f} s |")
    if any(r.get("restored_from") for r in results):
        lines += ["", "† measured in an earlier session; its stored JSON was lost with that session's scratch directory and "
                  "was rebuilt from the numbers this page printed then (same command, same machine type)."]
    lines += ["", "Ranked (lower is better):", "", *_findings(results), "",
              "![perplexity per stage](distill_results.png)", "", "## Commands", ""]
    seen_ptq = set()
    for r in results:
        if r["ptq_command"] not in seen_ptq:
            seen_ptq.add(r["ptq_command"])
            lines += [f"PTQ student `{r['ptq']}` ({r['ptq_seconds']:.0f} s):", "", "```", r["ptq_command"], "```", ""]
    for r in results:
        lines += [f"`{r['key']}` ({r['date']}, {r['threads']} thread(s), {r['seconds']:.0f} s):", "", "```",
                  r["command"], "```", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines).replace(str(REPO) + "/", "") + "\n"  # no machine paths in the docs
    (out_dir / "DISTILL_RESULTS.md").write_text(text)
    plot(results, fp, out_dir / "distill_results.png")
    print(f"wrote {out_dir / 'DISTILL_RESULTS.md'}")


def plot(results: list[dict], fp: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if not r.get("rc")]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(ok)), 4.8))
    width = 0.2
    labels = ["PTQ", "stage 1", "stage 2", "stage 3"]
    for j, lab in enumerate(labels):
        xs, ys = [], []
        for i, r in enumerate(ok):
            hs = [h for h in r["history"] if "val_ppl" in h]
            ptq = [h["val_ppl"] for h in hs if h["kind"] == "ptq"]
            st = [h["val_ppl"] for h in hs if h["kind"] != "ptq"]
            vals = (ptq[:1] or [None]) + st
            if j < len(vals) and vals[j] is not None:
                xs.append(i + (j - 1.5) * width)
                ys.append(vals[j])
        if xs:
            ax.bar(xs, ys, width, label=lab)
    if fp:
        ax.axhline(fp["perplexity"], color="k", ls="--", lw=1, label=f"FP {fp['perplexity']:.1f}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(ok)), [r["key"] for r in ok], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("WikiText-2 perplexity (16k tokens)")
    ax.set_title("SmolLM2-135M distillation on CPU (budget in the name: @medium; no suffix = small)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".cache/smollm2-135m")
    ap.add_argument("--budget", default="small", choices=list(BUDGETS))
    ap.add_argument("--only", nargs="*", help="run experiments whose name contains one of these strings")
    ap.add_argument("--group", nargs="*", help="run experiments of these groups (main, loss, cbq, acbq)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a shared CPU)")
    ap.add_argument("--rerun", action="store_true", help="run experiments that already have a stored result")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=str(REPO / "docs"))
    a = ap.parse_args(argv)
    b = BUDGETS[a.budget]
    a.calib = b["calib"] if b else 128
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    if not a.report_only:
        fp_perplexity(a)
        for exp in EXPERIMENTS:
            name, group = exp[0], exp[1]
            if a.only and not any(s in name for s in a.only):
                continue
            if a.group and group not in a.group:
                continue
            key = result_key(name, a.budget)
            if not a.rerun and (RESULTS / f"{key}.json").is_file():
                prev = json.loads((RESULTS / f"{key}.json").read_text())
                if prev.get("budget") == a.budget and not prev.get("rc"):
                    continue
            run_experiment(exp, a, env)
    report(Path(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
