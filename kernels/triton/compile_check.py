"""Compile every kernel for a GPU target without a GPU (Triton's ahead-of-time path + the ptxas bundled with triton).

The interpreter (tests/test_kernels.py) runs the kernels' math but never Triton's compiler, so errors that only the
compiler sees (typing of constexpr branches, layouts, shared-memory size) would first show on a GPU. This compiles
each kernel with the launch configs the heuristics choose for the LLaMA benchmark shapes and reports, from the
cubin, registers, spills, shared memory and the instruction count of the hottest loop per weight (a proxy for the
ALU cost of unpacking and dequantizing, which bounds the batch-1 GEMV on Hopper).

    python -m qat_kernels.triton.compile_check [filter]        # or: scripts/bench_kernels.py --compile-check

Must run with TRITON_INTERPRET unset (the @triton.jit objects must be real JIT functions).
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import triton
import triton.language as tl
from qat_kernels.triton import binary11, common, uniform, vq, w4a4
from qat_kernels.triton.common import Config
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100 = GPUTarget("cuda", 90, 32)
SMEM_LIMIT = 232448  # bytes of shared memory per block on sm_90 (227 KB)
_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


@dataclass
class Case:
    name: str
    fn: object
    signature: dict
    constexprs: dict
    config: Config
    weights_per_iter: int = 0  # BLOCK_N * BLOCK_K of the main loop (0: no per-weight figure)
    aligned: tuple = ()


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_case(case: Case, target: GPUTarget = H100):
    sig = {n: ("constexpr" if n in case.constexprs else case.signature[n]) for n in case.fn.arg_names}
    attrs = {(case.fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in case.aligned if n in sig}
    src = ASTSource(case.fn, sig, case.constexprs, attrs)
    return triton.compile(src, target=target,
                          options={"num_warps": case.config.num_warps, "num_stages": case.config.num_stages})


def sass(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        return subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def resources(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=False).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
    return {"regs": int(m.group(1)) if m else None, "spill_bytes": int(m.group(2)) if m else None,
            "shared_bytes": kernel.metadata.shared}


def hottest_loop(sass_text: str) -> collections.Counter:
    """Opcode histogram of the longest backward-branch body (the main K loop after software pipelining)."""
    ins = []
    for line in sass_text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2), m.group(3)))
    best: list[str] = []
    for addr, op, args in ins:
        t = re.search(r"0x([0-9a-f]+)", args) if op == "BRA" else None
        if t and int(t.group(1), 16) < addr:
            body = [o for a, o, _ in ins if int(t.group(1), 16) <= a <= addr]
            best = body if len(body) > len(best) else best
    return collections.Counter(best)


# ---- the cases ----------------------------------------------------------------------------------------------------
_DOT = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}


def uniform_case(bits: int, M: int, N: int, K: int, group: int = 128, x: str = "fp16", bias: bool = False) -> Case:
    cfg = common.pick_config(M, N, K, group, bits, None)
    sig = {"x_ptr": _PTR[x], "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": _PTR[x],
           "y_ptr": "*fp32" if cfg.split_k > 1 else _PTR[x], "M": "i32", "N": "i32", "K": "i32", "n_words": "i32",
           "n_groups": "i32", "k_split": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    aligned = ("x_ptr", "w_ptr", "s_ptr", "z_ptr", "y_ptr", "b_ptr", "n_words", "n_groups", "stride_xm",
               "stride_ym", "K", "k_split")
    if cfg.use_dot:
        seg = uniform.segment(group)
        bk = min(cfg.block_k, seg)
        cx = {"BITS": bits, "GROUP": group, "SEGMENT": seg, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
              "BLOCK_K": bk, "SPLIT_K": cfg.split_k, "SWAP": cfg.swap, "GROUP_M": cfg.group_m, "HAS_BIAS": bias}
        fn = uniform._uniform_mma_kernel
    else:
        bk = cfg.block_k
        cx = {"BITS": bits, "GROUP": group, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": bk,
              "SPLIT_K": cfg.split_k, "GROUP_M": cfg.group_m, "HAS_BIAS": bias}
        fn = uniform._uniform_gemv_kernel
    per_weight = cfg.block_n * bk if cfg.block_m <= 64 else 0  # a GEMM tile's cost is spread over its rows
    return Case(f"uniform int{bits} g{group} {x} M={M} {N}x{K}", fn, sig, cx, cfg, per_weight, aligned)


def binary11_case(M: int, N: int, K: int, group: int = 128, x: str = "fp16", bias: bool = False) -> Case:
    cfg = common.pick_config(M, N, K, group, 2, None)
    sig = {"x_ptr": _PTR[x], "sign_ptr": "*i32", "map_ptr": "*i32", "a_ptr": "*fp16", "mu_ptr": "*fp16",
           "b_ptr": _PTR[x], "y_ptr": "*fp32" if cfg.split_k > 1 else _PTR[x], "M": "i32", "N": "i32", "K": "i32",
           "n_words": "i32", "n_groups": "i32", "k_split": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    cx = {"GROUP": group, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
          "SPLIT_K": cfg.split_k, "USE_DOT": cfg.use_dot, "SWAP": cfg.swap, "GROUP_M": cfg.group_m, "HAS_BIAS": bias}
    aligned = ("x_ptr", "sign_ptr", "map_ptr", "a_ptr", "mu_ptr", "y_ptr", "n_words", "stride_xm", "stride_ym", "K",
               "k_split")
    return Case(f"binary11 g{group} {x} M={M} {N}x{K}", binary11._binary11_matmul_kernel, sig, cx, cfg,
                cfg.block_n * cfg.block_k if cfg.block_m <= 64 else 0, aligned)


def vq_cases(M: int, N: int, K: int, x: str = "fp16") -> list[Case]:
    cfg = common.pick_config(M, N, K, vq._NO_GROUPS, 2, None)
    xa = "*fp32" if not cfg.use_dot else _PTR[x]
    mm = Case(f"vq matmul {x} M={M} {N}x{K}", vq._vq_matmul_kernel,
              {"x_ptr": xa, "w_ptr": "*i32", "c_ptr": "*fp32", "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
               "n_words": "i32", "n_blocks": "i32", "k_split": "i32", "stride_xm": "i32", "stride_ym": "i32"},
              {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT_K": cfg.split_k,
               "USE_DOT": cfg.use_dot, "SWAP": cfg.swap, "GROUP_M": cfg.group_m}, cfg,
              cfg.block_n * cfg.block_k if cfg.block_m <= 64 else 0,
              ("x_ptr", "w_ptr", "c_ptr", "y_ptr", "n_words", "stride_xm", "stride_ym", "K", "k_split"))
    block = 128
    small = Config(16, block, block, num_warps=4, num_stages=3)
    pre = Case(f"vq input transform {x} M={M} block {block}", vq._vq_input_kernel,
               {"x_ptr": _PTR[x], "su_ptr": "*fp16", "sg_ptr": "*i8", "h_ptr": "*fp32", "a_ptr": "*fp16",
                "b_ptr": "*fp16", "xo_ptr": xa, "c_ptr": "*fp32", "M": "i32", "K": "i32", "n_blocks": "i32",
                "stride_xm": "i32", "inv_sqrt_b": "fp32"},
               {"B": block, "D": 4, "BLOCK_M": 16, "DOT_DTYPE": _DOT[x]}, small, 0, ("x_ptr", "xo_ptr", "K"))
    post = Case(f"vq output transform {x} block {block}", vq._vq_output_kernel,
                {"yr_ptr": "*fp32", "sg_ptr": "*i8", "sv_ptr": "*fp16", "h_ptr": "*fp32", "bias_ptr": _PTR[x],
                 "y_ptr": _PTR[x], "M": "i32", "N": "i32", "stride_rm": "i32", "stride_ym": "i32",
                 "inv_sqrt_b": "fp32"},
                {"B": block, "BLOCK_M": 16, "HAS_BIAS": True}, small, 0, ("yr_ptr", "y_ptr", "stride_rm", "stride_ym"))
    return [mm, pre, post]


def w4a4_cases(M: int, N: int, bits: int = 4, group: int = 128, x: str = "fp16") -> list[Case]:
    cfg = w4a4.pick_config(M, N, group, None, bits)
    mm = Case(f"w4a4 int{bits} g{group} M={M} N={N}", w4a4._w4a4_matmul_kernel,
              {"xq_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8",
               "b_ptr": _PTR[x], "y_ptr": _PTR[x], "M": "i32", "N": "i32", "K": "i32", "n_words": "i32",
               "n_groups": "i32", "stride_ym": "i32"},
              {"BITS": bits, "GROUP": group, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
               "GROUP_M": cfg.group_m, "HAS_BIAS": False}, cfg, 0, ("xq_ptr", "w_ptr", "y_ptr", "K", "n_words"))
    quant = Case(f"token quantization {x} 4-bit asym", w4a4._quantize_tokens_kernel,
                 {"x_ptr": _PTR[x], "q_ptr": "*i8", "s_ptr": "*fp32", "K": "i32", "stride_xm": "i32",
                  "clip_hi": "fp32", "clip_lo": "fp32"},
                 {"BITS": 4, "SYM": False, "BLOCK": 2048}, Config(1, 1, 2048, num_warps=8, num_stages=1), 0,
                 ("x_ptr", "q_ptr", "K", "stride_xm"))
    return [mm, quant]


def default_cases(quick: bool = False) -> list[Case]:
    """The configs the heuristics pick for the benchmark (batch 1, 16, 128, 512 on 4096x4096 and 1024x4096), plus
    odd widths and dtypes. quick: one case per kernel and regime (what the test suite compiles)."""
    if quick:
        return [uniform_case(4, 1, 4096, 4096), uniform_case(2, 16, 4096, 4096), uniform_case(4, 512, 4096, 4096),
                binary11_case(1, 4096, 4096), binary11_case(16, 4096, 4096), *vq_cases(16, 4096, 4096),
                *w4a4_cases(512, 4096)]
    cases: list[Case] = []
    for M in (1, 16, 128, 512):
        for N, K in ((4096, 4096), (1024, 4096)):
            cases += [uniform_case(2, M, N, K), uniform_case(4, M, N, K), binary11_case(M, N, K)]
            cases += vq_cases(M, N, K)[:1] + w4a4_cases(M, N)[:1]
    cases += [uniform_case(3, 1, 4096, 4096), uniform_case(3, 512, 4096, 4096), uniform_case(8, 16, 4096, 4096),
              uniform_case(1, 128, 4096, 4096), uniform_case(4, 16, 4096, 4096, group=4096),
              uniform_case(4, 16, 4096, 4096, x="fp32", bias=True), uniform_case(4, 512, 4096, 4096, x="bf16"),
              binary11_case(16, 4096, 4096, x="bf16", bias=True), *vq_cases(1, 4096, 4096)[1:],
              *vq_cases(16, 4096, 4096, x="bf16")[1:], *w4a4_cases(512, 4096, bits=3)]
    return cases


def check(cases: list[Case], target: GPUTarget = H100) -> list[dict]:
    rows = []
    for case in cases:
        row = {"case": case.name, "config": case.config.as_dict()}
        t0 = time.perf_counter()
        try:
            kernel = compile_case(case, target)
        except Exception as e:  # noqa: BLE001 (report every failure, keep going)
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
            rows.append(row)
            continue
        row.update(ok=True, compile_s=round(time.perf_counter() - t0, 2), **resources(kernel))
        if row["shared_bytes"] > SMEM_LIMIT:
            row.update(ok=False, error=f"needs {row['shared_bytes']} B of shared memory, sm_90 has {SMEM_LIMIT}")
        if case.weights_per_iter:
            loop = hottest_loop(sass(kernel))
            row["loop_instructions_per_weight"] = round(sum(loop.values()) * 32 * case.config.num_warps
                                                        / case.weights_per_iter, 2)
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["ok"]:
            per_w = r.get("loop_instructions_per_weight")
            lines.append(f"ok    {r['case']}: {r['regs']} regs, {r['spill_bytes']} B spilled, {r['shared_bytes']} B smem"
                         + (f", ~{per_w} instr/weight in the K loop" if per_w else ""))
        else:
            lines.append(f"FAIL  {r['case']}: {r['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the kernels must be real JIT functions)", file=sys.stderr)
        return 2
    quick = "--quick" in argv
    names = [a for a in argv if not a.startswith("--")]
    cases = [c for c in default_cases(quick) if not names or any(n in c.name for n in names)]
    rows = check(cases)
    print(format_rows(rows))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} kernels compile for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
