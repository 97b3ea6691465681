"""The staged distillation trainer (qat/distill) on tiny random models: stage order, which parameters each stage may
change, the frozen teacher, the saved student, bit-exact resume, bad input, losses, CBQ/ACBQ windows, disk spill,
binary11 hardening, teacher-generated data, the 8-bit optimizer fallback and the CLI."""
from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO
from lightning.pytorch.callbacks import Callback

pytestmark = pytest.mark.usefixtures("one_thread", "token_cache")  # conftest.py

TINY_RECIPE = REPO / "configs" / "tiny" / "w2-three-stages.yaml"


def recipe_for(tiny_dir, out, *overrides, path=TINY_RECIPE):
    from qat.distill.recipe_cli import load_recipe

    return load_recipe(path, ["--model", str(tiny_dir / "model"), "--data.train_file", str(tiny_dir / "train.txt"),
                              "--eval.file", str(tiny_dir / "val.txt"), "--output", str(out), *overrides])


def run(recipe, **kw):
    from qat.distill.run import run_distill

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_distill(recipe, tensorboard=kw.pop("tensorboard", False), **kw)


class Recorder(Callback):
    """Stage start/end events and a state snapshot at every stage boundary."""

    def __init__(self):
        self.events, self.snapshots, self.steps = [], [], []
        self.grad_scopes = []  # block-wise steps: (trainable names all inside the window, optimizer holds exactly them)

    def on_distill_stage_start(self, trainer, module):
        from qat.distill.params import state_fingerprint

        self.events.append(("start", module.stage_index, module.stage.spec.kind, module.global_step_))
        self.snapshots.append(state_fingerprint(module.student))

    def on_distill_stage_end(self, trainer, module):
        from qat.distill.params import state_fingerprint

        self.events.append(("end", module.stage_index, module.stage.spec.kind, module.global_step_))
        self.snapshots.append(state_fingerprint(module.student))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append(module.global_step_)
        stage = module.stage
        if stage is not None and stage.spec.kind == "blockwise" and stage.opt is not None:
            names = {n for n, p in module.student.named_parameters() if p.requires_grad}
            inside = all(any(n.startswith(pre + ".") for pre in stage.prefixes) for n in names)
            in_opt = {id(p) for g in stage.opt.param_groups for p in g["params"]}
            ids = {id(p) for n, p in module.student.named_parameters() if p.requires_grad}
            self.grad_scopes.append((bool(names) and inside, in_opt == ids))


class KillAt(Callback):
    """Simulates a kill after global step `n` (after that step's checkpoint decision)."""

    def __init__(self, n):
        self.n = n

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.global_step_ == self.n:
            raise KeyError(f"simulated kill at step {self.n}")


@pytest.fixture(scope="module")
def reference_run(tiny_dir, tmp_path_factory):
    """The tiny three-stage recipe (blockwise 3x4 steps, e2e 6 steps, act 3x3 steps), uninterrupted."""
    from qat.models.loading import load_fp_model

    out = tmp_path_factory.mktemp("ref") / "student"
    rec = Recorder()
    teacher_before = load_fp_model(tiny_dir / "model").state_dict()
    res = run(recipe_for(tiny_dir, out), callbacks=[rec], tensorboard=True)
    return {"result": res, "rec": rec, "out": out, "teacher_before": teacher_before}


# ---- schedule, parameters, teacher, saved student ---------------------------------------------------------------------

def test_stage_schedule_order(reference_run):
    rec, res = reference_run["rec"], reference_run["result"]
    assert rec.events == [("start", 0, "blockwise", 0), ("end", 0, "blockwise", 12),
                          ("start", 1, "e2e", 12), ("end", 1, "e2e", 18),
                          ("start", 2, "act", 18), ("end", 2, "act", 27)]
    assert rec.steps == list(range(1, 28))
    hist = res["history"]
    assert [h["stage"] for h in hist] == ["ptq", "block-ap", "e2e-qp", "act-clip"]
    # block-wise: the three decoder blocks, shallow to deep, each one window of 4 steps
    assert [w["blocks"] for w in hist[1]["windows"]] == [[0], [1], [2]]
    assert all(h["val_ppl"] > 1 for h in hist)


