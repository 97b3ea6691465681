"""Scale-out and crash safety of `qat distill` (docs/SCALING.md), on CPU with gloo, on the tiny random model and
configs/tiny/w2-three-stages.yaml, with real processes:

* SIGKILL at five points of a run (inside a block-wise window, between windows, during a checkpoint write, inside
  stage 2, inside stage 3), each time resumed with --resume last: the final student and the per-stage history are
  bit-identical to an uninterrupted run.
* 2 processes on one node (Lightning's launcher) and 2 nodes x 1 process (two torchrun launches on loopback) run the
  recipe to the end on disjoint shards that cover the data, and equal the 1-process run within the bound derived in
  `assert_equal_up_to_reduction_order`; FSDP on 2 processes equals the 2-process DDP run bit for bit.
* SIGKILL one of 2 processes: the other stops with a one-line error within the timeout, and a 2-process
  --resume last equals the uninterrupted 2-process run bit for bit; a run also resumes on another number of processes.
* Bad input (devices, strategy, num_nodes, a world size the resume cannot honour): one line, exit status 2.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_distill import TINY_RECIPE, KillAt, recipe_for, run

QAT = str(Path(sys.executable).with_name("qat"))
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# the recipe whose 2-process run is compared with the 1-process run (see assert_equal_up_to_reduction_order):
# stage 0 trains scales and zero points over frozen codes instead of the latent weights
SMOOTH = ["--stages.0.train", "[wq]", "--stages.0.freeze_codes", "true", "--stages.0.optim.lr", "{wq: 1.0e-3}"]
TIMEOUT = 600  # seconds for any one launch on a loaded 2-core machine
# a test launches the run up to three times (reference, killed, resumed); the slowest took 272 s (+84 s module setup)
# on a 2-core machine at load ~10, so the default 300 s per test is too short here
pytestmark = [pytest.mark.timeout(3 * TIMEOUT), pytest.mark.usefixtures("one_thread", "token_cache")]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "QAT_KILL_AT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{k: str(v) for k, v in extra.items()})
    return env


def _args(tiny_dir, out, *extra) -> list[str]:
    return ["--config", str(TINY_RECIPE), "--model", str(tiny_dir / "model"), "--data.train_file",
            str(tiny_dir / "train.txt"), "--eval.file", str(tiny_dir / "val.txt"), "--output", str(out), *extra]


def _distill(args, env=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([QAT, "distill", *args], cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, p.stderr[-3000:]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _by_hand(args, world: int, **env) -> list[subprocess.Popen]:
    """`world` processes started by hand, one per "node" (NODE_RANK, MASTER_ADDR/PORT: Lightning's manual
    multi-node launch), each `qat distill ... --num_nodes world --devices 1`."""
    port = _port()
    return [subprocess.Popen([QAT, "distill", *args, "--num_nodes", str(world), "--devices", "1"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=world, NODE_RANK=r,
                                      LOCAL_RANK=0, **env))
            for r in range(world)]


def _wait(procs, timeout=TIMEOUT) -> list[tuple[int, str]]:
    t0, out = time.monotonic(), []
    for p in procs:
        _, err = p.communicate(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        out.append((p.returncode, err))
    return out


def _student(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "student.safetensors"))


def _history(out) -> list[dict]:
    hist = json.loads((Path(out) / "distill_history.json").read_text())
    for h in hist:
        h.pop("seconds", None)
    return hist


def assert_bit_identical(a, b) -> None:
    sa, sb = _student(a), _student(b)
    assert sa.keys() == sb.keys()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []


def _codes(sd: dict, name: str) -> torch.Tensor:
    """Integer codes of the uniform-quantized linear `name` (...proj.weight) in state dict `sd`."""
    p = name[: -len("weight")]
    w, s, z = sd[name], sd[p + "weight_quantizer.scale"].half().float(), sd[p + "weight_quantizer.zero"].round()
    return (w.view(w.shape[0], s.shape[1], -1) / s.unsqueeze(-1)).round() + z.unsqueeze(-1)


def assert_equal_up_to_reduction_order(one, many) -> None:
    """A W-process run equals the 1-process run up to the order of its fp32 sums, which changes every gradient by
    ~1e-7 relative (measured: 4e-7 at the first step). With the SMOOTH recipe nothing trained sits behind a rounding
    except the fp16 storage of the scales and, in stage 3, the 4-bit activation codes; from that the bound:
      integer codes of every linear    equal (frozen from the identical PTQ init; latent = (q - z) * s16 exactly)
      fp16 scales                      within 2 fp16 ulps: the drift (~1e-7 relative) crosses at most a rounding
                                       boundary of the fp16 grid (one ulp), two allows a second near-tie
      zero points (stage 0)            within 1e-3 of the farthest Adam can move them: 12 steps x lr 1e-3 x
                                       (1 - b1) / sqrt(1 - b2) = 3.8e-2, so 3.8e-5 (gradient direction ~exact)
      activation clip logits (stage 3) within 10% of the farthest Adam can move them, 9 x 1e-2 x 3.16 = 0.28:
                                       their gradients pass through 4-bit activation codes, of which a one-ulp scale
                                       change flips a few, so they differ by a few per cent, not by 1e-7
      everything that does not train   equal
    and the validation perplexity after every stage within 1e-3 relative. (Training the *latent* weights of a 2-bit
    grid is not continuous at all: a latent within 1e-7 of a rounding threshold flips its code in one run and not the
    other; that is why the comparison uses the SMOOTH recipe.) Measured: 1 ulp, 5e-7, 7e-4."""
    a, b = _student(one), _student(many)
    assert a.keys() == b.keys()
    adam = (1 - 0.9) / (1 - 0.999) ** 0.5
    for k in a:
        x, y = a[k], b[k]
        if k.endswith("weight_quantizer.scale"):
            ulps = (x.half().view(torch.int16).int() - y.half().view(torch.int16).int()).abs().max()
            assert ulps <= 2, (k, int(ulps))
        elif k.endswith("weight_quantizer.zero"):
            assert (x - y).abs().max() <= 1e-3 * 12 * 1e-3 * adam, k
        elif ".act_quantizer." in k:
            assert (x - y).abs().max() <= 0.1 * 9 * 1e-2 * adam, k
        elif k.endswith("proj.weight"):
            assert torch.equal(_codes(a, k), _codes(b, k)), k
        else:
            assert torch.equal(x, y), k
    for h1, hw in zip(_history(one), _history(many)):
        assert abs(hw["val_ppl"] - h1["val_ppl"]) <= 1e-3 * h1["val_ppl"], (h1["stage"], h1["val_ppl"], hw["val_ppl"])


def assert_shards_disjoint_and_covering(one, many, world: int) -> None:
    for h1, hw in zip(_history(one)[1:], _history(many)[1:]):
        (everything,) = h1["shards"]
        shards = hw["shards"]
        assert len(shards) == world and all(len(s) == len(everything) // world for s in shards)
        assert sorted(sum(shards, [])) == sorted(everything)  # disjoint and covering what one process trains on


# ---- runs shared by several tests ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_proc(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "student"
    _ok(_distill(_args(tiny_dir, out, *SMOOTH)))
    return out


@pytest.fixture(scope="module")
def two_proc(tiny_dir, tmp_path_factory):
    """2 processes on one node, started by Lightning's launcher (devices 2)."""
    out = tmp_path_factory.mktemp("two") / "student"
    _ok(_distill(_args(tiny_dir, out, *SMOOTH, "--devices", "2")))
    return out


