"""Quality benchmark: our recipes against the post-training and QAT tools people would otherwise use, on two domains.

Every row produces a model (a qat student, or another tool's quantize-dequantize checkpoint) that is evaluated here
by one protocol: perplexity on the first --eval-tokens tokens of WikiText-2 raw test and of the python-stdlib test
split (code, a domain none of the rows trains on), windows of 512, bos once. Training/calibration windows are
sampled (seeded) from WikiText-2 valid, the same windows for every row of the same size.

Rows (`--only` selects by name; results accumulate in docs/quality/<row>.json and docs/RESULTS.md + its PNG are
rebuilt from all stored rows):
    fp                       the teacher
    rtn-*, gptq-*            `qat ptq` (GPTQ act-order, our default)
    llmc-gptq-*              llm-compressor's GPTQ (scripts/bench_ptq_llmcompressor.py, its own venv .cache/venv-llmc)
    autoround-*              Intel AutoRound (scripts/bench_autoround.py, its own venv .cache/venv-autoround)
    torchao-qat-*            torchao QAT (scripts/bench_torchao.py, its own venv .cache/venv-torchao)
    s1-*                     stage 1 alone at AutoRound's budget, one lever (rounding method, loss, init, data) per row
    ours-*                   `qat distill` recipes as shipped (configs/smollm2-135m/: w{4,3,2}g64, lcqat-vq2,
                             lbllm-w1p1, lbllm-w1p1a4); ours-*-stage2: a recipe as two runs (stage 1 is an s1-* row)
A row whose tool venv is missing is skipped with a message that says how to create it.

    python scripts/bench_quality.py --only fp gptq-w2g64 ours-w2g64      # some rows
    python scripts/bench_quality.py --report-only                         # rebuild docs/RESULTS.md from stored rows
    python scripts/bench_quality.py --quick --out /tmp/q                  # smoke test on a tiny random model (CI)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPORA = "../shared/assets/corpora"  # repo-relative: the commands below run with cwd = the repo root
WIKI_VALID = f"{CORPORA}/wikitext-2/valid.txt"
DOMAINS = {"wikitext2": f"{CORPORA}/wikitext-2-raw/wiki.test.raw", "code": f"{CORPORA}/python-stdlib/test.py.txt"}
VENVS = {"autoround": ".cache/venv-autoround", "torchao": ".cache/venv-torchao", "llmc": ".cache/venv-llmc"}
VENV_HELP = {
    "autoround": "python -m venv .cache/venv-autoround && .cache/venv-autoround/bin/pip install torch==2.13.0 "
                 "auto-round==0.16.1",
    "torchao": "python -m venv .cache/venv-torchao && .cache/venv-torchao/bin/pip install torch==2.13.0 "
               "torchao==0.18.0 transformers",
    "llmc": "python -m venv .cache/venv-llmc && .cache/venv-llmc/bin/pip install torch==2.13.0 'llmcompressor==0.14.*'",
}
CALIB = 64  # calibration windows of 512 tokens for every PTQ row (and AutoRound's tuning set)


def _uniform(bits: int) -> dict:
    return {"format": "uniform", "bits": bits, "group_size": 64, "label": f"W{bits}g64"}


# name -> row definition. kind: fp | ptq | distill | autoround | torchao | llmc
ROWS: dict[str, dict] = {"fp": {"kind": "fp", "label": "FP", "what": "the FP teacher"}}
for _b in (4, 3, 2):
    ROWS[f"rtn-w{_b}g64"] = {"kind": "ptq", **_uniform(_b), "what": "RTN (min/max)",
                             "args": ["--method", "rtn", "--bits", str(_b), "--group-size", "64"]}
    ROWS[f"gptq-w{_b}g64"] = {"kind": "ptq", **_uniform(_b), "what": "our GPTQ (act-order)",
                              "args": ["--method", "gptq", "--bits", str(_b), "--group-size", "64", "--act-order"]}
    ROWS[f"llmc-gptq-w{_b}g64"] = {"kind": "llmc", **_uniform(_b), "what": "llm-compressor 0.14 GPTQ"}
    ROWS[f"autoround-w{_b}g64"] = {"kind": "autoround", **_uniform(_b),
                                   "what": "AutoRound 0.16 (50 iters x batch 4 per block)", "iters": 50, "batch": 4}
ROWS["torchao-qat-w2g64"] = {"kind": "torchao", **_uniform(2), "tokens_like": "ours-w2g64",
                             "what": "torchao QAT (int2 g64 fake-quant, float zero point, CE)"}
for _b in (4, 3):  # the tokens per weight of our measured w{4,3}g64 runs (stage 1 + stage 2 as two rows)
    ROWS[f"torchao-qat-w{_b}g64"] = {"kind": "torchao", **_uniform(_b), "tokens_like": f"ours-w{_b}g64-stage2",
                                     "what": f"torchao QAT (int{_b} g64 fake-quant, float zero point, CE)"}
MIXED = ["--data.source", "mixed", "--data.teacher_fraction", "0.5", "--data.prompt_len", "8"]  # half teacher samples
S1 = "configs/smollm2-135m/stage1-autoround-budget.yaml"  # stage 1 alone at AutoRound's budget, one lever at a time
for _name, _what, _args in (
        ("signround-cosine", "SignRound, cosine loss, RTN init", []),
        ("signround-mse", "SignRound, MSE loss, RTN init", ["--stages.0.loss.kind", "mse"]),
        ("signround-mse-gptq", "SignRound, MSE loss, GPTQ init", ["--stages.0.loss.kind", "mse", "--ptq.method", "gptq"]),
        ("adaround-cosine", "AdaRound, cosine loss, RTN init", ["--stages.0.rounding.method", "adaround"]),
        ("latent-lsq-cosine", "latent + scales/zeros (LSQ), lr 1e-3, cosine, RTN init",
         ["--stages.0.rounding.method", "none", "--stages.0.train", "[latent, wq]",
          "--stages.0.optim.lr", "{latent: 1.0e-3, wq: 1.0e-3}", "--stages.0.optim.schedule", "cosine"]),
        ("signround-cosine-mixed", "SignRound, cosine, RTN init, mixed data (half teacher samples)",
         MIXED)):
    ROWS[f"s1-{_name}"] = {"kind": "distill", **_uniform(2), "config": S1, "args": _args, "group": "stage1",
                           "what": f"stage 1 only: {_what}"}
STAGE2_LR = {4: "2.0e-4", 3: "4.3e-4"}  # the w4g64 / w3g64 recipes' stage-2 lr (tests/test_bench_quality.py checks)
for _b in (4, 3):  # stage 1 of the w4g64 / w3g64 recipes alone: ours at AutoRound's budget, token for token
    ROWS[f"s1-w{_b}g64"] = {"kind": "distill", **_uniform(_b), "config": S1,
                            "args": ["--quant.weight.bits", str(_b), *MIXED],
                            "what": f"ours, stage 1 of the w{_b}g64 recipe (SignRound, cosine, RTN init, mixed data)"}
    ROWS[f"ours-w{_b}g64"] = {"kind": "distill", **_uniform(_b), "config": f"configs/smollm2-135m/w{_b}g64.yaml",
                              "args": [], "what": f"ours: w{_b}g64 recipe (RTN, SignRound on mixed data, E2E-QP)"}
    ROWS[f"ours-w{_b}g64-stage2"] = {  # w2g64-stage2.yaml pointed at this width's stage-1 row, with its recipe's lr
        "kind": "distill", **_uniform(_b), "config": "configs/smollm2-135m/w2g64-stage2.yaml", "after": f"s1-w{_b}g64",
        "args": ["--student", f"runs/quality/s1-w{_b}g64", "--data.cache_dir", f"runs/quality/s1-w{_b}g64.run/data",
                 "--stages.0.optim.lr", f"{{wq.scale: {STAGE2_LR[_b]}}}"],
        "what": f"ours: the w{_b}g64 recipe as two runs (s1-w{_b}g64, then its stage 2)"}
ROWS["ours-w2g64"] = {"kind": "distill", **_uniform(2), "config": "configs/smollm2-135m/w2g64.yaml", "args": [],
                      "what": "ours: w2g64 recipe (RTN, SignRound on mixed data, E2E-QP)"}
ROWS["ours-w2g64-stage2"] = {"kind": "distill", **_uniform(2), "config": "configs/smollm2-135m/w2g64-stage2.yaml",
                             "args": [], "after": "s1-signround-cosine-mixed",
                             "what": "ours: the w2g64 recipe as two runs (s1-signround-cosine-mixed, then its stage 2)"}
for _name, _label, _cfg, _what in (  # the other formats' recipes as shipped, each about one CPU-hour; their format
        # is the label (a TARGETS key): the bits per weight come from the export, as for every distilled row
        ("ours-vq2", "VQ 2-bit", "lcqat-vq2", "ours: lcqat-vq2 recipe (BlockLDLQ, block FT, E2E QAT of the codes)"),
        ("ours-w1p1a16", "W(1+1)A16", "lbllm-w1p1", "ours: lbllm-w1p1 recipe (GPTQ-EM, WAT, E2E polish)"),
        ("ours-w1p1a4", "W(1+1)A4", "lbllm-w1p1a4",
         "ours: lbllm-w1p1a4 recipe (Hadamard, GPTQ-EM, WAT, E2E polish, AAR)")):
    ROWS[_name] = {"kind": "distill", "label": _label, "config": f"configs/smollm2-135m/{_cfg}.yaml", "args": [],
                   "what": _what}
ROWS["ours-efficientqat-w2g64"] = {"kind": "distill", **_uniform(2), "args": [],
                                   "config": "configs/smollm2-135m/efficientqat-w2g64.yaml",
                                   "what": "ours: efficientqat-w2g64 recipe (GPTQ, Block-AP, E2E-QP)"}


# ---- running rows -----------------------------------------------------------------------------------------------------

def run_cmd(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """Run `cmd` (cwd = repo root) with its output streamed into `log` (`tail -f` shows an hour-long row's progress);
    returns (seconds, peak RSS of the child in MiB)."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
               "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(r)")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        p = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    seconds = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}), see {log}: {shlex.join(cmd)}")
    last = log.read_text().strip().splitlines()[-1].split()
    if last[0] != "peak_rss_kib":
        raise RuntimeError(f"{log} does not end with the wrapper's peak RSS line")
    return seconds, int(last[1]) / 1024