def test_only_the_active_window_holds_gradients_and_optimizer_state(reference_run):
    scopes = reference_run["rec"].grad_scopes
    assert len(scopes) == 11 and all(a and b for a, b in scopes)  # 12 block-wise steps; after the last, none


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_only_declared_parameters_change(reference_run):
    snaps = reference_run["rec"].snapshots
    keys = snaps[0].keys()
    latent_wq = {k for k in keys if k.endswith("proj.weight") or ".weight_quantizer." in k}
    s0 = _changed(snaps[0], snaps[1])  # block-ap: latent + wq of every block
    assert s0 and s0 <= latent_wq
    assert any(k.endswith("proj.weight") for k in s0) and any(k.endswith("weight_quantizer.scale") for k in s0)
    assert any(k.endswith("weight_quantizer.zero") for k in s0)
    s1 = _changed(snaps[2], snaps[3])  # e2e-qp: step sizes with frozen codes, then latent := (codes - z) * s
    assert any(k.endswith(".weight_quantizer.scale") for k in s1)
    assert all(k.endswith((".weight_quantizer.scale", "proj.weight")) for k in s1)
    s2 = _changed(snaps[4], snaps[5])  # act-clip: activation clipping logits only
    assert s2 and all(".act_quantizer." in k for k in s2)
    # nothing changes between stages, and norms/embeddings never change
    assert not _changed(snaps[1], snaps[2]) and not _changed(snaps[3], snaps[4])
    assert not {k for k in _changed(snaps[0], snaps[5]) if "norm" in k or "embed" in k}


def test_frozen_codes_train_scales_that_lsq_cannot(reference_run):
    """A latent weight on its own grid (GPTQ init) gives LSQ's step-size gradient round(w/s) - w/s = 0 exactly;
    frozen codes give q - z. After the stage the latent is re-baked, so the ordinary forward is the trained model."""
    from qat.config import QuantSpec
    from qat.distill.codes import FrozenCodes
    from qat.nn import QuantLinear, quant_linears

    torch.manual_seed(0)
    lin = QuantLinear.from_linear(torch.nn.Linear(64, 8), QuantSpec.from_dict({"weight": {"bits": 2, "group_size": 32}}))
    with torch.no_grad():
        lin.weight.copy_(lin.weight_quantizer.init_from(lin.weight))
        lin.weight.copy_(lin.weight_quantizer(lin.weight))  # on the grid, as GPTQ leaves it
    x = torch.randn(4, 64)
    lin(x).pow(2).sum().backward()
    lsq = lin.weight_quantizer.scale.grad.abs().max()  # only float rounding of (q - z) * s / s is left
    lin.zero_grad()
    fc = FrozenCodes({"lin": lin}).attach()
    before = lin(x).detach()
    lin(x).pow(2).sum().backward()
    frozen = lin.weight_quantizer.scale.grad.abs()
    assert torch.count_nonzero(frozen) == frozen.numel() and lsq < 1e-4 * frozen.mean()
    with torch.no_grad():
        lin.weight_quantizer.scale.mul_(1.3)  # a large step: LSQ would re-round the old latent differently
    trained = lin(x).detach()
    assert not torch.equal(trained, before)
    fc.finish()
    assert torch.equal(lin(x).detach(), trained)
    # the tiny run's e2e stage used freeze_codes: every latent sits exactly on its trained grid
    for m in quant_linears(reference_run["result"]["module"].student).values():
        assert torch.equal(m.weight_quantizer(m.weight).detach(), m.weight.detach())


def test_teacher_never_changes(reference_run):
    teacher = reference_run["result"]["module"].teacher
    before = reference_run["teacher_before"]
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_saved_student_reloads_to_same_logits(reference_run):
    from qat.checkpoint import load_student, read_student_meta

    out = reference_run["out"]
    student = reference_run["result"]["module"].student.eval()
    loaded, meta = load_student(out)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, loaded(ids).logits)
    assert [h["stage"] for h in meta["history"]] == ["ptq", "block-ap", "e2e-qp", "act-clip"]
    assert read_student_meta(out)["spec"]["weight"]["bits"] == 2
    assert (out / "distill_summary.png").stat().st_size > 10_000
    assert list((Path(reference_run["result"]["run_dir"]) / "tb").glob("events.out.tfevents.*"))


