"""Stage-1 and stage-2 throughput and peak memory of `qat distill` on 1 vs 2 processes (CPU, gloo), on the default
model; and the cost of averaging a window's gradients explicitly (our path) against wrapping the window in DDP.

    python scripts/bench_scaling.py [--model .cache/smollm2-135m] [--procs 1 2] [--only runs|allreduce]

Runs: the EfficientQAT W2g64 recipe (configs/smollm2-135m/efficientqat-w2g64.yaml) cut to a CPU budget (RTN init,
16 windows of 256 tokens, stage 1: 2 steps per block, stage 2: 6 steps, global batch 4, no evaluation), launched with
`qat distill --devices N` (Lightning starts the processes), OMP_NUM_THREADS=1 per process. Per stage: the median of
the per-step tokens/s that the run logs to TensorBoard (global tokens: every process's rows), the peak resident
memory of process 0 (ru_maxrss), and the stage's wall time from the history.

Gradient averaging: 2 gloo processes; for one SmolLM2 block (its latent weights + scales + zero points, what a
block-wise window trains), the time of Dist.mean_ (bucketed all-reduce, once per step) and of building
DistributedDataParallel around the block (what re-wrapping per window would cost, once per window), median of 5.

Results: docs/scaling/bench.json (read by docs/SCALING.md). The machine, threads and load are recorded with them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "scaling" / "bench.json"
RECIPE = "configs/smollm2-135m/efficientqat-w2g64.yaml"
CUT = ["--ptq.method", "rtn", "--data.num_samples", "16", "--data.seq_len", "256", "--eval.file", "null",
       "--stages.0.samples", "16", "--stages.0.epochs", "null", "--stages.0.steps", "2", "--stages.0.batch_size", "4",
       "--stages.1.epochs", "null", "--stages.1.steps", "6", "--stages.1.batch_size", "4", "--checkpoint_every", "1000",
       "--progress", "false"]


def _scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def bench_run(model: str, procs: int, work: Path) -> dict:
    out = work / f"p{procs}"
    cmd = [str(Path(sys.executable).with_name("qat")), "distill", "--config", RECIPE, "--model", model,
           "--output", str(out), "--overwrite", "true", "--devices", str(procs), *CUT]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"run failed:\n{p.stderr[-3000:]}")
    wall = time.time() - t0
    hist = json.loads((out / "distill_history.json").read_text())
    tb = Path(str(out) + ".run") / "tb"
    tps, mem = _scalars(tb, "train/tokens_per_s"), _scalars(tb, "train/peak_memory_mb")
    stages, first = {}, 1
    for h in hist[1:]:
        steps = range(first, first + h["steps"])
        first += h["steps"]
        stages[h["stage"]] = {"tokens_per_s": round(statistics.median(tps[s] for s in steps), 1),
                              "peak_rss_mb_process0": round(max(mem[s] for s in steps)),
                              "seconds": h["seconds"], "steps": h["steps"], "tokens": h["tokens"]}
    return {"processes": procs, "threads_per_process": 1, "wall_s": round(wall, 1), "stages": stages,
            "command": " ".join(cmd[1:]).replace(f"{REPO}/", "")}


def _allreduce_worker(rank: int, world: int, port: int, model: str, q) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from qat.config import QuantSpec
    from qat.dist import Dist
    from qat.models import get_adapter
    from qat.models.loading import load_fp_model
    from qat.nn import quantize_model

    m = load_fp_model(model)
    quantize_model(m, QuantSpec.from_dict({"weight": {"bits": 2, "group_size": 64}}))
    block = get_adapter(m).blocks(m)[0]
    params = [p for n, p in block.named_parameters() if "norm" not in n]
    for p in params:
        p.grad = torch.randn_like(p)
    d, reduce_s, wrap_s = Dist(), [], []
    for _ in range(5):
        dist.barrier()
        t0 = time.perf_counter()
        d.mean_([p.grad for p in params])
        reduce_s.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        torch.nn.parallel.DistributedDataParallel(block)
        wrap_s.append(time.perf_counter() - t0)
    if rank == 0:
        q.put({"params": sum(p.numel() for p in params), "allreduce_ms": round(1e3 * statistics.median(reduce_s), 1),
               "ddp_wrap_ms": round(1e3 * statistics.median(wrap_s), 1)})
    dist.destroy_process_group()


def bench_allreduce(model: str) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_allreduce_worker, args=(2, port, model, q), nprocs=2, start_method="spawn")
    return {"processes": 2, "backend": "gloo", **q.get()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=".cache/smollm2-135m")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--only", choices=["runs", "allreduce"])
    p.add_argument("--work", default="runs/bench-scaling")
    a = p.parse_args()
    res = json.loads(OUT.read_text()) if OUT.is_file() else {}
    load = os.getloadavg()
    res["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "torch_threads_per_process": 1, "loadavg_1_5_15_at_start": [round(x, 1) for x in load],
                      "date": time.strftime("%Y-%m-%d %H:%M")}
    if a.only in (None, "runs"):
        res["runs"] = [bench_run(a.model, n, REPO / a.work) for n in a.procs]
    if a.only in (None, "allreduce"):
        res["gradient_average"] = bench_allreduce(a.model)
    res["machine"]["loadavg_1_5_15_at_end"] = [round(x, 1) for x in os.getloadavg()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