def evaluate(model_dir: Path, tokens: int) -> dict:
    """Perplexity on every domain, plus bits/weight, in this process (one model load for both files)."""
    import torch

    from qat.eval.perplexity import evaluate_file
    from qat.models.loading import load_any
    from qat.nn import model_bits_per_weight, quant_linears

    model, tok = load_any(model_dir)
    out = {}
    with torch.no_grad():
        for dom, path in DOMAINS.items():
            out[dom] = evaluate_file(model, tok, REPO / path, 512, max_tokens=tokens, progress=False)["perplexity"]
    out["bits_per_weight"] = model_bits_per_weight(model)["bits_per_weight"] if quant_linears(model) else None
    return out


def calib_windows(model: str, work: Path, n: int) -> Path:
    """n windows of 512 tokens of WikiText-2 valid drawn as every recipe draws its pool (same sampler and seed 0),
    saved for the tools that run in their own environments."""
    import torch

    from qat.data.text import sample_windows, tokenize_file
    from qat.models.loading import load_tokenizer

    path = work / f"calib-{n}x512.pt"
    if not path.is_file():
        ids = tokenize_file(REPO / WIKI_VALID, load_tokenizer(REPO / model))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(sample_windows(ids, n, 512, 0), path)
    return path


def stage_tokens(history: list[dict]) -> dict:
    """Training tokens per stage kind: block-wise tokens per block (every window trains one block's worth), e2e, and
    the activation stage's (per window too when it runs block by block)."""
    out = {}
    for h in history:
        n = max(len(h.get("windows", [])), 1)
        if h.get("kind") == "blockwise":
            out["blockwise_per_window"] = out.get("blockwise_per_window", 0) + h["tokens"] // n
        elif h.get("kind") in ("e2e", "act"):
            out[h["kind"]] = out.get(h["kind"], 0) + h["tokens"] // n
    return out