# ---- SIGKILL anywhere --------------------------------------------------------------------------------------------------

def test_sigkill_anywhere_then_resume_is_bit_exact(tiny_dir, tmp_path):
    """Checkpoints (every 4 steps and at window/stage ends): step 0 (after PTQ), 4, 8, 12 | 16, 18 | 20, 21, 24, 27
    (stage 0: 3 windows x 4 steps; stage 1: 6 steps; stage 2: 3 windows x 3 steps)."""
    ref = tmp_path / "ref"
    run(recipe_for(tiny_dir, ref))
    out = tmp_path / "student"
    args = _args(tiny_dir, out)
    ckpt_info = Path(str(out) + ".run") / "checkpoints" / "last.json"
    kills = [  # (QAT_KILL_AT, where it lands, the checkpoint the next launch resumes from)
        ("after_step:2", "inside block-wise window 1", 0),
        ("after_step:8", "between windows 2 and 3: window 3 entered, its boundary checkpoint not written", 4),
        ("checkpoint:2", "half-way through writing the stage-0 end checkpoint (step 12)", 8),
        ("after_step:15", "inside stage 2 (e2e)", 12),
        ("after_step:23", "inside stage 3 (act), window 2", 21),
    ]
    for i, (at, where, resumes_from) in enumerate(kills):
        p = _distill(args + (["--resume", "last"] if i else []), env=_env(QAT_KILL_AT=at))
        assert p.returncode == -9, (where, p.stderr[-2000:])
        assert json.loads(ckpt_info.read_text())["global_step"] == resumes_from, where
        assert not out.exists()
    _ok(_distill(args + ["--resume", "last"]))
    assert_bit_identical(ref, out)
    assert _history(ref) == _history(out)


