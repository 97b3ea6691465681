"""Fine-tuning benchmark on the real default model: LoRA / QA-LoRA on a distilled W2g64 student, the merges, adapters on
a loaded export, the memory savers. Results accumulate in docs/finetune/results.json (one key per section, each with its
commands, machine, threads, load and date) and the results block of docs/FINETUNE.md is rebuilt from them.

    python scripts/bench_finetune.py --only student   # the distilled student (qat distill, demo budget), if missing
    python scripts/bench_finetune.py --only lora      # LoRA + QA-LoRA on python-stdlib train; merges; export check
    python scripts/bench_finetune.py --only teacher   # FP / int8 / NF4 teacher perplexity
    python scripts/bench_finetune.py --only memory    # peak memory and tokens/s per memory saver (one process each)
    python scripts/bench_finetune.py --report-only    # rebuild the docs block from the stored results

Perplexity: the first --eval-tokens tokens of python-stdlib test.py.txt (the fine-tuning domain) and of WikiText-2 raw
test, windows of 512, bos once (the project's protocol).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CORPORA = "../shared/assets/corpora"
CODE_TRAIN = f"{CORPORA}/python-stdlib/train.py.txt"
CODE_TEST = f"{CORPORA}/python-stdlib/test.py.txt"
WIKI_TEST = f"{CORPORA}/wikitext-2-raw/wiki.test.raw"
WIKI_TRAIN = f"{CORPORA}/wikitext-2/valid.txt"
WORK = Path("runs") / "bench-finetune"
RESULTS = REPO / "docs" / "finetune" / "results.json"
DOC = REPO / "docs" / "FINETUNE.md"
BEGIN, END = "<!-- bench_finetune:begin -->", "<!-- bench_finetune:end -->"

# the student: `make demo`'s budget of the EfficientQAT W2g64 recipe (scripts/demo.py), without per-stage evaluation
STUDENT_CMD = ["qat", "distill", "--config", "configs/smollm2-135m/efficientqat-w2g64.yaml", "--output",
               str(WORK / "w2g64-student"), "--ptq.method", "gptq", "--ptq.calib_samples", "32", "--ptq.act_order",
               "true", "--data.num_samples", "32", "--eval.file", "null", "--stages.0.epochs", "null",
               "--stages.0.steps", "8", "--stages.0.batch_size", "2", "--stages.0.samples", "32",
               "--stages.1.epochs", "null", "--stages.1.steps", "8", "--stages.1.batch_size", "2",
               "--progress", "false", "--overwrite", "true"]


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "torch_threads": torch.get_num_threads(),
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def store(key: str, value: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[key] = value
    RESULTS.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def ppl(model, tok, file: str, tokens: int) -> float:
    from qat.eval.perplexity import evaluate_file

    return evaluate_file(model, tok, file, 512, max_tokens=tokens, batch_size=4, progress=False)["perplexity"]


# ---- student ----------------------------------------------------------------------------------------------------------

def section_student(a) -> None:
    out = Path(a.student)
    if (out / "qat_student.json").is_file():
        print(f"student {out} exists; not rebuilt")
        return
    info = machine()
    t0 = time.time()
    subprocess.run(STUDENT_CMD, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    store("student", {"command": shlex.join(STUDENT_CMD), "seconds": round(time.time() - t0, 1), **info})


# ---- LoRA, QA-LoRA, merges, export ------------------------------------------------------------------------------------

def finetune_argv(a, out: Path, *extra: str) -> list[str]:
    return ["--model", a.student, "--data", CODE_TRAIN, "--output", str(out), "--steps", str(a.steps),
            "--batch_size", str(a.batch_size), "--seq_len", "512", "--num_samples", str(a.steps * a.batch_size),
            "--optim.default_lr", str(a.lr), "--eval.file", CODE_TEST, "--eval.max_tokens", str(a.eval_tokens),
            "--eval.initial", "false", "--progress", "false", "--overwrite", "true", *extra]


def max_logit_diff(m1, m2, ids) -> dict:
    with torch.no_grad():
        x, y = m1(input_ids=ids, use_cache=False).logits, m2(input_ids=ids, use_cache=False).logits
    return {"max_abs_diff": float((x - y).abs().max()), "max_abs_logit": float(x.abs().max()),
            "bit_identical": bool(torch.equal(x, y)), "tokens": ids.numel()}


def section_lora(a) -> None:
    import qat
    from qat.data.text import pack_windows, tokenize_file
    from qat.export.command import export_student
    from qat.finetune.base import load_base
    from qat.finetune.lora import load_adapter, registered  # (before peft: quiets bitsandbytes' import log)
    from peft import LoraConfig, PeftModel
    from qat.finetune.merge import merge_adapter
    from qat.finetune.recipe import parse_args
    from qat.finetune.run import run_finetune

    info, t_start = machine(), time.time()
    work = WORK / "lora"
    base, tok, _ = load_base(a.student)
    check_ids = pack_windows(tokenize_file(CODE_TEST, tok), 512, 1024)  # 2 windows of code for logit comparisons
    res: dict = {"student": a.student, "eval_tokens": a.eval_tokens, **info,
                 "student_ppl": {"code": ppl(base, tok, CODE_TEST, a.eval_tokens),
                                 "wikitext": ppl(base, tok, WIKI_TEST, a.eval_tokens)}}
    del base
    for name, extra in (("lora", []), ("qalora", ["--lora.qalora", "true"])):
        argv = finetune_argv(a, work / name, *extra)
        recipe, opts = parse_args(argv)
        t0 = time.time()
        r = run_finetune(recipe, overwrite=opts["overwrite"], tensorboard=True)
        wall = time.time() - t0
        model = r["model"].eval()
        reloaded = load_adapter(load_base(a.student)[0], work / name)
        h = r["history"]
        res[name] = {"command": "qat finetune " + shlex.join(argv), "seconds": round(wall, 1),
                     "trainable_params": r["trainable_params"], "tokens": h[-1]["tokens"], "steps": h[-1]["steps"],
                     "train_seconds": h[-1]["seconds"],
                     "code_ppl": {"before": res["student_ppl"]["code"], "after": h[-1]["val_ppl"]},
                     "wikitext_ppl_after": ppl(model, tok, WIKI_TEST, a.eval_tokens),
                     "save_load": max_logit_diff(model, reloaded, check_ids)}
        del model, reloaded, r
        print(json.dumps({name: res[name]}, indent=1), flush=True)

    # exact merge of the QA-LoRA adapter, approximate merge of both
    adapters = {n: load_adapter(load_base(a.student)[0], work / n) for n in ("lora", "qalora")}
    res["merge"] = {}
    refine = ["--refine-steps", str(a.refine_steps), "--data", CODE_TRAIN, "--refine-samples", "16"]
    for name, adapter, mode, extra in (("exact", "qalora", "exact", []), ("approx-qalora", "qalora", "approx", []),
                                       ("approx-lora", "lora", "approx", []),
                                       ("approx-lora-refined", "lora", "approx", refine)):
        out = work / f"merged-{name}"
        t0 = time.time()
        report = merge_adapter(a.student, work / adapter, out, mode=mode, overwrite=True,
                               refine_steps=a.refine_steps if extra else 0, data=CODE_TRAIN, refine_samples=16)
        merged, _, _ = load_base(out)
        res["merge"][name] = {
            "command": f"qat merge --student {a.student} --adapter {work / adapter} --output {out} --mode {mode}"
                       + (" " + shlex.join(extra) if extra else ""),
            "seconds": round(time.time() - t0, 1), "exact_bound_ratio": report["exact_bound_ratio"],
            "spec": report["spec"], "code_ppl": ppl(merged, tok, CODE_TEST, a.eval_tokens),
            "wikitext_ppl": ppl(merged, tok, WIKI_TEST, a.eval_tokens),
            "vs_adapter": max_logit_diff(adapters[adapter], merged, check_ids)}
        if name == "exact":  # export the merged student as usual and reload it; the folded shifts d/s
            from qat.nn import quant_linears

            shift = torch.cat([m.weight_quantizer.zero_shift.abs().flatten() for m in quant_linears(merged).values()])
            res["merge"][name]["abs_zero_shift"] = {"median": float(shift.quantile(0.5)),
                                                   "p99": float(shift.quantile(0.99)), "max": float(shift.max())}
            report = export_student(out, work / "merged-exact-export", dtype="float32", overwrite=True)
            packed = qat.load_quantized(work / "merged-exact-export")
            res["merge"][name]["export"] = {"bits_per_weight": report.bits_per_weight, "file_bytes": report.file_bytes,
                                            "vs_merged_student": max_logit_diff(merged, packed, check_ids)}
        print(json.dumps({name: res["merge"][name]}, indent=1), flush=True)

    # PeftModel.from_pretrained on a loaded export (peft's documented way, custom layers registered)
    export_student(a.student, work / "student-export", dtype="float32", overwrite=True)
    config = registered(LoraConfig.from_pretrained(str(work / "lora")))
    on_export = PeftModel.from_pretrained(qat.load_quantized(work / "student-export"), str(work / "lora"),
                                          config=config)
    res["export_adapter"] = {"vs_student_adapter": max_logit_diff(adapters["lora"], on_export, check_ids),
                             "code_ppl": ppl(on_export, tok, CODE_TEST, a.eval_tokens)}
    res["seconds"] = round(time.time() - t_start, 1)
    res["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    store("lora", res)


def section_lr(a) -> None:
    """Plain LoRA at other learning rates, same budget as the lora section (which runs --lr)."""
    from qat.finetune.recipe import parse_args
    from qat.finetune.run import run_finetune

    info = machine()
    rows = json.loads(RESULTS.read_text()).get("lr", {}).get("rows", {}) if RESULTS.is_file() else {}
    for lr in a.lr_sweep.split(","):
        argv = finetune_argv(a, WORK / "lr" / lr, "--optim.default_lr", lr)
        recipe, opts = parse_args(argv)
        h = run_finetune(recipe, overwrite=True, tensorboard=False)["history"]
        rows[lr] = {"command": "qat finetune " + shlex.join(argv), "code_ppl_after": h[-1]["val_ppl"],
                    "train_seconds": h[-1]["seconds"]}
        print(lr, rows[lr], flush=True)
    store("lr", {"rows": rows, **info})


# ---- teacher precision ------------------------------------------------------------------------------------------------

def section_teacher(a) -> None:
    from qat.distill.memory import load_teacher
    from qat.models.loading import load_tokenizer

    info = machine()
    tok = load_tokenizer(a.model)
    rows = {}
    for p in ("fp", "int8", "nf4"):
        t0 = time.time()
        m = load_teacher(a.model, "cpu", p)
        rows[p] = {"wikitext_ppl": ppl(m, tok, WIKI_TEST, a.eval_tokens), "code_ppl": ppl(m, tok, CODE_TEST,
                                                                                          a.eval_tokens),
                   "footprint_mb": round(m.get_memory_footprint() / 2**20, 1), "seconds": round(time.time() - t0, 1)}
        print(p, rows[p], flush=True)
        del m
    store("teacher", {"rows": rows, "eval_tokens": a.eval_tokens, **info})


# ---- memory savers: one process per configuration ---------------------------------------------------------------------

PROBE_STEPS = 4  # optimizer steps per configuration; tokens/s over steps 2..3 (the first allocates and warms up,
#                 the last is followed by the run's final checkpoint)
MEMORY_CONFIGS = [
    # name, command (finetune | distill), extra options
    ("finetune ce", "finetune", []),
    ("finetune ce + grad checkpointing", "finetune", ["--memory.grad_checkpointing", "true"]),
    ("finetune ce + adamw8bit", "finetune", ["--optim.name", "adamw8bit"]),
    ("finetune kd, fp teacher", "finetune", ["--teacher", "{model}"]),
    ("finetune kd, int8 teacher", "finetune", ["--teacher", "{model}", "--memory.teacher", "int8"]),
    ("finetune kd, nf4 teacher", "finetune", ["--teacher", "{model}", "--memory.teacher", "nf4"]),
    ("finetune kd, all savers (nf4, checkpointing, adamw8bit)", "finetune",
     ["--teacher", "{model}", "--memory.teacher", "nf4", "--memory.grad_checkpointing", "true", "--optim.name",
      "adamw8bit"]),
    ("finetune ce + paged_adamw8bit", "finetune", ["--optim.name", "paged_adamw8bit"]),
    ("distill stage 2", "distill", []),
    ("distill stage 2 + grad checkpointing", "distill", ["--memory.grad_checkpointing", "true"]),
    ("distill stage 2 + adamw8bit", "distill", ["--stages.0.optim.name", "adamw8bit"]),
    ("distill stage 2 + int8 teacher", "distill", ["--memory.teacher", "int8"]),
    ("distill stage 2 + nf4 teacher", "distill", ["--memory.teacher", "nf4"]),
    ("distill stage 2, all savers (nf4, checkpointing, adamw8bit)", "distill",
     ["--memory.teacher", "nf4", "--memory.grad_checkpointing", "true", "--stages.0.optim.name", "adamw8bit"]),
    ("distill stage 2 + paged_adamw8bit", "distill", ["--stages.0.optim.name", "paged_adamw8bit"]),
]
# stage 2 as in the LC-QAT recipe (full QAT: latent weights + quantizer parameters, KL to the teacher)
E2E_STAGE = ("[{kind: e2e, name: e2e, steps: %d, batch_size: %d, train: [latent, wq], loss: {kind: kl}, "
             "optim: {lr: {latent: 1.0e-4, wq: 1.0e-3}}}]")


def probe_argv(a, kind: str, extra: list[str], out: Path) -> list[str]:
    extra = [x.format(model=a.model) for x in extra]
    if kind == "finetune":
        return ["--model", a.student, "--data", CODE_TRAIN, "--output", str(out), "--steps", str(PROBE_STEPS),
                "--batch_size", str(a.batch_size), "--seq_len", "512", "--num_samples",
                str(PROBE_STEPS * a.batch_size), "--progress", "false", "--overwrite", "true",
                "--checkpoint_every", "1000", *extra]
    return ["--config", "configs/smollm2-135m/efficientqat-w2g64.yaml", "--model", a.model, "--student", a.student,
            "--output", str(out), "--data.num_samples", str(PROBE_STEPS * a.batch_size), "--eval.file", "null",
            "--stages", E2E_STAGE % (PROBE_STEPS, a.batch_size), "--checkpoint_every", "1000", "--progress", "false",
            "--overwrite", "true", *extra]


class RssSampler:
    """Peak resident memory of this process while training runs (sampled every 20 ms from /proc/self/statm)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        return int(open("/proc/self/statm").read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.02)

    def start(self):
        self.at_start = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def stop(self):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def run_probe(a, kind: str, extra: list[str]) -> dict:
    """One configuration, in this process: peak RSS during the training steps and tokens/s after the first step."""
    from lightning.pytorch.callbacks import Callback

    sampler, times = RssSampler(), []

    class Probe(Callback):
        def on_train_start(self, trainer, module):
            sampler.start()

        def on_train_batch_start(self, trainer, module, *args):
            times.append(time.perf_counter())

        def on_train_end(self, trainer, module):
            sampler.stop()

    out = WORK / "probe" / kind
    argv = probe_argv(a, kind, extra, out)
    if kind == "finetune":
        from qat.finetune.recipe import parse_args
        from qat.finetune.run import run_finetune as fit
    else:
        from qat.distill.recipe_cli import parse_args
        from qat.distill.run import run_distill as fit
    recipe, opts = parse_args(argv)
    fit(recipe, overwrite=True, callbacks=[Probe()], tensorboard=False)
    tokens = a.batch_size * 512
    steps = len(times) - 2  # intervals between the starts of steps 2..N: steps 2..N-1
    times = times[1:]
    return {"command": f"qat {kind} " + shlex.join(argv), "peak_rss_mb": round(sampler.peak / 2**20, 1),
            "rss_at_train_start_mb": round(sampler.at_start / 2**20, 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "tokens_per_s": round(steps * tokens / (times[-1] - times[0]), 1), "timed_steps": steps,
            "tokens_per_step": tokens}


def section_memory(a) -> None:
    info = machine()
    rows = {}
    exact = [c for c in MEMORY_CONFIGS if c[0] == a.config]  # a full name selects that one configuration alone
    for name, kind, extra in exact or [c for c in MEMORY_CONFIGS if not a.config or a.config in c[0]]:
        when = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
        cmd = [sys.executable, __file__, "--probe", json.dumps([kind, extra]), "--student", a.student, "--model",
               a.model, "--batch-size", str(a.probe_batch_size)]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode == 0 and lines:
            rows[name] = json.loads(lines[-1])
        else:  # a saver that does not run here: its one-line error is the result
            err = [ln for ln in p.stderr.splitlines() if ln.strip()]
            msg = err[-1] if err else f"exit status {p.returncode}"
            head, _, rest = msg.partition(": ")
            rows[name] = {"not_run": rest if head.endswith("Error") else msg}  # the error line, without its class
        rows[name].update(when)
        print(name, rows[name], flush=True)
    old = json.loads(RESULTS.read_text()).get("memory", {}) if RESULTS.is_file() and a.config else {}
    store("memory", {**old, **info, "rows": {**old.get("rows", {}), **rows}, "device": "cpu",
                     "probe_steps": PROBE_STEPS, "batch_size": a.probe_batch_size})


# ---- report -----------------------------------------------------------------------------------------------------------

def fmt(x, nd=2) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def report() -> str:
    d = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    out = ["_Written by `scripts/bench_finetune.py` from docs/finetune/results.json; every number is a measurement of "
           "the command shown with it._", ""]
    if "student" in d:
        s = d["student"]
        out += [f"**Student** (W2g64, EfficientQAT recipe at `make demo`'s budget, {s['seconds'] / 60:.0f} min, "
                f"{s['date']}): `{s['command']}`" + (f" ({s['note']})" if s.get("note") else ""), ""]
    if "lora" in d:
        r = d["lora"]
        out += [f"**LoRA on the code corpus** — {r['date']}, {r['cpu']} ({r['logical_cpus']} logical CPUs, no GPU), "
                f"{r['torch_threads']} torch thread(s), load average {r['load_avg_1m_at_start']} at the start "
                f"(shared machine). Perplexity on the first {r['eval_tokens']:,} tokens of each test text "
                "(windows of 512).", "",
                "| model | trainable params | training tokens | train wall | python test ppl | WikiText-2 ppl |",
                "| --- | ---: | ---: | ---: | ---: | ---: |",
                f"| student (W2g64, distilled) | – | – | – | {fmt(r['student_ppl']['code'])} | "
                f"{fmt(r['student_ppl']['wikitext'])} |"]
        for n, label in (("lora", "+ LoRA r=16"), ("qalora", "+ QA-LoRA r=16 (g64 pooling)")):
            x = r[n]
            out.append(f"| {label} | {x['trainable_params']:,} | {x['tokens']:,} ({x['steps']} steps) | "
                       f"{x['train_seconds'] / 60:.1f} min | {fmt(x['code_ppl']['after'])} | "
                       f"{fmt(x['wikitext_ppl_after'])} |")
        for n, label in (("exact", "QA-LoRA merged exactly (`--mode exact`, W2g64-fz)"),
                         ("approx-qalora", "QA-LoRA merged approximately (`--mode approx`)"),
                         ("approx-lora", "LoRA merged approximately (`--mode approx`)"),
                         ("approx-lora-refined", "LoRA merged approximately + stage-1 refine")):
            m = r["merge"][n]
            out.append(f"| {label} | – | – | – | {fmt(m['code_ppl'])} | {fmt(m['wikitext_ppl'])} |")
        out += ["", "Commands:", ""] + [f"- `{r[n]['command']}`" for n in ("lora", "qalora")] + \
            [f"- `{m['command'].strip()}`" for m in r["merge"].values()] + [""]
        ex = r["merge"]["exact"]
        out += ["Checks on 2 windows (1,024 tokens) of python test text:", "",
                "| comparison | max abs logit diff | max abs logit | bit-identical |", "| --- | ---: | ---: | :---: |"]
        rows = [("LoRA adapter saved -> loaded vs in memory", r["lora"]["save_load"]),
                ("QA-LoRA adapter saved -> loaded vs in memory", r["qalora"]["save_load"]),
                ("`PeftModel.from_pretrained` on `qat.load_quantized(export)` vs student + adapter",
                 r["export_adapter"]["vs_student_adapter"]),
                ("exact merge vs QA-LoRA adapter model", ex["vs_adapter"]),
                ("exact merge, exported (float32) and reloaded vs merged student", ex["export"]["vs_merged_student"]),
                ("approximate merge vs QA-LoRA adapter model", r["merge"]["approx-qalora"]["vs_adapter"]),
                ("approximate merge vs LoRA adapter model", r["merge"]["approx-lora"]["vs_adapter"]),
                ("approximate merge + refine vs LoRA adapter model", r["merge"]["approx-lora-refined"]["vs_adapter"])]
        out += [f"| {k} | {v['max_abs_diff']:.3g} | {v['max_abs_logit']:.3g} | {'yes' if v['bit_identical'] else 'no'}"
                " |" for k, v in rows]
        out += ["", f"The exact merge's weights stayed within the derived float32 bound (worst element at "
                f"{ex['exact_bound_ratio']:.5f} of it); the merged export stores {ex['export']['bits_per_weight']:.3f} "
                "bits/weight (float32 zero points).", ""]
    if "lr" in d and "lora" in d:
        rows = {**{k: v["code_ppl_after"] for k, v in d["lr"]["rows"].items()},
                f"{d['lora']['lora']['command'].split('--optim.default_lr ')[1].split()[0]}":
                d["lora"]["lora"]["code_ppl"]["after"]}
        out += ["**Learning rate** (plain LoRA, same budget and data; python test perplexity after): " +
                ", ".join(f"{k}: {v:,.2f}" for k, v in sorted(rows.items(), key=lambda kv: float(kv[0]))) +
                f" ({d['lr']['date']}).", ""]
    if "teacher" in d:
        t = d["teacher"]
        out += [f"**Teacher precision** — {t['date']}, same machine, {t['torch_threads']} thread(s), load average "
                f"{t['load_avg_1m_at_start']} at the start; bitsandbytes' int8 / NF4 layers on the CPU; first "
                f"{t['eval_tokens']:,} tokens:", "", "| teacher | WikiText-2 ppl | python test ppl | footprint |",
                "| --- | ---: | ---: | ---: |"]
        out += [f"| {k} | {fmt(v['wikitext_ppl'])} | {fmt(v['code_ppl'])} | {v['footprint_mb']:.0f} MiB |"
                for k, v in t["rows"].items()]
        out += [""]
    if "memory" in d:
        m = d["memory"]
        loads = [v["load_avg_1m_at_start"] for v in m["rows"].values() if "load_avg_1m_at_start" in v]
        load = f"{min(loads)}–{max(loads)}" if loads else m["load_avg_1m_at_start"]
        dates = sorted(v["date"] for v in m["rows"].values() if "date" in v)
        out += [f"**Memory savers** — {dates[0] + ' to ' + dates[-1][11:] if dates else m['date']}, device: CPU ({m['cpu']}, no GPU lent), {m['torch_threads']} "
                f"thread(s), load average {load} at the start of the configurations (a machine shared with other "
                f"jobs: tokens/s compare only roughly); {m['probe_steps']} optimizer "
                f"steps of {m['batch_size']} x 512 tokens per configuration, each in its own process. Peak RSS is the "
                "process's resident memory sampled every 20 ms while the steps run (models, activations, optimizer "
                "state); tokens/s over the steps between the first and the last (which allocate and checkpoint).", "",
                "| configuration | peak RSS (MiB) | tokens/s |", "| --- | ---: | ---: |"]
        order = {c[0]: i for i, c in enumerate(MEMORY_CONFIGS)}
        for k, v in sorted(m["rows"].items(), key=lambda kv: order.get(kv[0], len(order))):
            if "not_run" in v:
                out.append(f"| {k} | not run: {v['not_run']} | – |")
            else:
                out.append(f"| {k} | {v['peak_rss_mb']:,.0f} | {v['tokens_per_s']:.1f} |")
        missing = [c[0] for c in MEMORY_CONFIGS if c[0] not in m["rows"]]
        if missing:
            out += ["", "Not measured yet (`--only memory --config NAME` adds a row): " + "; ".join(missing) + "."]
        out += ["", "Commands: `" + "`, `".join(dict.fromkeys(v["command"].split(" --")[0] for v in m["rows"].values()
                                                              if "command" in v)) + "` with the options in "
                "docs/finetune/results.json.", ""]
    return "\n".join(out)


def write_doc() -> None:
    text = DOC.read_text()
    i, j = text.index(BEGIN), text.index(END)
    DOC.write_text(text[: i + len(BEGIN)] + "\n" + report() + "\n" + text[j:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=".cache/smollm2-135m", help="the FP model (teacher)")
    ap.add_argument("--student", default=str(WORK / "w2g64-student"))
    ap.add_argument("--only", choices=["student", "lora", "lr", "teacher", "memory"], action="append")
    ap.add_argument("--lr-sweep", default="2e-4", help="lr section: comma-separated learning rates")
    ap.add_argument("--config", default=None, help="memory: only the configuration of this name, or those whose name contains "
                    "it")
    ap.add_argument("--steps", type=int, default=24, help="LoRA optimizer steps")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--probe-batch-size", type=int, default=1, help="memory section: sequences of 512 per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--refine-steps", type=int, default=8, help="approximate merge + refine: stage-1 steps per block")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.chdir(REPO)
    if a.probe:
        kind, extra = json.loads(a.probe)
        print(json.dumps(run_probe(a, kind, extra)), flush=True)
        return 0
    if not a.report_only:
        for section in a.only or ["student", "lora", "lr", "teacher", "memory"]:
            {"student": section_student, "lora": section_lora, "lr": section_lr, "teacher": section_teacher,
             "memory": section_memory}[section](a)
    write_doc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