def run_row(name: str, row: dict, a, work: Path) -> dict | None:
    out_dir = work / name
    log = work / "logs" / f"{name}.log"
    rel = os.path.relpath(out_dir, REPO)
    res: dict = {"name": name, "kind": row["kind"], "label": row["label"], "what": row["what"]}
    if row["kind"] in VENVS:
        py = REPO / VENVS[row["kind"]] / "bin" / "python"
        if not py.is_file():
            print(f"skip {name}: {VENVS[row['kind']]} is missing; create it with: {VENV_HELP[row['kind']]}",
                  file=sys.stderr)
            return None
    if row["kind"] == "fp":
        model_dir, seconds, rss = REPO / a.model, 0.0, None
        cmd = None
    elif row["kind"] == "ptq":
        cmd = [sys.executable, "-m", "qat.cli", "ptq", "--model", a.model, "--data", WIKI_VALID, *row["args"],
               "--calib-samples", str(a.calib), "--seq-len", "512", "--output", rel, "--overwrite"]
        seconds, rss = run_cmd(cmd, log)
        model_dir = out_dir
        res["tokens"] = {"calibration": a.calib * 512}
    elif row["kind"] == "distill":
        cmd = [sys.executable, "-m", "qat.cli", "distill", "--config", row["config"],
               "--model", a.model, "--output", rel, "--progress", "false", "--overwrite", "true", *row["args"]]
        if getattr(a, "adopt", None):  # trained before this row existed, by a recipe with the same content: evaluate it as the row
            model_dir, rss = Path(a.adopt), None
            meta = json.loads((model_dir / "qat_student.json").read_text())
            seconds = meta["distill"]["seconds"]
            res["adopted_from"] = (f"{a.adopt}, trained by `qat distill` with a recipe file of the same content as "
                                   "this command's before the row existed, by the code of that time (its batch "
                                   "order was drawn by an older, equally seeded sampler)")
        else:
            seconds, rss = run_cmd(cmd, log)
            model_dir = out_dir
        meta = json.loads((model_dir / "qat_student.json").read_text())
        res["tokens"] = stage_tokens(meta["history"])
        if row.get("after"):  # a second run on the student of another row: the tokens of both
            first = load_result(a.results, row["after"])
            res["tokens"] = {**(first or {}).get("tokens", {}), **res["tokens"]}
        res["history"] = [{k: h.get(k) for k in ("stage", "kind", "val_ppl", "tokens", "seconds")}
                          for h in meta["history"]]
    elif row["kind"] == "autoround":
        windows = calib_windows(a.model, work, a.calib)
        cmd = [str(REPO / VENVS["autoround"] / "bin" / "python"), "scripts/bench_autoround.py", "--model", a.model,
               "--windows", os.path.relpath(windows, REPO), "--bits", str(row["bits"]), "--group-size", "64",
               "--iters", str(row["iters"]), "--batch-size", str(row["batch"]), "--out", rel]
        seconds, rss = run_cmd(cmd, log)
        model_dir = out_dir
        res["tokens"] = {"blockwise_per_window": row["iters"] * row["batch"] * 512}
    elif row["kind"] == "torchao":
        ref = load_result(a.results, row["tokens_like"])
        if ref is None:
            print(f"skip {name}: run {row['tokens_like']} first (torchao gets the same training tokens)",
                  file=sys.stderr)
            return None
        t = ref["tokens"]  # every weight of ours sees its block-wise tokens plus the end-to-end ones
        steps = max(1, (t.get("blockwise_per_window", 0) + t.get("e2e", 0)) // (4 * 512))
        import yaml

        pool = yaml.safe_load((REPO / ROWS[row["tokens_like"]]["config"]).read_text())["data"]["num_samples"]
        windows = calib_windows(a.model, work, pool)  # the recipe's training pool (same sampler and seed)
        cmd = [str(REPO / VENVS["torchao"] / "bin" / "python"), "scripts/bench_torchao.py", "--model", a.model,
               "--windows", os.path.relpath(windows, REPO), "--bits", str(row["bits"]), "--group-size", "64",
               "--steps", str(steps), "--batch-size", "4", "--zero-point-domain", "float", "--out", rel]
        seconds, rss = run_cmd(cmd, log)
        model_dir = out_dir
        res["tokens"] = {"e2e": steps * 4 * 512}
    elif row["kind"] == "llmc":
        cmd = [str(REPO / VENVS["llmc"] / "bin" / "python"), "scripts/bench_ptq_llmcompressor.py", "--model",
               a.model, "--bits", str(row["bits"]), "--save", rel]
        seconds, rss = run_cmd(cmd, log)
        model_dir = out_dir
        res["tokens"] = {"calibration": a.calib * 512}
    else:
        raise ValueError(row["kind"])
    res.update(evaluate(model_dir, a.eval_tokens))
    if res["bits_per_weight"] is None and row["kind"] != "fp":  # a q-dq checkpoint of another tool: its format
        res["bits_per_weight"] = row["bits"] + 24 / 64
    res.update(seconds=round(seconds, 1), peak_rss_mib=None if rss is None else round(rss),
               command=None if cmd is None else shlex.join(cmd).replace(sys.executable, "python").replace(f"{REPO}/", ""),
               date=time.strftime("%Y-%m-%d"), machine=machine(), eval_tokens=a.eval_tokens)
    return res


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"


def load_result(results: Path, name: str) -> dict | None:
    p = results / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


# ---- the report -------------------------------------------------------------------------------------------------------

def _k(n: int) -> str:
    return f"{n / 1000:.0f}k" if n >= 10_000 else f"{n:,}"


def _fmt_tokens(t: dict | None) -> str:
    if not t:
        return "–"
    parts = []
    if "calibration" in t:
        parts.append(f"calib {_k(t['calibration'])}")
    if "blockwise_per_window" in t:
        parts.append(f"{_k(t['blockwise_per_window'])}/block")
    if "e2e" in t:
        parts.append(f"e2e {_k(t['e2e'])}")
    if "act" in t:
        parts.append(f"act {_k(t['act'])}")
    return " + ".join(parts)


def write_report(results: Path, doc: Path, known: dict | None = None) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    if not rows:
        return
    fp = next((r for r in rows if r["kind"] == "fp"), None)
    order = list(known or ROWS)
    formats = ["FP", "W4g64", "W3g64", "W2g64"]  # grouped by format, then in ROWS order
    rows.sort(key=lambda r: (formats.index(r["label"]) if r["label"] in formats else len(formats),
                             order.index(r["name"]) if r["name"] in order else len(order), r["name"]))
    lines = ["# Results: quality against post-training and QAT tools, on two domains", "",
             ("Written by `scripts/bench_quality.py` from the rows it stored in docs/quality/ (each row lists the "
              "command that produced it, the machine and the date). Perplexity on the first "
              f"{rows[0]['eval_tokens']:,} tokens of WikiText-2 raw test and of python-stdlib test.py.txt (code; "
              "no row trains on code), windows of 512, bos once. Calibration/training windows: WikiText-2 valid."),
             ""]
    head = "| row | format | bits/weight | WikiText-2 | × FP | code | × FP | training tokens | wall | peak RSS |"
    lines += [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    stage1 = [r for r in rows if ROWS.get(r["name"], {}).get("group") == "stage1"]
    for r in [r for r in rows if r not in stage1] + ([None] if stage1 else []) + stage1:
        if r is None:  # the stage-1 comparison gets its own table
            lines += ["", "## Stage 1 at AutoRound's budget: how to learn the rounding", "",
                      "Stage 1 alone (no end-to-end stage), W2g64, 64 x 512 WikiText-2 valid windows (the AutoRound "
                      "row's), 50 steps x batch 4 per block; one lever changed per row "
                      "(configs/smollm2-135m/stage1-autoround-budget.yaml + the row's overrides).", "", head,
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
            continue
        wx = r["wikitext2"] / fp["wikitext2"] if fp else math.nan
        cx = r["code"] / fp["code"] if fp else math.nan
        bpw = "16" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        wall = "–" if not r["seconds"] else f"{r['seconds'] / 60:.1f} min"
        rss = "–" if not r.get("peak_rss_mib") else f"{r['peak_rss_mib'] / 1024:.1f} GiB"
        lines.append(f"| {r['name']}: {r['what']} | {r['label']} | {bpw} | {r['wikitext2']:.2f} | {wx:.2f} | "
                     f"{r['code']:.2f} | {cx:.2f} | {_fmt_tokens(r.get('tokens'))} | {wall} | {rss} |")
    lines += ["", "![perplexity vs bits/weight](quality/ppl_vs_bits.png)", "",
              "The plot shows the finished models of the first table and the Pareto front over all of them (the "
              "stage-1 rows of the second table are left out); perplexity is on a log scale.", ""]
    if fp:
        runs = target_runs(rows)
        lines += targets_section(runs, fp)
        plot_tokens(runs, fp, results / "ppl_vs_tokens.png")
    analysis = results / "analysis.md"  # the reading of the tables, written by hand after a run
    if analysis.is_file():
        lines += [analysis.read_text().strip(), ""]
    lines += ["## Commands", ""]
    for r in rows:
        if r.get("command"):
            lines.append(f"- {r['name']} ({r['date']}, {r['machine']}): `{r['command']}`"
                         + (f" (evaluated from {r['adopted_from']})" if r.get("adopted_from") else ""))
    doc.write_text("\n".join(lines) + "\n")
    plot(rows, results / "ppl_vs_bits.png")


# ---- targets per format (issue targets, × FP on WikiText-2; code no worse than 1.5× the WikiText ratio) -------------

TARGETS = {"W4g64": 1.05, "W3g64": 1.2, "W2g64": 2.0, "VQ 2-bit": 1.7, "W(1+1)A16": 2.5, "W(1+1)A4": 3.0}
CODE_RATIO = 1.5  # code × FP may be at most this many times the WikiText-2 × FP


def _format_label(spec: dict) -> str:
    """The TARGETS key of a docs/distill result's quant spec."""
    w, act = spec["weight"], spec.get("act", {}).get("bits", 16)
    if w["format"] == "vq":
        return f"VQ {w['bits']}-bit"
    if w["format"] == "binary11":
        return "W(1+1)A16" if act >= 16 else f"W(1+1)A{act}"
    return f"W{w['bits']}g{w['group_size']}" + ("" if act >= 16 else f"A{act}")


def target_runs(rows: list[dict]) -> list[dict]:
    """Every distilled run with its format, per-stage perplexity and cumulative training tokens per weight (block-wise
    tokens count once per weight: each window sees them): the rows here, plus scripts/bench_distill.py's stored runs
    of the other formats (docs/distill/, WikiText-2 only, same eval protocol)."""
    runs = []
    for r in rows:
        if r["kind"] != "distill" or not r.get("history"):
            continue
        t, cum, pts = r.get("tokens") or {}, 0, []
        hist = [h for h in r["history"] if h["kind"] != "ptq"]
        first = next((f for f in rows if f["name"] == ROWS.get(r["name"], {}).get("after")), None)
        seconds = r["seconds"]
        if first is not None:  # its stage 1 ran as another row: the curve starts at that row's student
            cum = t.get("blockwise_per_window", 0)
            pts.append((cum, first["wikitext2"]))
            seconds += first["seconds"]
        for h in hist:
            cum += t.get({"blockwise": "blockwise_per_window", "e2e": "e2e", "act": "act"}[h["kind"]], 0)
            pts.append((cum, h["val_ppl"]))
        runs.append({"name": r["name"], "format": r["label"], "wikitext2": r["wikitext2"], "code": r["code"],
                     "points": pts, "seconds": seconds, "source": "docs/quality"})
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_distill import BUDGETS

    for p in sorted((REPO / "docs" / "distill").glob("*.json")):
        d = json.loads(p.read_text())
        if p.name.startswith("_") or d.get("rc") or not d.get("history") or not BUDGETS.get(d.get("budget")):
            continue
        b, cum, pts = BUDGETS[d["budget"]], 0, []
        for h in d["history"]:
            if h["kind"] != "ptq":
                cum += {"blockwise": b["s1_steps"] * b["s1_bs"], "e2e": b["s2_steps"] * b["s2_bs"],
                        "act": b["s3_steps"] * b["s1_bs"]}[h["kind"]] * 512
                pts.append((cum, h["val_ppl"]))
        runs.append({"name": f"{d['name']}@{d['budget']}", "format": _format_label(d["spec"]),
                     "wikitext2": pts[-1][1], "code": None, "points": pts, "seconds": d["seconds"],
                     "source": "docs/distill"})
    return runs


def targets_section(runs: list[dict], fp: dict) -> list[str]:
    lines = ["## Targets per format", "",
             (f"The best distilled run of each format against its target (× FP on WikiText-2; on code at most "
              f"{CODE_RATIO}× the WikiText-2 ratio). Runs from docs/distill/ are scripts/bench_distill.py's (same "
              "evaluation, WikiText-2 only, older recipes at their small/medium budgets: their code perplexity was not "
              "measured). Budgets differ per row; the wall time is one thread of this 2-core machine, mostly shared "
              "with another job. A run done as two rows (stage 1, then stage 2 from its student) counts both runs' "
              "wall time. The curves of perplexity against training tokens are in ppl_vs_tokens.png below."),
             "", "| format | target | best run | WikiText-2 | × FP | code × FP | code / WikiText ratio | tokens per "
             "weight | wall | WikiText target | code target |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: "
             "| ---: | --- | --- |"]
    for fmt, target in TARGETS.items():
        cands = [r for r in runs if r["format"] == fmt]
        if not cands:
            lines.append(f"| {fmt} | ≤ {target}× | not run | – | – | – | – | – | – | not measured | not measured |")
            continue
        best = min(cands, key=lambda r: r["wikitext2"])
        wx = best["wikitext2"] / fp["wikitext2"]
        cx = None if best["code"] is None else best["code"] / fp["code"]
        code_ok = "not measured" if cx is None else ("reached" if cx <= CODE_RATIO * wx else
                                                     f"missed ({cx / wx:.1f}× the ratio)")
        lines.append(f"| {fmt} | ≤ {target}× | {best['name']} | {best['wikitext2']:.2f} | {wx:.2f} | "
                     f"{'–' if cx is None else f'{cx:.2f}'} | {'–' if cx is None else f'{cx / wx:.2f}'} | "
                     f"{_k(best['points'][-1][0])} | {best['seconds'] / 60:.0f} min | "
                     f"{'reached' if wx <= target else 'missed'} | {code_ok} |")
    return lines + ["", "![perplexity vs training tokens](quality/ppl_vs_tokens.png)", ""]


def plot_tokens(runs: list[dict], fp: dict, path: Path) -> None:
    """Perplexity after each stage against cumulative training tokens per weight, one panel per format with its
    target: where a curve still falls, more budget buys more."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fmts = [f for f in TARGETS if any(r["format"] == f and len(r["points"]) > 1 for r in runs)]
    if not fmts:
        return
    xs_all = [x for r in runs if len(r["points"]) > 1 for x, _ in r["points"]]
    fig, axes = plt.subplots(1, len(fmts), figsize=(4 * len(fmts), 3.8), squeeze=False)
    for ax, fmt in zip(axes[0], fmts):
        for r in (r for r in runs if r["format"] == fmt and len(r["points"]) > 1):  # the stage-1 ablations: table
            xs, ys = zip(*r["points"])
            ax.plot(xs, ys, marker="o", ms=3, label=r["name"])
        ax.axhline(TARGETS[fmt] * fp["wikitext2"], color="g", ls=":", lw=1, label=f"target {TARGETS[fmt]}× FP")
        ax.axhline(fp["wikitext2"], color="k", ls="--", lw=0.8, label="FP")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers, no crowded minor labels
            axis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlim(min(xs_all) / 1.3, max(xs_all) * 1.3)  # one token axis for every panel
        ax.set_xlabel("training tokens per weight (cumulative)")
        ax.set_ylabel("WikiText-2 perplexity")
        ax.set_title(fmt)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def spread_labels(logy: list[float], gap: float) -> list[float]:
    """Label heights (log10) for points stacked at one x: sorted bottom-up, each at its point or at least `gap` above
    the label below."""
    order = sorted(range(len(logy)), key=lambda i: logy[i])
    out = [0.0] * len(logy)
    prev = -math.inf
    for i in order:
        out[i] = max(logy[i], prev + gap)
        prev = out[i]
    return out


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bits and perplexity, by increasing bits."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity vs bits/weight for the finished models (the stage-1 ablations have their own table), with the
    Pareto front over all tools; labels at one width are stacked so they do not overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["kind"] == "fp" or (r.get("bits_per_weight") and not r["name"].startswith("s1-"))]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    kinds = {"ptq": ("o", "PTQ (ours)"), "llmc": ("s", "llm-compressor"), "autoround": ("^", "AutoRound"),
             "torchao": ("v", "torchao QAT"), "distill": ("*", "ours (distilled)")}
    for ax, dom in zip(axes, DOMAINS):
        fp = next((r[dom] for r in rows if r["kind"] == "fp"), None)
        pts = [r for r in rows if r["kind"] in kinds and r.get(dom)]
        for kind, (marker, label) in kinds.items():
            mine = [r for r in pts if r["kind"] == kind]
            if mine:
                ax.scatter([r["bits_per_weight"] for r in mine], [r[dom] for r in mine], marker=marker,
                           s=70 if marker == "*" else 30, label=label, zorder=3)
        front = pareto([(r["bits_per_weight"], r[dom]) for r in pts])
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=0.8, ls=":",
                    label="Pareto front")
        if fp:
            ax.axhline(fp, color="k", ls="--", lw=0.8, label=f"FP ({fp:.2f})")
        ax.set_yscale("log")
        lo = min([r[dom] for r in pts] + ([fp] if fp else []))
        hi = max([r[dom] for r in pts] + ([fp] if fp else []))
        gap = 0.045 * max(1.0, math.log10(hi / lo))  # one label height in decades
        for x in sorted({round(r["bits_per_weight"], 3) for r in pts}):
            col = [r for r in pts if round(r["bits_per_weight"], 3) == x]
            ys = spread_labels([math.log10(r[dom]) for r in col], gap)
            for r, ly in zip(col, ys):
                ax.annotate(r["name"], (r["bits_per_weight"], r[dom]), xytext=(x + 0.06, 10 ** ly), fontsize=6,
                            va="center", arrowprops={"arrowstyle": "-", "lw": 0.3, "color": "0.6"})
        ax.set_xlim(min(r["bits_per_weight"] for r in pts) - 0.1, max(r["bits_per_weight"] for r in pts) + 0.75)
        ax.set_xlabel("bits per weight (with scales and zeros)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title({"wikitext2": "WikiText-2 (in domain)", "code": "python-stdlib (code, out of domain)"}[dom])
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- quick mode (CI smoke test) ----------------------------------------------------------------------------------------

def quick(out: Path) -> int:
    """A random-init 2-block Llama with SmolLM2's tokenizer: fp, RTN, GPTQ and a two-stage distillation row run
    end to end through the same code paths, into `out` (never into docs/)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assets = REPO.parent / "shared" / "assets" / "smollm2-135m-instruct"
    model_dir = out / "tiny-model"
    if not (model_dir / "model.safetensors").is_file():
        cfg = AutoConfig.from_pretrained(assets)
        cfg.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 16})
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
        AutoTokenizer.from_pretrained(assets).save_pretrained(model_dir)
    recipe = out / "tiny-recipe.yaml"
    shutil.copy(REPO / "configs" / "tiny" / "w2-three-stages.yaml", recipe)
    stages = [{"kind": "blockwise", "steps": 2, "batch_size": 2, "rounding": {"method": "signround"}},
              {"kind": "e2e", "steps": 2, "batch_size": 2, "train": ["wq.scale"], "freeze_codes": True}]
    rows = {k: v for k, v in ROWS.items() if k in ("fp", "gptq-w2g64")}
    rows["ours-w2-tiny"] = {"kind": "distill", **_uniform(2), "label": "W2g32", "config": os.path.relpath(recipe, REPO),
                            "what": "tiny two-stage recipe (SignRound, then scales end to end)",
                            "args": ["--quant.act.bits", "16", "--stages", json.dumps(stages)]}
    a = argparse.Namespace(model=os.path.relpath(model_dir, REPO), eval_tokens=512, results=out / "quality",
                           calib=4)
    for name, row in rows.items():
        save(a.results, run_row(name, row, a, out / "work"))
    write_report(a.results, out / "RESULTS.md", rows)
    return 0


def save(results: Path, res: dict | None) -> None:
    if res is None:
        return
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{res['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(path)
    print(f"{res['name']:24s} wiki {res['wikitext2']:10.2f}  code {res['code']:10.2f}  {res['seconds']:7.0f}s",
          file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".cache/smollm2-135m", help="repo-relative model directory")
    ap.add_argument("--only", nargs="*", help="rows to run (names, see the docstring); default: every row")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--work", default="runs/quality", help="scratch directory for the models (repo-relative)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny random model, every code path, seconds (CI)")
    ap.add_argument("--out", default=None, help="--quick: where to write (default: a temporary directory)")
    ap.add_argument("--eval-dir", default=None, help="only evaluate this model directory on both domains (JSON line)")
    ap.add_argument("--adopt", default=None, help="with one distill row in --only: evaluate this existing student as "
                                                  "that row instead of training it (recorded in the row)")
    a = ap.parse_args(argv)
    if a.eval_dir:
        print(json.dumps({"model": a.eval_dir, **evaluate(Path(a.eval_dir), a.eval_tokens)}))
        return 0
    if a.quick:
        import tempfile

        out = Path(a.out or tempfile.mkdtemp(prefix="qat-quality-"))
        out.mkdir(parents=True, exist_ok=True)
        return quick(out.resolve())
    a.results, a.calib = REPO / "docs" / "quality", CALIB
    if a.adopt and (not a.only or len(a.only) != 1 or ROWS.get(a.only[0], {}).get("kind") != "distill"):
        ap.error("--adopt needs exactly one distill row in --only")
    if not a.report_only:
        names = a.only or list(ROWS)
        unknown = [n for n in names if n not in ROWS]
        if unknown:
            ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
        for name in names:
            save(a.results, run_row(name, ROWS[name], a, REPO / a.work))
    write_report(a.results, REPO / "docs" / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