# ---- several processes -------------------------------------------------------------------------------------------------

def test_two_processes_on_one_node_equal_one_process(one_proc, two_proc):
    assert_shards_disjoint_and_covering(one_proc, two_proc, 2)
    assert_equal_up_to_reduction_order(one_proc, two_proc)


def test_two_nodes_on_loopback_equal_two_processes(tiny_dir, tmp_path, one_proc, two_proc):
    """Two torchrun launches, --nnodes 2 --node-rank 0/1 --master-addr 127.0.0.1: the same 2-process run (bit for
    bit: a sum of two terms does not depend on their order)."""
    out, port = tmp_path / "student", _port()
    procs = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "--no-python", QAT,
                               "distill", *_args(tiny_dir, out, *SMOOTH, "--num_nodes", "2")],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for rc, err in _wait(procs):
        assert rc == 0, err[-3000:]
    assert_shards_disjoint_and_covering(one_proc, out, 2)
    assert_bit_identical(two_proc, out)


def test_fsdp_on_two_cpu_processes_equals_ddp(tiny_dir, tmp_path, two_proc):
    """FSDP2 shards every decoder block of student and teacher (quantizer parameters with their layer); its
    reduce-scatter averages the same two terms as DDP's all-reduce, so the runs agree bit for bit."""
    out = tmp_path / "student"
    _ok(_distill(_args(tiny_dir, out, *SMOOTH, "--devices", "2", "--strategy", "fsdp")))
    assert_bit_identical(two_proc, out)
    assert _history(two_proc) == _history(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP on GPUs needs CUDA (none here); the CPU test above "
                                                          "runs the same code with gloo")
def test_fsdp_on_gpus_equals_ddp_on_gpus(tiny_dir, tmp_path):
    n = str(min(2, torch.cuda.device_count()))
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _ok(_distill(_args(tiny_dir, ddp, *SMOOTH, "--device", "cuda", "--devices", n, "--strategy", "ddp")))
    _ok(_distill(_args(tiny_dir, fsdp, *SMOOTH, "--device", "cuda", "--devices", n, "--strategy", "fsdp")))
    assert_equal_up_to_reduction_order(ddp, fsdp)


def test_kill_one_process_stops_the_other_then_two_process_resume_matches(tiny_dir, tmp_path, two_proc):
    """Process 1 of 2 is SIGKILLed after step 6; process 0 notices at its next collective (the dead peer's sockets
    close), stops with one line instead of waiting, and a 2-process --resume last ends equal to the uninterrupted
    2-process run. --dist_timeout 60 bounds the wait if a peer hangs instead of dying."""
    out = tmp_path / "student"
    args = _args(tiny_dir, out, *SMOOTH, "--dist_timeout", "60")
    t0 = time.monotonic()
    (rc0, err0), (rc1, _) = _wait(_by_hand(args, 2, QAT_KILL_AT="after_step:6:1"), timeout=TIMEOUT)
    assert rc1 == -9 and rc0 == 2, err0[-3000:]
    last = err0.strip().splitlines()[-1]
    assert last.startswith("qat distill: error: process 0 of 2 lost contact with the others (") and last.endswith(
        "; the run stopped (last checkpoint " + str(Path(str(out) + ".run") / "checkpoints" / "last.ckpt")
        + "): continue with --resume last"), last
    assert time.monotonic() - t0 < TIMEOUT
    for rc, err in _wait(_by_hand(args + ["--resume", "last"], 2)):
        assert rc == 0, err[-3000:]
    assert_bit_identical(two_proc, out)
    assert _history(two_proc) == _history(out)


def test_resume_on_another_number_of_processes(tiny_dir, tmp_path, one_proc):
    """The data order is defined by global position, so a run killed on one process continues on two (and would
    continue on one after two): it ends equal to the 1-process run within the same bound."""
    out = tmp_path / "student"
    with pytest.raises(KeyError):
        run(recipe_for(tiny_dir, out, *SMOOTH), callbacks=[KillAt(10)])
    _ok(_distill(_args(tiny_dir, out, *SMOOTH, "--devices", "2", "--resume", "last")))
    assert_equal_up_to_reduction_order(one_proc, out)
    assert [len(h["shards"]) for h in _history(out)[1:]] == [2, 2, 2]


# ---- statistics reduced over processes ----------------------------------------------------------------------------------

SPECS = {"gptq-w2a4": {"weight": {"format": "uniform", "bits": 2, "group_size": 32}, "act": {"bits": 4}},
         "blockldlq-vq": {"weight": {"format": "vq"}}}