# ---- resume -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kill_at, every, expect", [
    (10, 3, {"global_step": 9, "stage_index": 0, "window": 2, "step_in_window": 1}),  # mid window 3 of stage 0
    (16, 5, {"global_step": 15, "stage_index": 1, "step": 3}),  # mid e2e stage
])
def test_resume_mid_stage_is_bit_exact(reference_run, tiny_dir, tmp_path, kill_at, every, expect):
    """Killed after step `kill_at` (last checkpoint at step expect[global_step]), resumed with --resume last: the final
    student equals the uninterrupted run's bit for bit. Exact because everything a step depends on is restored or
    recomputed deterministically: weights and optimizer/scheduler state from the checkpoint, the batch order from
    (seed, epoch, cursor), the block-wise caches by replaying the same fixed row chunks through the restored prefix."""
    out = tmp_path / "student"
    recipe = recipe_for(tiny_dir, out, "--checkpoint_every", str(every))
    with pytest.raises(KeyError, match=f"simulated kill at step {kill_at}"):
        run(recipe, callbacks=[KillAt(kill_at)])
    assert not out.exists()
    last = json.loads((Path(str(out) + ".run") / "checkpoints" / "last.json").read_text())
    assert last["global_step"] == expect["global_step"]

    rec = Recorder()
    res = run(recipe_for(tiny_dir, out, "--checkpoint_every", str(every)), resume="last", callbacks=[rec])
    module = res["module"]
    r = module.resumed_from
    assert r["global_step"] == expect["global_step"] and r["stage_index"] == expect["stage_index"]
    for k in ("window", "step_in_window", "step"):
        if k in expect:
            assert r["stage_state"][k] == expect[k]
    assert rec.steps[0] == expect["global_step"] + 1 and rec.steps[-1] == 27  # continued, not restarted

    ref = reference_run["result"]["module"].student.state_dict()
    got = module.student.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ref_hist = reference_run["result"]["history"]
    assert [h["val_ppl"] for h in res["history"]] == [h["val_ppl"] for h in ref_hist]


def test_resume_refuses_a_fresh_start_over_an_existing_run(reference_run, tiny_dir, tmp_path):
    out = tmp_path / "student"
    with pytest.raises(KeyError):
        run(recipe_for(tiny_dir, out), callbacks=[KillAt(2)])
    with pytest.raises(FileExistsError, match="already holds a checkpoint; pass --resume last"):
        run(recipe_for(tiny_dir, out))
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        run(recipe_for(tiny_dir, tmp_path / "other"), resume="last")


# ---- bad input --------------------------------------------------------------------------------------------------------

def test_unknown_stage_kind_and_loss(tiny_dir, tmp_path):
    from qat.distill.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"stage 0 \(block-ap\): unknown stage kind 'blockwize'"):
        recipe_for(tiny_dir, tmp_path / "o", "--stages.0.kind", "blockwize")
    with pytest.raises(RecipeError, match=r"stage 1 \(e2e-qp\): unknown loss 'mse' for an end-to-end objective"):
        recipe_for(tiny_dir, tmp_path / "o", "--stages.1.loss.kind", "mse")
    with pytest.raises(RecipeError, match=r"stage 0 \(block-ap\): unknown loss 'l1' for a block-wise objective"):
        recipe_for(tiny_dir, tmp_path / "o", "--stages.0.loss.kind", "l1")
    with pytest.raises(RecipeError, match="unknown parameter class 'weights'"):
        recipe_for(tiny_dir, tmp_path / "o", "--stages.0.train", "[weights]")
    with pytest.raises(RecipeError, match="act stages keep the weights frozen"):
        recipe_for(tiny_dir, tmp_path / "o", "--stages.2.train", "[act, latent]")
    with pytest.raises(RecipeError, match=r"stage 1 \(e2e-qp\): act_temperature only applies to act stages"):
        recipe_for(tiny_dir, tmp_path / "o", "--stages.1.act_temperature", "[0.1, 0.01]")
    with pytest.raises(RecipeError, match=r"stage 0 \(block-ap\): objective only applies to act stages"):
        recipe_for(tiny_dir, tmp_path / "o", "--stages.0.objective", "e2e")
    with pytest.raises(RecipeError, match="freeze_codes holds the integer codes fixed"):
        recipe_for(tiny_dir, tmp_path / "o", "--stages.1.train", "[latent, wq]")
    with pytest.raises(RecipeError, match="freeze_codes needs the uniform format"):
        recipe_for(tiny_dir, tmp_path / "o", "--quant.weight.format", "binary11")
    with pytest.raises(RecipeError, match="need window >= 1 and 0 <= overlap < window"):
        recipe_for(tiny_dir, tmp_path / "o", "--stages.0.window", "2", "--stages.0.overlap", "2")
    with pytest.raises(RecipeError, match="unknown key"):
        from qat.distill.recipe_cli import recipe_from_dict

        recipe_from_dict({"quant": {}, "stages": [{"kind": "e2e", "steps": 1, "stepz": 3}]})


