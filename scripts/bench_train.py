"""Training-step speed of the trainer against a plain FP training step, measured interleaved (docs/TRAIN_SPEED.md).

Paths, each one optimizer step of the real stage code (qat/distill/e2e.py, blockwise.py: AdamW, clipping, schedule):
    fp         the FP model, next-token CE, every parameter trains                         (the 1.00x reference)
    qat        the student, next-token CE, latent weights + quantizer parameters train     (goal <= 1.08x uniform,
                                                                                             <= 1.3x W(1+1) / VQ)
    kd         teacher forward + student, KL, quantizer parameters only (uniform: frozen codes, as E2E-QP)
    kd_latent  the same with the latent weights training too                               (goal <= 1.45x)
    block      stage 1, one block-wise step of block 0 (latent + quantizer parameters, token_mse on cached
               teacher targets); reported as tokens/s against the full-model FP step     (goal >= 25x)
for uniform W2g64 and W4g64, W(1+1) g64, VQ 2-bit and W4g64A4 (per-token 4-bit activations running). Students are
RTN-initialised (PTQ quality does not change the step time; VQ rounds in z-space instead of its exhaustive
nearest-codeword search) and kept in runs/bench-train/students/ for the next run.

Noise: the machine is shared, so every configuration is stepped once per round, round after round in a shuffled
order (round-robin), and each step is divided by the FP step of the same round; the tables give the median of these
per-round ratios, which stays put when the load drifts between rounds. A configuration's first visit is a warm-up
(untimed; its tensor memory is measured then, with torch's MemTracker: parameters, gradients, optimizer state,
activations and temporaries at the step's peak). Optimizer states are created before each timed step, untimed, so
only one configuration's optimizer lives at a time.

Variants put the speed levers of qat/speed.py side by side in the same interleaved run (NAME:lever=0,lever=1,...;
`threads=N` sets torch's thread count for that variant), so each lever's before/after is measured under one load.

    python scripts/bench_train.py                                      # default model, batch 2x512 and 4x512
    python scripts/bench_train.py --variants default plain-quant:fused_quant=0 --paths fp qat --batch 2
    python scripts/bench_train.py --quick --out /tmp/bt                 # tiny random model, seconds (CI smoke test)

Results: docs/train_speed/<label>.json, a section <label> in docs/TRAIN_SPEED.md (table + profile of the slowest path)
and docs/train_speed/<label>.png.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TRAIN_TEXT = REPO.parent / "shared" / "assets" / "corpora" / "wikitext-2" / "valid.txt"

FORMATS = {  # name -> quant spec (uniform W4A4 with the activations running in every path)
    "W2g64": {"weight": {"bits": 2, "group_size": 64}},
    "W4g64": {"weight": {"bits": 4, "group_size": 64}},
    "W(1+1)": {"weight": {"format": "binary11", "group_size": 64}},
    "VQ2": {"weight": {"format": "vq", "bits": 2, "vq_dim": 4}},
    "W4A4": {"weight": {"bits": 4, "group_size": 64}, "act": {"bits": 4}},
}
PATHS = ("fp", "qat", "kd", "kd_latent", "block")
GOALS = {  # path -> (format names or None for all, goal, "max" = ratio at most / "min" = speed-up at least)
    "qat": [(("W2g64", "W4g64", "W4A4"), 1.08, "max"), (("W(1+1)", "VQ2"), 1.3, "max")],
    "kd_latent": [(None, 1.45, "max")],
    "block": [(None, 25.0, "min")],
}
BEGIN, END = "<!-- bench_train:{} begin -->", "<!-- bench_train:{} end -->"


# ---- models and stages ---------------------------------------------------------------------------------------------
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def train_windows(model_dir: str | None, n: int, seq_len: int, vocab: int) -> torch.Tensor:
    """n windows of real text (WikiText-2 valid) when the tokenizer and corpus are there, else random ids."""
    if model_dir is not None and TRAIN_TEXT.is_file():
        from qat.data.text import sample_windows, tokenize_file
        from qat.models.loading import load_tokenizer

        return sample_windows(tokenize_file(TRAIN_TEXT, load_tokenizer(model_dir)), n, seq_len, seed=0)
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))


def path_train(path: str, spec) -> tuple[list[str], bool]:
    """(train selectors, freeze_codes) of a path for a student of `spec`."""
    act = ["act"] if spec.act.enabled else []
    if path == "fp":
        return ["re:."], False
    if path == "kd":
        return ["wq", *act], spec.weight.format == "uniform" and not spec.weight.lwc
    return ["latent", "wq", *act], False


class Config:
    """One (variant, path, format, batch) cell: builds its stage on each visit and times one step."""

    def __init__(self, variant: dict, path: str, fmt: str | None, batch: int):
        self.variant, self.path, self.fmt, self.batch = variant, path, fmt, batch
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.memory: dict | None = None

    @property
    def key(self) -> str:
        return f"{self.variant['name']}|{self.path}|{self.fmt or 'FP'}|{self.batch}"

    def make_stage(self, env: dict):
        from qat.distill.params import snapshot_trainable
        from qat.distill.recipe import LossSpec, OptimSpec, StageSpec
        from qat.distill.stage import DistillContext
        from qat.models import get_adapter

        student = env["fp_model"] if self.path == "fp" else env["students"][self.fmt]
        spec = env["specs"][self.fmt] if self.fmt else None
        train, freeze = path_train(self.path, spec) if spec else (["re:."], False)
        kind = "blockwise" if self.path == "block" else "e2e"
        loss = {"fp": "ce", "qat": "ce", "block": "token_mse"}.get(self.path, "kl")
        lr = 0.0 if self.path == "fp" else 1e-5  # lr 0: the FP model doubles as the teacher and must not move
        sspec = StageSpec(kind=kind, name=self.path, train=train, loss=LossSpec(kind=loss),
                          optim=OptimSpec(default_lr=lr), steps=10**6, batch_size=self.batch,
                          samples=self.batch if kind == "blockwise" else None, freeze_codes=freeze,
                          act_quant=bool(spec and spec.act.enabled))
        sspec.validate(0)
        who = self.fmt or "FP"  # trainable-by-design map, from the model as first built (students are reloaded)
        if who not in env["designed"]:
            env["designed"][who] = snapshot_trainable(student)
        from qat.data.module import StagePlan, StepPlan
        from qat.distill.blockwise import make_units, make_windows

        n = max(self.batch, 1)
        adapter = get_adapter(student)
        windows = len(make_windows(len(make_units(len(adapter.blocks(student)), sspec.units)), sspec.window,
                                   sspec.overlap)) if kind == "blockwise" else 1
        ctx = DistillContext(student=student, teacher=env["fp_model"], adapter=adapter,
                             spec=spec or env["fp_spec"], train_ids=env["ids"][:n],
                             device=torch.device("cpu"), run_dir=env["run_dir"], seed=0,
                             designed=env["designed"][who], plan=StepPlan([StagePlan(0, n, n, windows, 10**6, 0)]))
        from qat.distill.stage import stage_kind

        return stage_kind(kind).build(ctx, sspec, 0)


def open_stage(cfg: Config, env: dict):
    """The stage, begun, with its optimizer state allocated (a zero-gradient step: AdamW moves nothing)."""
    from qat.distill.params import quantizer_train_mode

    stage = cfg.make_stage(env)
    quantizer_train_mode(stage.ctx.student)
    stage.begin(None)
    for p in stage.params:
        p.grad = torch.zeros_like(p)
    stage.opt.step()
    stage.opt.zero_grad(set_to_none=True)
    return stage


def train_step(stage) -> dict:
    """One optimizer step on every row of the stage's pool (one batch)."""
    return stage.train_step(torch.arange(len(stage.ctx.train_ids)))