def _reduced_worker(rank: int, world: int, init: str, out: str) -> None:
    """One process of `world`: PTQ (GPTQ W2 with A4, BlockLDLQ VQ), CAKLD's gamma and perplexity, with `dist`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from conftest import tiny_model

    from qat.config import QuantSpec
    from qat.dist import Dist
    from qat.distill.losses import teacher_confidence
    from qat.eval.perplexity import perplexity
    from qat.ptq.pipeline import ptq_quantize

    d = Dist()
    ids = torch.randint(0, 256, (20, 32), generator=torch.Generator().manual_seed(0))  # 3 chunks of 8: 2 + 1
    res = {"gamma": teacher_confidence(tiny_model("llama"), ids[:11], 4, d),
           "ppl": perplexity(tiny_model("llama"), ids.flatten(), 32, batch_size=3, progress=False, dist=d)["nll"]}
    for name, spec in SPECS.items():
        model = tiny_model("llama")
        ptq_quantize(model, QuantSpec.from_dict(spec), ids, "gptq", progress=False, dist=d,
                     act_sample_tokens=300)  # 300 tokens: the samples span the first two chunks (1.2 rows of 256)
        res[name] = model.state_dict()
    if rank == 0:
        torch.save(res, out)
    if world > 1:
        dist.destroy_process_group()


def test_ptq_statistics_gamma_and_perplexity_reduced_over_processes_equal_one_process(tmp_path):
    """On 2 processes each one runs its own calibration chunks; the Gram sums (float64, exact for a few float32
    terms), token counts and leading activation samples are reduced, and each linear is quantized by one process and
    broadcast: the PTQ init is bit-identical to one process's. CAKLD's gamma and the perplexity (float64 sums dealt
    over processes) agree to float64 rounding."""
    import torch.multiprocessing as mp

    sys.path.insert(0, str(REPO / "tests"))
    _reduced_worker(0, 1, "", str(tmp_path / "one.pt"))
    mp.spawn(_reduced_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "two.pt")), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for name in SPECS:
        assert one[name].keys() == two[name].keys()
        assert [k for k in one[name] if not torch.equal(one[name][k], two[name][k])] == [], name
    assert two["gamma"] == pytest.approx(one["gamma"], rel=1e-12, abs=0)
    assert two["ppl"] == pytest.approx(one["ppl"], rel=1e-12, abs=0)


# ---- bad input ---------------------------------------------------------------------------------------------------------

def _cli_error(tiny_dir, out, capsys, *extra) -> str:
    from qat.cli import main

    capsys.readouterr()
    rc = main(["distill", *_args(tiny_dir, out, *extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_bad_process_settings_are_one_line_errors(tiny_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    cores = len(os.sched_getaffinity(0))
    assert _cli_error(tiny_dir, out, capsys, "--devices", str(cores + 1)) == (
        f"qat distill: error: devices {cores + 1} is more than the {cores} CPU core(s) this machine has (on CPU each "
        "device is a process)")
    assert _cli_error(tiny_dir, out, capsys, "--strategy", "dpp") == (
        "qat distill: error: unknown strategy 'dpp'; supported: auto, ddp, fsdp")
    with monkeypatch.context() as m:  # what torchrun --nnodes 2 --nproc-per-node 1 puts in each process's environment
        for k, v in dict(TORCHELASTIC_RUN_ID="x", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", RANK="0", LOCAL_RANK="0",
                         GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
            m.setenv(k, v)
        assert _cli_error(tiny_dir, out, capsys) == (
            "qat distill: error: num_nodes 1 x devices 1 does not match the launch environment: torchrun started 2 "
            "process(es), 1 per node (use --num_nodes 2 --devices 1)")
    assert not out.exists() and not Path(str(out) + ".run").exists()


def test_a_world_size_the_resume_cannot_honour_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    odd = ["--stages.2.batch_size", "3"]  # stage 2 draws 3 rows per step: 1 or 3 processes, not 2
    with pytest.raises(KeyError):
        run(recipe_for(tiny_dir, out, *odd), callbacks=[KillAt(5)])
    before = (Path(str(out) + ".run") / "checkpoints" / "last.ckpt").read_bytes()
    assert _cli_error(tiny_dir, out, capsys, *odd, "--devices", "2", "--resume", "last") == (
        "qat distill: error: cannot resume on 2 process(es) (the checkpoint was written by 1): stage 2 (act-clip): "
        "its batch of 3 rows cannot be split evenly over 2 processes (batch_size must be a multiple of the number "
        "of processes)")
    assert (Path(str(out) + ".run") / "checkpoints" / "last.ckpt").read_bytes() == before