def test_cli_prints_one_error_line_before_any_work(tiny_dir, tmp_path, capsys):
    from qat.cli import main

    rc = main(["distill", "--config", str(TINY_RECIPE), "--model", str(tiny_dir / "model"), "--output",
               str(tmp_path / "o"), "--data.train_file", str(tiny_dir / "train.txt"), "--stages.1.kind", "e3e"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [("qat distill: error: stage 1 (e2e-qp): unknown stage kind 'e3e'; supported: "
                                "blockwise, e2e, act")]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()


def test_train_entry_matching_nothing_fails_before_work(tiny_dir, tmp_path):
    from qat.distill.recipe import RecipeError

    r = recipe_for(tiny_dir, tmp_path / "o", "--stages.0.train", "[wq.alpha]", "--stages.0.optim.lr", "{}")
    with pytest.raises(RecipeError, match=r"stage 0 \(block-ap\): train entry 'wq.alpha' matches no parameter"):
        run(r)
    assert not (tmp_path / "o.run").exists()


def test_student_checkpoint_of_another_format_is_refused(tiny_dir, tmp_path):
    from qat.checkpoint import save_student
    from qat.config import QuantSpec
    from qat.distill.recipe import RecipeError
    from qat.models.loading import load_fp_model, load_tokenizer
    from qat.nn import quantize_model

    model = load_fp_model(tiny_dir / "model")
    spec = QuantSpec.from_dict({"weight": {"format": "uniform", "bits": 4, "group_size": 32}})
    quantize_model(model, spec)
    save_student(model, load_tokenizer(tiny_dir / "model"), spec, tmp_path / "ptq-w4")
    r = recipe_for(tiny_dir, tmp_path / "o", "--student", str(tmp_path / "ptq-w4"))
    with pytest.raises(RecipeError, match=r"recipe quant W2g32A4 does not match the PTQ student .*\(W4g32\)"):
        run(r)
    assert not (tmp_path / "o.run").exists()
    # the matching format starts from the given student (no PTQ)
    r = recipe_for(tiny_dir, tmp_path / "o", "--student", str(tmp_path / "ptq-w4"), "--quant.weight.bits", "4",
                   "--quant.act.bits", "16", "--stages", "[{kind: e2e, steps: 2, train: [wq]}]")
    res = run(r)
    assert res["global_steps"] == 2 and json.loads((tmp_path / "o" / "qat_student.json").read_text())["init"] == {
        "student": str(tmp_path / "ptq-w4")}


class PoisonAt(Callback):
    """Writes NaN into a norm weight after step n, so the next step's loss is NaN."""

    def __init__(self, n):
        self.n = n

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.global_step_ == self.n:
            with torch.no_grad():
                for name, p in module.student.named_parameters():
                    if "layernorm" in name:
                        p.fill_(float("nan"))


def test_nan_loss_stops_with_location_and_keeps_last_good_checkpoint(tiny_dir, tmp_path):
    from qat.distill.stage import NonFiniteLossError

    out = tmp_path / "o"
    r = recipe_for(tiny_dir, out, "--checkpoint_every", "100")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at stage 0 \(block-ap, blockwise\) "
                                                 r"window 2/3 \[block 1\] step 2/4; training stopped, kept the last "
                                                 r"good checkpoint .*last\.ckpt"):
        run(r, callbacks=[PoisonAt(5)])
    assert not out.exists()
    ckpt = torch.load(Path(str(out) + ".run") / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["qat_distill"]["global_step"] == 4  # the window-1 boundary, before the poison
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# ---- CLI --------------------------------------------------------------------------------------------------------------

def test_cli_override_syntax():
    from qat.distill.recipe_cli import load_recipe

    r = load_recipe(TINY_RECIPE, ["--model", "m", "--output", "o", "--data.train_file", "t.txt",
                                  "--stages.0.steps", "7", "--stages.1.loss.kind=cakld", "--stages.batch_size", "2",
                                  "--stages.0.optim.lr.wq", "3e-3", "--quant.weight.group_size", "64",
                                  "--ptq.method", "gptq"])
    assert r.stages[0].steps == 7 and r.stages[1].loss.kind == "cakld" and r.stages[2].batch_size == 2
    assert r.stages[0].optim.lr == {"latent": 1e-3, "wq": 3e-3}
    assert r.quant.weight.group_size == 64 and r.quant.weight.bits == 2 and r.ptq.method == "gptq"
    # a format switch takes that format's default bits (the parser does not inject another format's default)
    assert load_recipe(TINY_RECIPE, ["--quant.weight.format", "binary11", "--stages.1.freeze_codes", "false"]
                       ).quant.weight.bits == 2
    # a mapping merges into the file's (the tiny recipe's A4 stays)
    assert load_recipe(TINY_RECIPE, ["--quant", "{weight: {format: vq}}", "--stages.1.freeze_codes", "false"]
                       ).quant.describe() == "VQ2A4"
    from qat.distill.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"--stages.5.steps: the recipe has 3 stage\(s\)"):
        load_recipe(TINY_RECIPE, ["--stages.5.steps", "1"])
    with pytest.raises(RecipeError, match="unknown stage key 'stepz'"):
        load_recipe(TINY_RECIPE, ["--stages.0.stepz", "1"])


def test_print_config_shows_the_recipe_the_run_would_use(tmp_path, capsys):
    """--print_config includes the per-stage overrides (jsonargparse's own action printed the recipe without them),
    and what it prints loads back as the same recipe."""
    from qat.distill.recipe_cli import load_recipe, parse_args

    args = ["--config", str(TINY_RECIPE), "--stages.1.optim.lr", "{wq.scale: 2.0e-4}", "--stages.0.steps", "9"]
    with pytest.raises(SystemExit) as e:
        parse_args([*args, "--print_config"])
    assert e.value.code == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    r = load_recipe(printed)
    assert r.stages[1].optim.lr == {"wq.scale": 2.0e-4} and r.stages[0].steps == 9
    assert r.to_dict() == parse_args(args)[0].to_dict()


def test_cli_runs_a_recipe_end_to_end(tiny_dir, tmp_path, capsys):
    from qat.cli import main

    rc = main(["distill", "--config", str(TINY_RECIPE), "--model", str(tiny_dir / "model"), "--output",
               str(tmp_path / "o"), "--data.train_file", str(tiny_dir / "train.txt"), "--quant.act.bits", "16",
               "--stages", "[{kind: blockwise, steps: 2, batch_size: 4}]", "--eval.file", str(tiny_dir / "val.txt")])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["steps"] == 6 and set(line["val_ppl"]) == {"ptq", "blockwise0"}


def test_the_same_distill_command_twice_gives_the_same_student(tiny_dir, tmp_path, capsys):
    """Reproducibility (docs/RESULTS.md): the recipe of the shipped w2g64 default in miniature (RTN, teacher-sampled
    half of the data, SignRound block-wise, E2E-QP) run twice into separate directories, so the teacher samples are
    drawn again, not read from a cache: the same perplexities and bit-identical student tensors."""
    from safetensors.torch import load_file

    from qat.checkpoint import STUDENT_WEIGHTS
    from qat.cli import main

    def args(out):
        return ["distill", "--config", str(TINY_RECIPE), "--model", str(tiny_dir / "model"), "--output", str(out),
                "--data.train_file", str(tiny_dir / "train.txt"), "--eval.file", str(tiny_dir / "val.txt"),
                "--quant.act.bits", "16", "--data.source", "mixed", "--data.teacher_fraction", "0.5",
                "--data.prompt_len", "4", "--data.gen_batch_size", "4",
                "--stages", "[{kind: blockwise, rounding: {method: signround}, loss: {kind: cosine}, steps: 3, "
                            "batch_size: 4}, {kind: e2e, train: [wq.scale], freeze_codes: true, "
                            "optim: {lr: {wq.scale: 1.0e-3}}, loss: {kind: kl}, steps: 3, batch_size: 2}]"]

    lines = []
    for out in (tmp_path / "a", tmp_path / "b"):
        assert main(args(out)) == 0
        lines.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
        assert len(list((out.parent / (out.name + ".run") / "data").glob("teacher-samples-*.pt"))) == 1
    assert lines[0]["val_ppl"] == lines[1]["val_ppl"] and set(lines[0]["val_ppl"]) == {"ptq", "blockwise0", "e2e1"}
    a, b = (load_file(o / STUDENT_WEIGHTS) for o in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


# ---- losses -----------------------------------------------------------------------------------------------------------

def test_token_mse_is_not_dominated_by_the_sink_token():
    from qat.distill.losses import block_loss

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 16, 32, generator=g)
    t[:, 0] *= 150  # massive activation at position 0
    s = t + 0.1 * torch.randn(2, 16, 32, generator=g) * t.pow(2).mean(-1, keepdim=True).sqrt()  # 10% error per token
    s_bad_sink = s.clone()
    s_bad_sink[:, 1:] = t[:, 1:] + 0.3 * torch.randn(2, 15, 32, generator=g)  # 3x worse on the ordinary tokens
    # plain MSE barely sees the ordinary tokens; token_mse weighs every position alike
    mse_ratio = block_loss(s_bad_sink, t, "mse") / block_loss(s, t, "mse")
    tok_ratio = block_loss(s_bad_sink, t, "token_mse") / block_loss(s, t, "token_mse")
    assert mse_ratio < 1.2 and tok_ratio > 5
    # sink_weight=0 leaves position 0 out entirely
    s2 = s.clone()
    s2[:, 0] += 1e6
    assert torch.equal(block_loss(s2, t, "mse", sink_weight=0.0), block_loss(s, t, "mse", sink_weight=0.0))
    expect = ((s[:, 1:] - t[:, 1:]) ** 2).mean()
    torch.testing.assert_close(block_loss(s, t, "mse", sink_weight=0.0), expect)


def test_logit_losses():
    from qat.distill.losses import cakld, forward_kl, logits_loss, reverse_kl

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    assert float(forward_kl(a, a)) == pytest.approx(0, abs=1e-6)
    pa, pb = a.softmax(-1), b.softmax(-1)
    torch.testing.assert_close(forward_kl(a, b), (pb * (pb.log() - pa.log())).sum(-1).mean())
    torch.testing.assert_close(reverse_kl(a, b), (pa * (pa.log() - pb.log())).sum(-1).mean())
    torch.testing.assert_close(cakld(a, b, 1.0), forward_kl(a, b))
    torch.testing.assert_close(cakld(a, b, 0.0), reverse_kl(a, b))
    torch.testing.assert_close(cakld(a, b, 0.3), 0.3 * forward_kl(a, b) + 0.7 * reverse_kl(a, b))
    ce = torch.nn.functional.cross_entropy(a[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(logits_loss("ce", a, None, ids), ce)
    with pytest.raises(ValueError, match="unknown end-to-end loss 'js'"):
        logits_loss("js", a, b, ids)


# ---- windows, units, caches, formats, data ----------------------------------------------------------------------------

def test_cbq_windows_and_acbq_units():
    from qat.distill.blockwise import make_units, make_windows

    assert make_windows(5, 1, 0) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert make_windows(5, 2, 1) == [(0, 2), (1, 3), (2, 4), (3, 5)]
    assert make_windows(5, 3, 1) == [(0, 3), (2, 5)]
    assert make_windows(6, 3, 0) == [(0, 3), (3, 6)]
    assert make_units(2, "acbq") == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]


BLOCKWISE_ONLY = "[{kind: blockwise, name: bw, steps: 3, batch_size: 4, optim: {default_lr: 1.0e-3}}]"


def test_cbq_window_with_overlap_and_disk_spill_are_exact(tiny_dir, tmp_path):
    """CBQ (window 2, overlap 1, homologous) trains windows [0,1], [1,2]; spilling every cache to disk (spill_mb 0)
    gives bit-identical results to keeping them in memory."""
    outs = []
    for spill in ("2048", "0"):
        r = recipe_for(tiny_dir, tmp_path / f"o{spill}", "--quant.act.bits", "16", "--eval.file", "null",
                       "--stages", BLOCKWISE_ONLY, "--stages.0.window", "2", "--stages.0.overlap", "1",
                       "--stages.0.loss.homologous", "true", "--stages.0.spill_mb", spill)
        res = run(r)
        outs.append(res)
        assert [w["units"] for w in res["history"][-1]["windows"]] == [[0, 2], [1, 3]]
    a, b = (o["module"].student.state_dict() for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_acbq_units_with_cross_unit_term(tiny_dir, tmp_path):
    r = recipe_for(tiny_dir, tmp_path / "o", "--eval.file", "null", "--stages", BLOCKWISE_ONLY,
                   "--stages.0.units", "acbq", "--stages.0.act_quant", "true", "--stages.0.train", "[wq, act]",
                   "--stages.0.loss.cross_unit_weight", "0.5", "--stages.0.loss.cosine_weight", "0.1")
    rec = Recorder()
    res = run(r, callbacks=[rec])
    windows = res["history"][-1]["windows"]
    assert [w["units"] for w in windows] == [[i, i + 1] for i in range(6)]  # attn0, mlp0, attn1, ...
    changed = _changed(rec.snapshots[0], rec.snapshots[1])
    assert any(".act_quantizer." in k for k in changed)  # activation quantizers ran (act_quant true) and trained
    assert all(".act_quantizer." in k or ".weight_quantizer." in k for k in changed)


def test_binary11_bitmaps_are_polarized_and_hardened(tiny_dir, tmp_path, monkeypatch):
    """Polarization drives the relaxed bitmaps to {0, 1}: just before hardening, mean |2 G_FP - 1| is > 0.99 with it
    and < 0.95 in the same run without it (init 0.9; the bitmap's lr is raised so that 3 steps can move it). Hardening
    then snaps every bitmap to {0, 1} either way."""
    from qat.nn import quant_linears
    from qat.quantizers.binary import Binary11Quantizer

    before_harden = []
    harden = Binary11Quantizer.harden

    def record_then_harden(q):
        before_harden.append(q.relaxed_bitmap().detach().clone())
        harden(q)

    monkeypatch.setattr(Binary11Quantizer, "harden", record_then_harden)
    polarity = {}
    for weight in (0.0, 1.0):
        before_harden.clear()
        r = recipe_for(tiny_dir, tmp_path / f"o{weight}", "--quant", "{weight: {format: binary11, group_size: 32}}",
                       "--eval.file", "null", "--stages", BLOCKWISE_ONLY, "--stages.0.train",
                       "[latent, wq.bitmap_fp, wq]", "--stages.0.optim", "{default_lr: 1.0e-3, lr: {wq.bitmap_fp: 0.05}}",
                       "--stages.0.polarize.weight", str(weight))
        qs = [m.weight_quantizer for m in quant_linears(run(r)["module"].student).values()]
        assert qs and len(before_harden) == len(qs) and all(bool(q.hardened) for q in qs)
        assert all(((q.bitmap_fp == 0) | (q.bitmap_fp == 1)).all() for q in qs)
        polarity[weight] = float(torch.cat([(2 * g - 1).abs().flatten() for g in before_harden]).mean())
    assert polarity[1.0] > 0.99 and polarity[0.0] < 0.95, polarity


def test_teacher_generated_data_is_cached(tiny_dir, tmp_path):
    from qat.distill.data import teacher_windows
    from qat.distill.recipe import DataSpec
    from qat.models.loading import load_fp_model, load_tokenizer

    teacher, tok = load_fp_model(tiny_dir / "model"), load_tokenizer(tiny_dir / "model")
    spec = DataSpec(source="teacher", train_file=str(tiny_dir / "train.txt"), seq_len=24, num_samples=5,
                    prompt_len=4, gen_batch_size=2)
    a = teacher_windows(spec, teacher, tok, tiny_dir / "model", 0, tmp_path, progress=False)
    files = list(tmp_path.glob("teacher-samples-*.pt"))
    assert a.shape == (5, 24) and len(files) == 1
    b = teacher_windows(spec, teacher, tok, tiny_dir / "model", 0, tmp_path, progress=False)
    assert torch.equal(a, b)
    # the prompts are corpus tokens; the continuations differ from the corpus (sampled)
    from qat.distill.data import corpus_windows

    assert torch.equal(a[:, :4], corpus_windows(spec, tok, 5, 4, 0))
    # and a run trains on them
    r = recipe_for(tiny_dir, tmp_path / "o", "--quant.act.bits", "16", "--eval.file", "null",
                   "--data.source", "teacher", "--data.seq_len", "24", "--data.num_samples", "5",
                   "--data.prompt_len", "4", "--data.gen_batch_size", "2", "--data.cache_dir", str(tmp_path),
                   "--stages", "[{kind: e2e, steps: 2, batch_size: 2, loss: {kind: cakld}}]")
    res = run(r)
    assert res["global_steps"] == 2 and len(list(tmp_path.glob("teacher-samples-*.pt"))) == 1
    assert 0 < res["module"].history[-1]["final_loss"]


def test_adamw8bit_falls_back_with_a_warning(monkeypatch):
    from qat.distill import optim
    from qat.distill.recipe import OptimSpec

    p = torch.nn.Parameter(torch.zeros(8))
    monkeypatch.setattr(optim, "bnb_usable", lambda device_type: "RuntimeError: no CPU backend")
    with pytest.warns(UserWarning, match=r"bitsandbytes 8-bit AdamW cannot run on cpu \(RuntimeError: no CPU"):
        opt = optim.build_optimizer([{"params": [p], "lr": 1e-3}], OptimSpec(name="adamw8bit"), torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW


def test_lr_schedule():
    from qat.distill.optim import lr_factor
    from qat.distill.recipe import OptimSpec

    cos = OptimSpec(schedule="cosine", warmup=2, min_lr_ratio=0.1)
    f = [lr_factor(i, 10, cos) for i in range(10)]
    assert f[:2] == [1 / 3, 2 / 3] and f[2] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(f[2:]))
    assert [lr_factor(i, 4, OptimSpec(schedule="constant")) for i in range(4)] == [1.0] * 4


# ---- a stage kind added from outside qat/ (the registry, qat/distill/stage.py) ---------------------------------------

def _toy_stage_class():
    """A whole-model stage that trains the weight quantizers on the MSE between student and teacher logits: everything
    a kind needs lives on its class (CONTRIBUTING.md). Registered by the fixture below, unregistered after the test."""
    import torch.nn.functional as F

    from qat.distill.stage import Stage

    class ToyLogitMSEStage(Stage):
        kind = "toy"
        default_train = ("wq",)

        @classmethod
        def losses(cls, spec):
            return ("mse",)

        def __init__(self, ctx, spec, index):
            super().__init__(ctx, spec, index)
            self.total_steps = ctx.plan.stages[index].total

        def begin(self, state):
            self.ctx.act_bypass.set(self.spec.acts_on)
            self.make_trainable(None, self.total_steps)
            if state:
                self.step = int(state["step"])
                self.load_opt_state(state)

        def train_step(self, rows):
            ctx = self.ctx
            x = ctx.train_ids[rows.cpu()].to(ctx.device)
            with torch.no_grad():
                target = ctx.teacher(input_ids=x, use_cache=False).logits
            loss = F.mse_loss(ctx.student(input_ids=x, use_cache=False).logits, target)
            value = self.optimize(loss)
            self.step += 1
            return {"loss": value, "tokens": int(x.numel())}

        def end(self):
            self.release()

        def state_dict(self):
            return {"step": self.step, **(self.opt_state() if not self.done else {})}

        def where(self):
            return f"{self.label} step {min(self.step + 1, self.total_steps)}/{self.total_steps}"

    return ToyLogitMSEStage


@pytest.fixture
def toy_kind():
    from qat.distill.stage import _KINDS, register_stage, stage_kinds

    cls = register_stage(_toy_stage_class())
    assert stage_kinds()["toy"] is cls
    yield cls
    _KINDS.pop("toy")


def test_a_stage_kind_registered_from_a_test_runs_and_resumes_bit_exactly(toy_kind, tiny_dir, tmp_path, capsys):
    """`qat distill` runs a kind it has never heard of, registered from this module alone: the recipe validates it
    by its class (default train, accepted losses), the module builds it from the registry, and a run killed mid-stage
    resumes through `--resume last` to the same student, bit for bit."""
    from safetensors.torch import load_file

    from qat.checkpoint import STUDENT_WEIGHTS
    from qat.cli import main
    from qat.distill.recipe import RecipeError

    stages = "[{kind: toy, name: toy, steps: 6, batch_size: 4, optim: {default_lr: 1.0e-2}}]"

    def args(out):
        return ["--config", str(TINY_RECIPE), "--model", str(tiny_dir / "model"), "--output", str(out),
                "--data.train_file", str(tiny_dir / "train.txt"), "--eval.file", str(tiny_dir / "val.txt"),
                "--quant.act.bits", "16", "--stages", stages, "--checkpoint_every", "2"]

    r = recipe_for(tiny_dir, tmp_path / "unused", "--quant.act.bits", "16", "--stages", stages)
    assert r.stages[0].train == ["wq"] and r.stages[0].loss.kind == "mse"  # the kind's defaults
    with pytest.raises(RecipeError, match=r"unknown loss 'kl' .*supported: mse"):
        recipe_for(tiny_dir, tmp_path / "unused", "--quant.act.bits", "16", "--stages",
                   "[{kind: toy, steps: 2, loss: {kind: kl}}]")

    assert main(["distill", *args(tmp_path / "a")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["steps"] == 6 and set(line["val_ppl"]) == {"ptq", "toy"}
    assert line["val_ppl"]["toy"] != line["val_ppl"]["ptq"]  # the stage trained

    b = tmp_path / "b"
    with pytest.raises(KeyError, match="simulated kill at step 3"):
        run(recipe_for(tiny_dir, b, *args(b)[2:]), callbacks=[KillAt(3)])
    last = json.loads((Path(str(b) + ".run") / "checkpoints" / "last.json").read_text())
    assert last["global_step"] == 2  # mid-stage
    assert main(["distill", *args(b), "--resume", "last"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["val_ppl"] == line["val_ppl"]
    want, got = load_file(tmp_path / "a" / STUDENT_WEIGHTS), load_file(b / STUDENT_WEIGHTS)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
