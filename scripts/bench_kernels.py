"""Benchmark the fused low-bit kernels (qat_kernels) against fp16 cuBLAS on LLaMA linear shapes.

    python scripts/bench_kernels.py --out docs/kernels            # full sweep (a few minutes on one GPU)
    python scripts/bench_kernels.py --out /tmp/k --batches 1 --kernels int2,int4 --shapes 4096x4096
    python scripts/bench_kernels.py --out /tmp/k --tune            # also sweep launch configs, report the best
    python scripts/bench_kernels.py --out /tmp/k --compile-check   # no GPU: compile every kernel for sm_90

For each kernel x shape (out x in) x batch: the kernel through qat_kernels.dispatch.linear(backend="triton") (every
launch it makes, e.g. VQ's input/output transforms and W4A4's token quantization, is included) and torch's fp16
F.linear (cuBLAS), timed with triton.testing.do_bench (median, L2 flushed between calls); speed-up = fp16 time /
kernel time; effective bandwidth = bytes that must move (packed weights + scales/zeros/codebooks + x + y) / time,
also as a fraction of the device's peak HBM bandwidth, looked up from the device name (printed; "?" if unknown).
Each config is checked against the reference (kernels/reference.py dequantization + F.linear) on the same inputs.
Writes <out>/results.md, <out>/results.json and <out>/speedup.png (if matplotlib is importable). Exit status 1 if
a correctness check fails, 2 without CUDA. Needs torch + triton only (qat_kernels is loaded from kernels/ when the
project is not installed).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# (out_features, in_features) and where they occur
SHAPES: dict[str, tuple[int, int, str]] = {
    "4096x4096": (4096, 4096, "LLaMA-2-7B q/k/v/o, LLaMA-3-8B q/o"),
    "11008x4096": (11008, 4096, "LLaMA-2-7B gate/up"),
    "4096x11008": (4096, 11008, "LLaMA-2-7B down"),
    "14336x4096": (14336, 4096, "LLaMA-3-8B gate/up"),
    "4096x14336": (4096, 14336, "LLaMA-3-8B down"),
    "1024x4096": (1024, 4096, "LLaMA-3-8B k/v"),
}
LLAMA2_7B = ("4096x4096", "11008x4096", "4096x11008")
SMOKE_SHAPES = {"64x256": (64, 256, "--smoke"), "96x128": (96, 128, "--smoke")}  # tiny: the interpreter is slow

# name -> (format, weight bits, activation bits)
KERNELS: dict[str, tuple[str, int, int]] = {
    "int2": ("uniform", 2, 16),
    "int3": ("uniform", 3, 16),
    "int4": ("uniform", 4, 16),
    "int8": ("uniform", 8, 16),
    "w11": ("binary11", 1, 16),
    "vq2": ("vq", 2, 16),
    "w4a4": ("uniform", 4, 4),
}
DEFAULT_KERNELS = "int2,int4,w11,vq2,w4a4"

# the targets: (kernel, batch) -> minimum speed-up over fp16, geometric mean over the LLaMA-2-7B shapes, H100
TARGETS: dict[tuple[str, int], float] = {("int2", 1): 5.0, ("w11", 1): 6.0, ("vq2", 1): 3.5, ("int4", 1): 3.0,
                                         ("w4a4", 512): 1.5}

# peak HBM bandwidth (GB/s) by device-name substring, most specific first (vendor datasheets)
PEAK_BANDWIDTH: list[tuple[str, float, str]] = [
    ("H200", 4800, "H200 (HBM3e)"),
    ("GH200", 4000, "GH200 96 GB HBM3"),
    ("H100 NVL", 3900, "H100 NVL"),
    ("H100 PCIe", 2000, "H100 PCIe"),
    ("H100", 3350, "H100 SXM (HBM3)"),
    ("H800", 3350, "H800 SXM"),
    ("A100-SXM4-80GB", 2039, "A100 SXM 80 GB"),
    ("A100 80GB PCIe", 1935, "A100 PCIe 80 GB"),
    ("A100", 1555, "A100 40 GB"),
    ("L40S", 864, "L40S"),
    ("L4", 300, "L4"),
    ("RTX 4090", 1008, "RTX 4090"),
    ("A10G", 600, "A10G"),
]


def _import_qat_kernels():
    """qat_kernels, installed or straight from this checkout's kernels/ directory."""
    try:
        import qat_kernels
    except ImportError:
        spec = importlib.util.spec_from_file_location("qat_kernels", REPO / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "kernels")])
        qat_kernels = importlib.util.module_from_spec(spec)
        sys.modules["qat_kernels"] = qat_kernels
        spec.loader.exec_module(qat_kernels)
    return qat_kernels