def close_stage(stage) -> None:
    if stage.frozen is not None:  # leave the latent weights as they were (no bake)
        stage.frozen.detach()
        stage.frozen = None
    if hasattr(stage, "S"):
        stage.end()
    else:
        stage.release()


def _storages(tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            yield t.untyped_storage()


class PeakTensorMemory:
    """Bytes of tensor storage alive at once during a block of code: the storages held when it starts plus every one
    an op creates inside it (a TorchDispatchMode sees each op's outputs), each dropped when freed; `peak` is the max.
    (torch's MemTracker does this per module but needs every parameter to require grad, which a frozen teacher
    does not.)"""

    def __init__(self, held):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                from torch.utils._pytree import tree_leaves

                tracker._add(_storages(tree_leaves(out)))
                return out

        self.mode = _Mode()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        self._refs: dict[int, object] = {}
        self._add(_storages(held))

    def _add(self, storages) -> None:
        import weakref

        for st in storages:
            key = st._cdata
            if key in self.live or st.nbytes() == 0:
                continue
            self.live[key] = st.nbytes()
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
            self._refs[key] = weakref.ref(st, lambda _r, key=key: self._free(key))

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)
        self._refs.pop(key, None)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def tensor_peak_mb(stage) -> float:
    """Peak tensor memory of one step in MiB: student + teacher parameters and buffers, gradients, optimizer state,
    cached activations, and everything the step allocates."""
    ctx = stage.ctx
    held = [*ctx.student.parameters(), *ctx.student.buffers(), *ctx.teacher.parameters(), *ctx.teacher.buffers()]
    held += [t for st in stage.opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    for store in stage.activation_stores():
        if store.data is not None:  # (None once closed)
            held.append(store.data)
    with PeakTensorMemory(held) as mem:
        train_step(stage)
    return round(mem.peak / 2**20, 1)


# ---- the interleaved run -------------------------------------------------------------------------------------------
def parse_variant(text: str) -> dict:
    """'name' or 'name:lever=0,threads=1' -> {"name", "levers": {...}, "threads": int | None}."""
    name, _, rest = text.partition(":")
    out = {"name": name, "levers": {}, "threads": None}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k == "threads":
            out["threads"] = int(v)
        else:
            out["levers"][k] = bool(int(v))
    return out


def lever_context(variant: dict):
    if not variant["levers"]:
        from contextlib import nullcontext

        return nullcontext()
    from qat.speed import levers

    return levers(**variant["levers"])


def visit(cfg: Config, env: dict, timed: bool) -> None:
    threads = cfg.variant["threads"] or env["threads"]
    torch.set_num_threads(threads)
    with lever_context(cfg.variant):
        stage = open_stage(cfg, env)
        try:
            if not timed:
                train_step(stage)  # warm-up (first visit only)
                if env["memory"]:
                    cfg.memory = tensor_peak_mb(stage)
                return
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(stage)
            cfg.times.append(time.perf_counter() - t0)
            cfg.cpu.append(time.process_time() - c0)
        finally:
            close_stage(stage)
    torch.set_num_threads(env["threads"])


def profile_step(cfg: Config, env: dict, rows: int = 22) -> str:
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(cfg.variant["threads"] or env["threads"])
    with lever_context(cfg.variant):
        stage = open_stage(cfg, env)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(stage)
        finally:
            close_stage(stage)
    torch.set_num_threads(env["threads"])
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


class Students:
    """The RTN students, one resident at a time (each is a full model copy; the shared machine has little memory):
    built once and kept in <work>/students/, then loaded when a configuration needs another format."""

    def __init__(self, fp_model, model_dir, specs: dict, work: Path):
        self.fp_model, self.model_dir, self.specs, self.work = fp_model, model_dir, specs, work
        self.name, self.model = None, None
        self.files: dict[str, Path] = {}
        self.memory: dict[str, torch.nn.Module] = {}  # --quick: tiny models stay in memory
        for name in specs:
            self._build(name)

    def _build(self, name: str) -> None:
        from qat.nn import quantize_model

        spec = self.specs[name]
        tag = hashlib.sha1(json.dumps([str(self.model_dir), spec.to_dict()], sort_keys=True).encode()).hexdigest()[:12]
        path = self.work / "students" / f"{tag}.pt"
        self.files[name] = path
        if self.model_dir is not None and path.is_file():
            return
        t = time.perf_counter()
        s = copy.deepcopy(self.fp_model)
        # VQ: nearest codewords by rounding in z-space (exact while A is orthogonal, as at init) instead of the
        # exhaustive search over 4^4 codewords, which takes an hour on a loaded 2-core CPU
        import qat.quantizers.vq as vq

        exhaustive, vq._MAX_EXHAUSTIVE = vq._MAX_EXHAUSTIVE, 0
        try:
            quantize_model(s, spec)
        finally:
            vq._MAX_EXHAUSTIVE = exhaustive
        if self.model_dir is None:
            self.memory[name] = s
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(s.state_dict(), path)
        print(f"[student {name}: built in {time.perf_counter() - t:.1f}s]", file=sys.stderr, flush=True)

    def __getitem__(self, name: str):
        if name in self.memory:
            return self.memory[name]
        if self.name != name:
            from qat.nn import quantize_model

            self.name, self.model = None, None  # free the resident one first
            s = copy.deepcopy(self.fp_model)
            quantize_model(s, self.specs[name], init=False)
            s.load_state_dict(torch.load(self.files[name], weights_only=True))
            self.name, self.model = name, s
        return self.model


def build_env(args) -> dict:
    from qat.config import QuantSpec

    if args.quick:
        fp_model, model_dir = tiny_llama(), None
    else:
        from qat.models.loading import load_fp_model

        fp_model, model_dir = load_fp_model(args.model), args.model
    specs = {}
    for name in args.formats:
        d = copy.deepcopy(FORMATS[name])
        if args.quick and d["weight"].get("format", "uniform") != "vq":  # the tiny model's widths are 128 / 256
            d["weight"]["group_size"] = 32
        specs[name] = QuantSpec.from_dict(d)
    work = Path(args.out or (REPO / "runs" / "bench-train"))
    run_dir = work / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return {"fp_model": fp_model, "students": Students(fp_model, model_dir, specs, work), "specs": specs,
            "fp_spec": QuantSpec(),
            "ids": train_windows(model_dir, max(args.batch), args.seq_len, fp_model.config.vocab_size),
            "run_dir": run_dir, "designed": {}, "threads": args.threads, "memory": not args.no_memory}


def round_order(configs: list, rng: random.Random) -> list:
    """A shuffled round that visits each format's configurations together (one student load per format)."""
    groups: dict = {}
    for c in configs:
        groups.setdefault(c.fmt, []).append(c)
    keys = list(groups)
    rng.shuffle(keys)
    order = []
    for k in keys:
        rng.shuffle(groups[k])
        order += groups[k]
    return order


def run(args) -> dict:
    env = build_env(args)
    variants = [parse_variant(v) for v in args.variants]
    configs = []
    for var in variants:
        for b in args.batch:
            for path in args.paths:
                for fmt in ([None] if path == "fp" else args.formats):
                    configs.append(Config(var, path, fmt, b))
    if not any(c.path == "fp" for c in configs):
        raise SystemExit("bench_train: --paths must include fp (every ratio is taken against it)")
    load = [os.getloadavg()]
    t_start = time.time()
    rng = random.Random(0)
    for c in round_order(configs, rng):
        visit(c, env, timed=False)
        print(f"[warm-up {c.key}]", file=sys.stderr, flush=True)
    for r in range(args.rounds):
        for c in round_order(configs, rng):
            visit(c, env, timed=True)
        load.append(os.getloadavg())
        print(f"[round {r + 1}/{args.rounds} done, {time.time() - t_start:.0f}s, load {load[-1][0]:.1f}]",
              file=sys.stderr, flush=True)
    fp = {(c.variant["name"], c.batch): c for c in configs if c.path == "fp"}
    rows = []
    for c in configs:
        ref = fp[(c.variant["name"], c.batch)]
        ratios = [t / f for t, f in zip(c.times, ref.times)]
        cpu_ratios = [t / f for t, f in zip(c.cpu, ref.cpu)]
        med = statistics.median(c.times)
        rows.append({
            "variant": c.variant["name"], "levers": c.variant["levers"], "threads": c.variant["threads"] or args.threads,
            "path": c.path, "format": c.fmt or "FP", "batch": c.batch, "tokens": c.batch * args.seq_len,
            "median_s": round(med, 4), "tokens_per_s": round(c.batch * args.seq_len / med, 1),
            "ratio": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3), "cpu_ratio": round(statistics.median(cpu_ratios), 3),
            "speedup": round(statistics.median([f / t for t, f in zip(c.times, ref.times)]), 2),
            "times_s": [round(t, 4) for t in c.times], "memory_mib": c.memory})
    profile = None
    if args.profile:
        slow = max((c for c in configs if c.path != "fp" and c.path != "block"
                    and args.profile_variant in (None, c.variant["name"])),
                   key=lambda c: statistics.median([t / f for t, f in zip(c.times, fp[(c.variant["name"], c.batch)]
                                                                          .times)]), default=None)
        if slow is not None:
            print(f"[profiling {slow.key}]", file=sys.stderr, flush=True)
            profile = {"config": slow.key, "table": profile_step(slow, env)}
    return {
        "label": args.label,
        "command": "python scripts/bench_train.py " + shlex.join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
                   f"{_cpu_model()}",
        "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "seq_len": args.seq_len,
        "model": "tiny random Llama (--quick)" if args.quick else args.model,
        "loadavg_1min": [round(x[0], 1) for x in load], "wall_s": round(time.time() - t_start),
        "rows": rows, "profile": profile,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# ---- report --------------------------------------------------------------------------------------------------------
def goal_for(path: str, fmt: str):
    for fmts, goal, kind in GOALS.get(path, []):
        if fmts is None or fmt in fmts:
            return goal, kind
    return None


def markdown(res: dict) -> str:
    load = res["loadavg_1min"]
    lines = [
        f"Measured {res['date']} by `{res['command']}` on {res['model']} ({res['machine']}, torch {res['torch']}, "
        f"{res['threads']} threads unless the variant says otherwise, fp32, {res['rounds']} interleaved rounds; "
        f"1-min load average {min(load):.1f}-{max(load):.1f} during the run, {res['wall_s']} s).",
        "",
        "| variant | batch | path | format | median step (s) | tokens/s | x FP step (median, range) | x FP (CPU time) "
        "| goal | peak tensor MiB |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in res["rows"]:
        g = goal_for(r["path"], r["format"])
        if r["path"] == "block":
            ratio = f"{r['speedup']:.1f}x tokens/s"
            goal = "" if g is None else f">= {g[0]:g}x: {'met' if r['speedup'] >= g[0] else 'not met'}"
        else:
            ratio = f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
            goal = "" if g is None else f"<= {g[0]:g}: {'met' if r['ratio'] <= g[0] else 'not met'}"
        mem = f"{r['memory_mib']:,.0f}" if r.get("memory_mib") else "—"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['path']} | {r['format']} | {r['median_s']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {ratio} | {r['cpu_ratio']:.2f} | {goal} | {mem} |")
    if res.get("profile"):
        lines += ["", f"Profile of one step of the slowest path ({res['profile']['config']}), torch.profiler, "
                      "sorted by self CPU time:", "", "```", res["profile"]["table"].rstrip(), "```"]
    if any(r["path"] not in ("fp", "block") for r in res["rows"]):
        lines += ["", f"![step time / FP step](train_speed/{res['label']}.png)"]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    if not any(r["path"] not in ("fp", "block") for r in res["rows"]):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["path"] not in ("fp", "block")]
    batches = sorted({r["batch"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.2), squeeze=False)
    for ax, b in zip(axes[0], batches):
        sel = [r for r in rows if r["batch"] == b]
        labels = list(dict.fromkeys(f"{r['path']}\n{r['format']}" for r in sel))
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            vals = {f"{r['path']}\n{r['format']}": r["ratio"] for r in sel if r["variant"] == v}
            ax.bar([j + i * width for j in range(len(labels))], [vals.get(lab, 0) for lab in labels], width,
                   label=v)
        for y, txt in ((1.0, "FP step"), (1.08, "1.08"), (1.3, "1.3"), (1.45, "1.45")):
            ax.axhline(y, color="grey", lw=0.8, ls="-" if y == 1 else "--")
            ax.text(len(labels) - 0.5, y, txt, fontsize=7, va="bottom", ha="right", color="grey")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, fontsize=6.5)
        ax.set_ylabel("step time / FP step (median of rounds)")
        ax.set_title(f"batch {b} x {res['seq_len']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"bench_train {res['label']} ({res['date']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_section(doc: Path, label: str, body: str) -> None:
    """Replace (or append) the generated section `label` of doc, leaving the hand-written text alone."""
    text = doc.read_text() if doc.is_file() else "# Training speed\n"
    begin, end = BEGIN.format(label), END.format(label)
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/smollm2-135m")
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="default: all (torch's default)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--variants", nargs="+", default=["default"],
                    help="NAME[:lever=0|1,...,threads=N] (levers: qat/speed.py); each is measured interleaved")
    ap.add_argument("--label", default="current", help="results go to docs/train_speed/<label>.* and a section")
    ap.add_argument("--out", default=None, help="write results here instead of docs/ (the quick mode's default: runs/)")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                    help="profile one step of the slowest path (default: on)")
    ap.add_argument("--profile-variant", default=None,
                    help="profile the slowest path of this variant only (default: the slowest of all variants)")
    ap.add_argument("--no-memory", action="store_true", help="skip the MemTracker pass on the warm-up step")
    ap.add_argument("--quick", action="store_true",
                    help="tiny random Llama, seq 32, batch 2, 2 rounds: a smoke test of the whole script")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq_len, args.batch, args.rounds = min(args.seq_len, 32), [2], min(args.rounds, 2)
        args.out = args.out or str(REPO / "runs" / "bench-train-quick")
    torch.set_num_threads(args.threads)
    res = run(args)
    out = Path(args.out) if args.out else DOCS
    results = out / "train_speed" / f"{args.label}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / "train_speed" / f"{args.label}.png")
    body = markdown(res)
    write_section(out / "TRAIN_SPEED.md", args.label, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