def peak_bandwidth(name: str) -> tuple[float | None, str]:
    for key, gbps, label in PEAK_BANDWIDTH:
        if key in name:
            return gbps, label
    return None, "unknown device: no peak bandwidth"


# ---- layers -----------------------------------------------------------------------------------------------------
def make_layer(kernel: str, n: int, k: int, group: int, device: str, seed: int = 0):
    """Random packed tensors of the stored layout (any byte is a valid packed code for every format), and meta."""
    from qat_kernels.hadamard import hadamard_block_size, hadamard_matrix, random_signs

    fmt, bits, act_bits = KERNELS[kernel]
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand_bytes(*shape):
        return torch.randint(0, 256, shape, generator=gen, device=device, dtype=torch.uint8)

    def rand(*shape, lo=0.0, hi=1.0):
        return (torch.rand(*shape, generator=gen, device=device) * (hi - lo) + lo).half()

    meta = {"in_features": k, "out_features": n, "group_size": group, "bits": bits}
    if fmt == "uniform":
        ng = k // group
        packed = {"qweight": rand_bytes(n, k * bits // 8), "scales": rand(n, ng, lo=0.001, hi=0.01),
                  "zeros": torch.randint(0, 2**bits, (n, ng), generator=gen, device=device).to(torch.uint8)}
        if act_bits < 16:
            meta.update(act_bits=act_bits, act_sym=False, act_clip_hi=0.95, act_clip_lo=0.95)
    elif fmt == "binary11":
        ng = k // group
        packed = {"signs": rand_bytes(n, k // 8), "bitmap": rand_bytes(n, k // 8),
                  "alpha": rand(n, ng, 2, lo=0.001, hi=0.01), "mu": rand(n, ng, 2, lo=-0.001, hi=0.001)}
    else:
        A = (hadamard_matrix(4) / math.sqrt(1.25)).half().to(device)
        bi, bo = hadamard_block_size(k), hadamard_block_size(n)
        packed = {"codes": rand_bytes(n, k // 4), "A": A, "b": (-1.5 * A.float().sum(1)).half(),
                  "s_u": rand(k, lo=0.5, hi=1.5), "s_v": rand(n, lo=0.005, hi=0.02),
                  "signs_in": random_signs(k, 0).to(device), "signs_out": random_signs(n, 1).to(device),
                  "hadamard_blocks": torch.tensor([bi, bo], dtype=torch.int32, device=device)}
        meta = {"in_features": k, "out_features": n, "block_in": bi, "block_out": bo}  # no device read-back per call
    return fmt, packed, meta


def layer_bytes(packed: dict) -> int:
    return sum(t.numel() * t.element_size() for name, t in packed.items() if name != "hadamard_blocks")


# ---- launch-config sweep (--tune) --------------------------------------------------------------------------------
def candidate_configs(batch: int, group: int, fmt: str, act_bits: int):
    from qat_kernels.triton.common import Config, block_k_for_group

    if act_bits < 16:
        tiles = [(16, 64, 128, 4), (16, 128, 128, 4), (64, 64, 128, 4), (64, 128, 128, 4), (128, 128, 128, 8),
                 (128, 256, 128, 8), (128, 128, 64, 4)]
        out = [Config(bm, bn, bk, 1, True, 8, w, s) for bm, bn, bk, w in tiles for s in (3, 4)
               if (batch > 16 or bm == 16) and group % bk == 0]
        return out
    if batch <= 4:
        bm = 1 if batch == 1 else 1 << (batch - 1).bit_length()
        out = [Config(bm, bn, bk, sk, False, 8, w, 2) for bn in (4, 8, 16) for bk in (256, 512, 1024)
               for sk in (1, 2, 4) for w in (4, 8)]
    elif batch <= 64:
        bm = max(16, 1 << (batch - 1).bit_length())
        out = [Config(bm, bn, bk, sk, True, 8, 4, 3) for bn in (32, 64, 128) for bk in (64, 128, 256)
               for sk in (1, 2, 4, 8)]
    else:
        out = [Config(bm, bn, bk, 1, True, 8, w, s) for bm, bn, bk, w in
               [(64, 128, 64, 4), (128, 128, 64, 8), (128, 256, 64, 8), (128, 128, 32, 4), (64, 64, 64, 4)]
               for s in (3, 4)]
    return [c for c in out if fmt == "vq" or block_k_for_group(c.block_k, group) == c.block_k]


def tune(kernel_module, x, spec, packed, batch, group, fmt, act_bits, do_bench):
    best = None
    for cfg in candidate_configs(batch, group, fmt, act_bits):
        try:
            t = do_bench(lambda cfg=cfg: kernel_module.linear(x, spec, packed, None, config=cfg), warmup=10, rep=40,
                         return_mode="median")
        except Exception as e:  # noqa: BLE001 (a config the compiler rejects, e.g. out of shared memory: skip it)
            print(f"    config {cfg} failed: {type(e).__name__}", file=sys.stderr)
            continue
        if best is None or t < best[0]:
            best = (t, cfg)
    return best


# ---- main -------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "kernels", help="output directory")
    p.add_argument("--kernels", default=DEFAULT_KERNELS, help=f"comma list of {', '.join(KERNELS)}")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma list of OUTxIN shapes")
    p.add_argument("--batches", default="1,16,128,512", help="comma list of batch sizes (tokens)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size (uniform, binary11)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--tune", action="store_true", help="also sweep launch configs and report the best per case")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks against the reference")
    p.add_argument("--compile-check", action="store_true",
                   help="no GPU needed: compile every kernel for sm_90 (heuristic configs), report registers, shared\n"
                        "memory and instructions per weight; writes <out>/compile.json")
    p.add_argument("--smoke", action="store_true",
                   help="check this script without a GPU: tiny shapes, Triton interpreter on CPU, timings meaningless")
    args = p.parse_args(argv)
    args.kernels = [k for k in args.kernels.split(",") if k]
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    for k in args.kernels:
        if k not in KERNELS:
            p.error(f"unknown kernel {k!r}; choose from {', '.join(KERNELS)}")
    for s in args.shapes:
        if s not in SHAPES:
            p.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    return args


def check(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / max |ref|: fp16 output, fp32 accumulation on both sides -> ~1e-3; pass at <= 1e-2."""
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def _cpu_timer(fn, warmup: int, rep: int, return_mode: str = "median") -> float:
    """--smoke stand-in for do_bench (which needs CUDA events): wall-clock ms of a few calls, meaningless as speed."""
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.compile_check:
        return compile_check(args.out)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    elif not torch.cuda.is_available():
        print("bench_kernels: no CUDA device (torch.cuda.is_available() is False). The kernels' speed can only be "
              "measured on an NVIDIA GPU: run `python scripts/bench_kernels.py --out docs/kernels` there. "
              "Correctness without a GPU: pytest tests/test_kernels.py (Triton interpreter).", file=sys.stderr)
        return 2
    import triton

    _import_qat_kernels()
    from qat_kernels import dispatch

    if args.smoke:
        device, name, bench = "cpu", "CPU (Triton interpreter, --smoke: timings meaningless)", _cpu_timer
        shapes = SMOKE_SHAPES
    else:
        from triton.testing import do_bench as bench

        torch.backends.cuda.matmul.allow_tf32 = False
        device, name, shapes = "cuda", torch.cuda.get_device_name(), SHAPES
    peak, peak_label = peak_bandwidth(name)
    print(f"device: {name}; peak HBM bandwidth: {'?' if peak is None else f'{peak:.0f} GB/s'} ({peak_label})")
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16
    rows, failures = [], 0
    for shape in args.shapes if not args.smoke else list(shapes):
        n, k, where = shapes[shape]
        w16 = (torch.randn(n, k, device=device) * 0.02).to(dtype)
        for kernel in args.kernels:
            fmt, packed, meta = make_layer(kernel, n, k, args.group_size, device)
            spec = dispatch.layer_spec(fmt, packed, meta)
            reason = dispatch.triton_support(spec, torch.empty(1, k, device=device, dtype=dtype))
            if reason is not None:
                print(f"{kernel:5s} {shape}: skipped ({reason})")
                continue
            w_ref = None if args.no_check else dispatch.dequantize(fmt, packed, meta)
            module = dispatch._kernel_module(spec) if spec["act_bits"] >= 16 else _w4a4_module()
            for batch in args.batches:
                x = torch.randn(batch, k, device=device).to(dtype)

                def run_kernel(x=x, fmt=fmt, packed=packed, meta=meta):
                    return dispatch.linear(x, fmt, packed, meta, backend="triton")

                def run_fp16(x=x, w16=w16):
                    return torch.nn.functional.linear(x, w16)

                y = run_kernel()
                rel = None
                if w_ref is not None:
                    x_ref = dispatch.quantize_activations(x, spec) if spec["act_bits"] < 16 else x.float()
                    rel = check(y, torch.nn.functional.linear(x_ref, w_ref))
                    failures += rel > 1e-2
                t = bench(run_kernel, warmup=args.warmup, rep=args.rep, return_mode="median")
                t16 = bench(run_fp16, warmup=args.warmup, rep=args.rep, return_mode="median")
                io = (batch * k + batch * n) * 2
                gbps = (layer_bytes(packed) + io) / t / 1e6
                gbps16 = (n * k * 2 + io) / t16 / 1e6
                row = {"kernel": kernel, "format": fmt, "shape": shape, "out": n, "in": k, "where": where,
                       "batch": batch, "ms": t, "fp16_ms": t16, "speedup": t16 / t, "gbps": gbps,
                       "fp16_gbps": gbps16, "peak_frac": gbps / peak if peak else None,
                       "config": _config_used(module, batch, n, k, spec, device), "rel_err": rel,
                       "ok": None if rel is None else rel <= 1e-2}
                if args.tune:
                    best = tune(module, x, spec, packed, batch, args.group_size, fmt, spec["act_bits"], bench)
                    if best is not None:
                        row["tuned_ms"], row["tuned_config"] = best[0], best[1].as_dict()
                rows.append(row)
                print(f"{kernel:5s} {shape:11s} b={batch:4d}  {t * 1e3:8.1f} us  fp16 {t16 * 1e3:8.1f} us  "
                      f"x{t16 / t:5.2f}  {gbps:6.0f} GB/s"
                      + (f" ({100 * gbps / peak:4.1f}% peak)" if peak else "")
                      + ("" if rel is None else f"  rel.err {rel:.1e}{'' if rel <= 1e-2 else '  FAILED'}")
                      + (f"  tuned {row['tuned_ms'] * 1e3:.1f} us" if "tuned_ms" in row else ""))
            w_ref = None
            if device == "cuda":
                torch.cuda.empty_cache()
    targets = target_summary(rows)
    info = {"device": name, "peak_gbps": peak, "peak_source": peak_label, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "group_size": args.group_size,
            "command": "python scripts/bench_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "timing": f"triton.testing.do_bench median, warmup {args.warmup} ms, rep {args.rep} ms, fp16 inputs"}
    (args.out / "results.json").write_text(json.dumps({**info, "rows": rows, "targets": targets}, indent=1))
    (args.out / "results.md").write_text(markdown(info, rows, targets))
    plot(rows, args.out / "speedup.png", name)
    print(f"wrote {args.out}/results.md, results.json" + (", speedup.png" if _has_matplotlib() else ""))
    for t in targets:
        print(f"target {t['kernel']} batch {t['batch']}: x{t['speedup']:.2f} vs >= x{t['target']} "
              f"-> {'met' if t['met'] else 'MISSED'}")
    if failures:
        print(f"{failures} correctness check(s) FAILED", file=sys.stderr)
    return 1 if failures else 0


def compile_check(out: Path) -> int:
    """Compile all kernels for sm_90 with Triton's ahead-of-time path (qat_kernels.triton.compile_check)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench_kernels --compile-check: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    _import_qat_kernels()
    from qat_kernels.triton import compile_check as cc

    rows = cc.check(cc.default_cases())
    print(cc.format_rows(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile.json").write_text(json.dumps({"target": "cuda sm_90", "rows": rows}, indent=1))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} kernels compile for sm_90; wrote {out}/compile.json")
    return 1 if failed else 0


def _w4a4_module():
    from qat_kernels.triton import w4a4

    return w4a4


def _config_used(module, batch, n, k, spec, device) -> dict | None:
    """The heuristic config the dispatch path launched (for the record)."""
    from qat_kernels.triton import common

    index = torch.cuda.current_device() if device == "cuda" else None
    if module.__name__.endswith("w4a4"):
        return module.pick_config(batch, n, spec["group_size"], index).as_dict()
    group = 1 << 30 if spec["fmt"] == "vq" else spec["group_size"]
    cfg = common.pick_config(batch, n, k, group, 2 if spec["fmt"] != "uniform" else spec["bits"], index)
    return None if cfg is None else cfg.as_dict()


def target_summary(rows: list[dict]) -> list[dict]:
    out = []
    for (kernel, batch), target in TARGETS.items():
        sel = [r for r in rows if r["kernel"] == kernel and r["batch"] == batch and r["shape"] in LLAMA2_7B]
        if not sel:
            continue
        geo = math.exp(sum(math.log(r["speedup"]) for r in sel) / len(sel))
        out.append({"kernel": kernel, "batch": batch, "shapes": [r["shape"] for r in sel], "speedup": geo,
                    "target": target, "met": geo >= target})
    return out


def markdown(meta: dict, rows: list[dict], targets: list[dict]) -> str:
    peak = meta["peak_gbps"]
    peak_text = f"{peak:.0f} GB/s" if peak else "unknown"
    header = (f"`{meta['command']}` -- torch {meta['torch']}, triton {meta['triton']}; {meta['timing']}; "
              f"group size {meta['group_size']}; peak bandwidth {peak_text} ({meta['peak_source']}).")
    lines = [f"# Kernel benchmark: {meta['device']}", "", header, ""]
    if targets:
        lines += ["## Targets (geometric mean over the LLaMA-2-7B shapes)", "",
                  "| kernel | batch | speed-up | target | |", "| --- | ---: | ---: | ---: | --- |"]
        lines += [f"| {t['kernel']} | {t['batch']} | {t['speedup']:.2f}x | >= {t['target']}x | "
                  f"{'met' if t['met'] else 'missed'} |" for t in targets]
        lines.append("")
    lines += ["## All configurations", "",
              "| kernel | shape (out x in) | batch | kernel us | fp16 us | speed-up | GB/s | % peak | rel. err | "
              + ("tuned us |" if any("tuned_ms" in r for r in rows) else ""),
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
              + (" ---: |" if any("tuned_ms" in r for r in rows) else "")]
    for r in rows:
        frac = "" if r["peak_frac"] is None else f"{100 * r['peak_frac']:.0f}%"
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        tuned = f" {r['tuned_ms'] * 1e3:.1f} |" if "tuned_ms" in r else ""
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['batch']} | {r['ms'] * 1e3:.1f} | {r['fp16_ms'] * 1e3:.1f} | "
                     f"{r['speedup']:.2f}x | {r['gbps']:.0f} | {frac} | {err} |{tuned}")
    return "\n".join(lines) + "\n"


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot(rows: list[dict], path: Path, device: str) -> None:
    if not _has_matplotlib():
        print("matplotlib is not importable: no plot (results.md / results.json have every number)")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = sorted({r["kernel"] for r in rows}, key=list(KERNELS).index)
    batches = sorted({r["batch"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kernel in kernels:
        ys = []
        for b in batches:
            sel = [r["speedup"] for r in rows if r["kernel"] == kernel and r["batch"] == b]
            ys.append(math.exp(sum(map(math.log, sel)) / len(sel)) if sel else float("nan"))
        line = ax.plot(batches, ys, marker="o", label=kernel)[0]
        for (k, b), target in TARGETS.items():
            if k == kernel and b in batches:
                ax.scatter([b], [target], marker="_", s=400, color=line.get_color())
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (tokens)")
    ax.set_ylabel("speed-up over fp16 cuBLAS (geo. mean over shapes)")
    ax.set_title(f"qat_kernels on {device}\n(short dashes: targets)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
