"""Never a silently wrong answer, never a user's file lost (docs/RELIABILITY.md): one test per numbered case of the
reliability issue, the checkpoint crash-safety of `qat distill`, and the tracebacks that became one-line errors.
Tiny random models throughout (the real model: the slow tests at the end)."""
from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from conftest import _byte_tokenizer
from test_distill import TINY_RECIPE, KillAt, recipe_for, run

from qat.cli import main

pytestmark = pytest.mark.usefixtures("one_thread", "token_cache")  # conftest.py


def cli(capsys, *argv) -> tuple[int, list[str], str]:
    """(exit status, the CLI's own stderr lines, stdout) of an in-process `qat ...`."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.startswith("qat ")], cap.out


def one_error(capsys, pattern: str, *argv) -> str:
    rc, err, _ = cli(capsys, *argv)
    assert rc == 2 and len(err) == 1, (rc, err)
    assert re.search(pattern, err[0]), err[0]
    return err[0]


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to show nothing was lost or changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, wikitext_valid):
    """A tiny Llama directory (byte tokenizer), train/val text, a W2g32 RTN student of it and its float32 export."""
    d = tmp_path_factory.mktemp("world")
    model = tiny_model("llama")
    model.save_pretrained(d / "model")
    _byte_tokenizer().save_pretrained(d / "model")
    text = wikitext_valid.read_text(encoding="utf-8")
    (d / "train.txt").write_text(text[:20000], encoding="utf-8")
    (d / "val.txt").write_text(text[20000:30000], encoding="utf-8")
    assert main(["ptq", "--model", str(d / "model"), "--method", "rtn", "--bits", "2", "--group-size", "32",
                 "--output", str(d / "student"), "--device", "cpu"]) == 0
    assert main(["export", "--student", str(d / "student"), "--output", str(d / "export"), "--dtype", "float32"]) == 0
    return d


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def eval_json(capsys, model_dir, data) -> dict:
    rc, err, out = cli(capsys, "eval", "--model", model_dir, "--data", data, "--seq-len", "64", "--json",
                       "--device", "cpu")
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def distill_argv(world, out, *extra):
    return ["distill", "--config", TINY_RECIPE, "--model", world / "model", "--data.train_file", world / "train.txt",
            "--eval.file", world / "val.txt", "--output", out, "--quant.act.bits", "16",
            "--stages", "[{kind: blockwise, steps: 2, batch_size: 4}]", *extra]


# ---- 1. eval on a native export ------------------------------------------------------------------------------------

def test_1_eval_on_a_native_export_equals_eval_on_its_student(world, capsys):
    student = eval_json(capsys, world / "student", world / "val.txt")
    export = eval_json(capsys, world / "export", world / "val.txt")
    assert export["perplexity"] == pytest.approx(student["perplexity"], rel=1e-4)
    assert export["bits_per_weight"] == student["bits_per_weight"] == pytest.approx(2.75)
    assert student["perplexity"] < 1000  # a real model's perplexity (random tiny model), not a random-init blow-up


# ---- 2. a weights file that lacks a tensor -----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["eval", "ptq", "distill"])
def test_2_a_missing_tensor_is_refused_not_randomly_initialised(world, tmp_path, capsys, command):
    bad = copy(world / "model", tmp_path / "model")
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    argv = {
        "eval": ["eval", "--model", bad, "--data", world / "val.txt", "--seq-len", "64"],
        "ptq": ["ptq", "--model", bad, "--method", "rtn", "--bits", "2", "--group-size", "32", "--output",
                tmp_path / "o", "--device", "cpu"],
        "distill": [*distill_argv(world, tmp_path / "o"), "--model", bad],
    }[command]
    one_error(capsys, rf"^qat {command}: error: .*model: the weights lack tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
              r"; it would be randomly initialised$", *argv)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()


# ---- 3. a student whose spec disagrees with its tensors ----------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 3])
def test_3_a_student_spec_that_disagrees_with_its_tensors_is_refused(world, tmp_path, capsys, bits):
    s = copy(world / "student", tmp_path / "student")
    meta = json.loads((s / "qat_student.json").read_text())
    meta["spec"]["weight"]["bits"] = bits
    (s / "qat_student.json").write_text(json.dumps(meta))
    pattern = (rf"qat_student\.json: spec W{bits}g32 disagrees with the spec student\.safetensors was written with "
               r"\(W2g32: weight\.bits 2 -> " + str(bits) + r"\)$")
    one_error(capsys, "^qat eval: error: .*" + pattern, "eval", "--model", s, "--data", world / "val.txt",
              "--seq-len", "64")
    one_error(capsys, "^qat export: error: .*" + pattern, "export", "--student", s, "--output", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_3_zero_points_outside_the_grid_of_a_student_without_embedded_spec(world, tmp_path, capsys):
    """Students written before the spec was embedded: the value ranges still catch a spec that cannot hold them."""
    s = copy(world / "student", tmp_path / "student")
    sd = load_file(s / "student.safetensors")
    sd["model.layers.0.mlp.down_proj.weight_quantizer.zero"][0, 0] = 7.0  # a 3-bit zero point in a 2-bit student
    save_file(sd, str(s / "student.safetensors"), metadata={"format": "pt"})  # no qat_spec metadata
    one_error(capsys, r"student\.safetensors: model\.layers\.0\.mlp\.down_proj\.weight_quantizer\.zero ranges over "
                      r"\[.*, 7\], outside the 2-bit grid \[0, 3\], which W2g32 cannot hold",
              "eval", "--model", s, "--data", world / "val.txt", "--seq-len", "64")


# ---- 4. resume with a changed recipe -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_run(world, tmp_path_factory):
    """The tiny three-stage recipe killed after step 10 (checkpoints every 3 steps: last at 9, prev at 6)."""
    out = tmp_path_factory.mktemp("killed") / "student"
    with pytest.raises(KeyError, match="simulated kill"):
        run(recipe_for(world, out, "--checkpoint_every", "3"), callbacks=[KillAt(10)])
    return out


@pytest.fixture(scope="module")
def reference_student(world, tmp_path_factory):
    """The same recipe uninterrupted: the student every resume must reproduce bit for bit."""
    res = run(recipe_for(world, tmp_path_factory.mktemp("ref") / "student", "--checkpoint_every", "3"))
    return res["module"].student.state_dict()


def run_copy(killed_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "student"
    shutil.copytree(Path(str(killed_run) + ".run"), Path(str(out) + ".run"))
    return out


@pytest.mark.parametrize("override, named", [
    (["--quant.weight.bits", "4"], r"quant\.weight\.bits \(2 -> 4\)"),
    (["--stages.0.steps", "2"], r"stages\.0\.steps \(4 -> 2\)"),  # fewer steps than the run already took
])
def test_4_resume_refuses_a_changed_recipe_and_keeps_recipe_json(world, killed_run, tmp_path, override, named):
    from qat.distill.recipe import RecipeError

    out = run_copy(killed_run, tmp_path)
    run_dir = Path(str(out) + ".run")
    before = tree(run_dir)
    with pytest.raises(RecipeError, match=r"--resume: the run .*recipe\.json\) was started with a different recipe "
                                          r"or input: " + named):
        run(recipe_for(world, out, "--checkpoint_every", "3", *override), resume="last")
    assert tree(run_dir) == before  # recipe.json and the checkpoints untouched
    assert not out.exists()


def test_4_resume_refuses_changed_training_text(world, killed_run, tmp_path):
    """An input is compared by content: the same path holding other text is a different run."""
    from qat.distill.recipe import RecipeError

    out = run_copy(killed_run, tmp_path)
    text = tmp_path / "train.txt"
    text.write_text((world / "train.txt").read_text()[::-1])
    with pytest.raises(RecipeError, match=r"different recipe or input: data\.train_file \(content differs: .*\)\. "):
        run(recipe_for(world, out, "--checkpoint_every", "3", "--data.train_file", str(text)), resume="last")


def test_4_resume_accepts_safe_changes(world, killed_run, reference_student, tmp_path):
    out = run_copy(killed_run, tmp_path)
    recipe_json = (Path(str(out) + ".run") / "recipe.json").read_bytes()
    res = run(recipe_for(world, out, "--checkpoint_every", "5", "--progress", "true"), resume="last")
    got = res["module"].student.state_dict()
    assert all(torch.equal(reference_student[k], got[k]) for k in reference_student)
    assert (Path(str(out) + ".run") / "recipe.json").read_bytes() == recipe_json  # never rewritten on resume


# ---- 5. two writers of one output ----------------------------------------------------------------------------------

def test_5_the_second_of_two_concurrent_exports_fails(world, tmp_path, capsys, monkeypatch):
    from qat.export import pack

    out = tmp_path / "e"
    inside, release = threading.Event(), threading.Event()
    real_save = pack.save_file
    first = threading.current_thread()

    def slow_save(*args, **kwargs):
        if threading.current_thread() is not first:  # the writer thread pauses while it holds the output
            inside.set()
            assert release.wait(60)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(pack, "save_file", slow_save)
    rc_a = []
    writer = threading.Thread(target=lambda: rc_a.append(main(["export", "--student", str(world / "student"),
                                                               "--output", str(out)])))
    writer.start()
    try:
        assert inside.wait(60)
        one_error(capsys, r"^qat export: error: --output '.*e' is being written by another qat process \(pid \d+\)",
                  "export", "--student", world / "student", "--output", out)
    finally:
        release.set()
        writer.join(60)
    assert rc_a == [0] and (out / "model.safetensors").is_file()
    one_error(capsys, "already exists; pass --overwrite", "export", "--student", world / "student", "--output", out)


# ---- 6. convert-gguf and a different GGUF; zero points outside the grid in an export -------------------------------

def tiny_gguf(path: Path, value: float) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.full((4, 8), value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def stub_conversion(monkeypatch):
    """The GGUF -> HF conversion itself is transformers' (tested slow below); here only the output handling."""
    from qat.models import convert_gguf

    calls = []

    def write_hf_dir(src, out, dtype):
        calls.append(src)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(convert_gguf, "write_hf_dir", write_hf_dir, raising=False)
    return calls


def test_6_convert_gguf_does_not_call_another_gguf_already_converted(tmp_path, capsys, stub_conversion):
    a, b = tiny_gguf(tmp_path / "a.gguf", 1.0), tiny_gguf(tmp_path / "b.gguf", 2.0)
    out = tmp_path / "m"
    rc, err, stdout = cli(capsys, "convert-gguf", "--gguf", a, "--output", out)
    assert rc == 0 and "wrote" in stdout
    rc, err, stdout = cli(capsys, "convert-gguf", "--gguf", a, "--output", out)
    assert rc == 0 and "already converted from a.gguf" in stdout and len(stub_conversion) == 1
    one_error(capsys, r"^qat convert-gguf: error: --output '.*m' holds a model converted from a\.gguf \(float32, "
                      r"sha256 [0-9a-f]{12}\), not from b\.gguf \(float32, sha256 [0-9a-f]{12}\); pass --overwrite to "
                      r"replace it$", "convert-gguf", "--gguf", b, "--output", out)
    assert (out / "model.safetensors").read_bytes() == a.read_bytes()
    rc, _, _ = cli(capsys, "convert-gguf", "--gguf", b, "--output", out, "--overwrite")
    assert rc == 0 and (out / "model.safetensors").read_bytes() == b.read_bytes()
    marker = json.loads((out / ".qat-output.json").read_text())
    assert marker["kind"] == "converted-model" and marker["source"]["gguf"] == "b.gguf"
    assert len(marker["source"]["sha256"]) == 64


def test_6_export_zero_points_outside_the_grid_are_refused(world, tmp_path, capsys):
    e = copy(world / "export", tmp_path / "e")
    sd = load_file(e / "model.safetensors")
    sd["model.layers.2.self_attn.v_proj.zeros"][3, 0] = 9
    save_file(sd, str(e / "model.safetensors"), metadata={"format": "pt"})
    pattern = (r"model\.safetensors: model\.layers\.2\.self_attn\.v_proj\.zeros reach 9, outside the 2-bit grid "
               r"\[0, 3\], which W2g32 cannot hold")
    for command in ("eval", "generate"):
        extra = ["--data", world / "val.txt", "--seq-len", "64"] if command == "eval" else ["--prompt", "hi"]
        one_error(capsys, pattern, command, "--model", e, *extra)
    from qat import load_quantized

    with pytest.raises(ValueError, match=pattern):
        load_quantized(e)


def test_6_export_spec_that_disagrees_with_packed_shapes(world, tmp_path):
    from qat import load_quantized

    e = copy(world / "export", tmp_path / "e")
    cfg = json.loads((e / "config.json").read_text())
    cfg["quantization_config"]["spec"]["weight"]["bits"] = 3
    (e / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quantization_config says bits=2 but its spec has 3"):
        load_quantized(e)
    cfg["quantization_config"]["bits"] = 3
    (e / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.qweight' has shape \[64, 32\], "
                                         r"expected \[64, 48\] for W3g32$"):
        load_quantized(e)


# ---- 7. --overwrite on a directory qat did not write ---------------------------------------------------------------

@pytest.mark.parametrize("command", ["ptq", "distill", "export"])
def test_7_overwrite_never_deletes_a_directory_qat_did_not_write(world, tmp_path, capsys, command):
    docs = tmp_path / "documents"
    docs.mkdir()
    (docs / "thesis.txt").write_text("years of work")
    (docs / "figures").mkdir()
    (docs / "figures" / "a.png").write_bytes(b"\x89PNG")
    before = tree(docs)
    argv = {
        "ptq": ["ptq", "--model", world / "model", "--method", "rtn", "--bits", "2", "--group-size", "32",
                "--output", docs, "--overwrite", "--device", "cpu"],
        "distill": [*distill_argv(world, docs), "--overwrite", "true"],
        "export": ["export", "--student", world / "student", "--output", docs, "--overwrite"],
    }[command]
    one_error(capsys, rf"^qat {command}: error: --output '.*documents' already exists and is not a qat output "
                      r"\(no \.qat-output\.json; it holds figures, thesis\.txt\); not replacing it", *argv)
    assert tree(docs) == before


def test_7_overwrite_never_replaces_another_kind_of_qat_output(world, tmp_path, capsys):
    e = copy(world / "export", tmp_path / "e")
    one_error(capsys, r"--output '.*e' holds an export \(qat export\), not a student checkpoint .*; not replacing it",
              "ptq", "--model", world / "model", "--method", "rtn", "--bits", "2", "--group-size", "32",
              "--output", e, "--overwrite", "--device", "cpu")
    assert (e / "model.safetensors").is_file()


def test_7_overwrite_never_deletes_files_added_to_a_qat_output(world, tmp_path, capsys):
    s = copy(world / "student", tmp_path / "student")
    (s / "my-notes.txt").write_text("what I learned from this run")
    before = tree(s)
    one_error(capsys, r"--output '.*student' is a student checkpoint .* but also holds my-notes\.txt, which qat did "
                      r"not write; not replacing it", "ptq", "--model", world / "model", "--method", "rtn", "--bits",
              "2", "--group-size", "32", "--output", s, "--overwrite", "--device", "cpu")
    assert tree(s) == before


# ---- 8. convert-gguf never replaces without --overwrite ------------------------------------------------------------

def test_8_convert_gguf_keeps_an_existing_directory(tmp_path, capsys, stub_conversion):
    a = tiny_gguf(tmp_path / "a.gguf", 1.0)
    out = tmp_path / "m"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's own weights")
    (out / "notes.txt").write_text("keep me")
    before = tree(out)
    one_error(capsys, r"^qat convert-gguf: error: --output '.*m' already exists and is not a qat output",
              "convert-gguf", "--gguf", a, "--output", out)
    one_error(capsys, r"already exists and is not a qat output", "convert-gguf", "--gguf", a, "--output", out,
              "--overwrite")
    assert tree(out) == before and stub_conversion == []


# ---- 9. the output is the input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, spelling", [("ptq", "same"), ("ptq", "dot"), ("export", "same"),
                                               ("export", "symlink"), ("distill", "same")])
def test_9_output_equal_to_the_input_is_refused(world, tmp_path, capsys, command, spelling):
    src = copy(world / ("model" if command == "ptq" else "student"), tmp_path / "input")
    out = {"same": src, "dot": src / ".", "symlink": tmp_path / "link"}[spelling]
    if spelling == "symlink":
        out.symlink_to(src)
    before = tree(src)
    flag = "--model" if command == "ptq" else "--student"
    argv = {
        "ptq": ["ptq", "--model", src, "--method", "rtn", "--bits", "2", "--group-size", "32", "--output", out,
                "--overwrite", "--device", "cpu"],
        "export": ["export", "--student", src, "--output", out, "--overwrite"],
        "distill": [*distill_argv(world, out), "--student", src, "--quant.weight.group_size", "32",
                    "--overwrite", "true"],
    }[command]
    one_error(capsys, rf"^qat {command}: error: --output '.*' is the input {flag}; write the output somewhere else$",
              *argv)
    assert tree(src) == before


def test_9_output_containing_the_input_is_refused(world, tmp_path, capsys):
    parent = tmp_path / "runs"
    src = copy(world / "student", parent / "student")
    one_error(capsys, r"--output '.*runs' contains the input --student .*; replacing it would delete the input",
              "export", "--student", src, "--output", parent, "--overwrite")
    assert (src / "student.safetensors").is_file()


# ---- 10. distill --run_dir X --overwrite true ---------------------------------------------------------------------

def test_10_distill_overwrite_removes_only_what_distill_wrote_and_keeps_the_rest(world, tmp_path, capsys):
    runs = tmp_path / "runs"
    other = runs / "other-run"
    other.mkdir(parents=True)
    (other / "result.json").write_text('{"ppl": 12.3}')
    (runs / "notes.md").write_text("my notes")
    keep = tree(runs)
    rc, err, _ = cli(capsys, *distill_argv(world, tmp_path / "s1"), "--run_dir", runs)
    assert rc == 0, err  # a run directory may share its directory with other things
    assert (runs / "checkpoints" / "last.ckpt").is_file() and (runs / "recipe.json").is_file()
    argv = [*distill_argv(world, tmp_path / "s2"), "--run_dir", runs]
    one_error(capsys, "already holds a checkpoint; pass --resume last", *argv)
    rc, err, _ = cli(capsys, *argv, "--overwrite", "true")
    assert rc == 0, err
    assert {k: v for k, v in tree(runs).items() if k in keep} == keep  # the other run and the notes survive
    assert json.loads((runs / ".qat-output.json").read_text())["kind"] == "distill-run"


def test_10_distill_never_writes_into_entries_it_did_not_create(world, tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "checkpoints").mkdir(parents=True)
    (runs / "checkpoints" / "mine.ckpt").write_bytes(b"someone else's")
    one_error(capsys, r"--run_dir '.*runs' already holds 'checkpoints', which qat distill did not write",
              *distill_argv(world, tmp_path / "student"), "--run_dir", runs, "--overwrite", "true")
    assert (runs / "checkpoints" / "mine.ckpt").read_bytes() == b"someone else's"


# ---- checkpoint crash safety (atomic, fsync'd, the last two kept, corrupt last.ckpt -> prev.ckpt) -------------------

def _step(ckpt: Path) -> int:
    return torch.load(ckpt, weights_only=False)["qat_distill"]["global_step"]


def test_the_last_two_checkpoints_are_kept(killed_run):
    ckpts = Path(str(killed_run) + ".run") / "checkpoints"
    assert _step(ckpts / "last.ckpt") == 9 and _step(ckpts / "prev.ckpt") == 8  # saved at 0, 3, 4, 6, 8, 9
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "last.json", "prev.ckpt"]  # no temporaries


@pytest.mark.parametrize("damage", ["truncated", "empty", "bit flip"])
def test_a_damaged_last_ckpt_falls_back_to_prev(world, killed_run, reference_student, tmp_path, capsys, damage):
    out = run_copy(killed_run, tmp_path)
    last = Path(str(out) + ".run") / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    if damage == "bit flip":
        data[len(data) // 2] ^= 0xFF  # torch.load would read this without complaint
    last.write_bytes(bytes(data[: len(data) // 2] if damage == "truncated" else b"" if damage == "empty" else data))
    capsys.readouterr()
    res = run(recipe_for(world, out, "--checkpoint_every", "3"), resume="last")
    warn = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("qat ")]
    assert len(warn) == 1 and re.fullmatch(r"qat distill: warning: .*last\.ckpt is unusable \(.+\); resuming from "
                                           r"prev\.ckpt", warn[0]), warn
    assert res["module"].resumed_from["global_step"] == 8
    got = res["module"].student.state_dict()
    assert all(torch.equal(reference_student[k], got[k]) for k in reference_student)
    assert _step(Path(str(out) + ".run") / "checkpoints" / "prev.ckpt") > 8  # the damaged file never became prev


def test_an_interrupted_checkpoint_write_leaves_the_last_good_one(killed_run, tmp_path):
    from qat.distill.callbacks import CheckpointFiles, DistillCheckpoint

    ckpts = copy(Path(str(killed_run) + ".run") / "checkpoints", tmp_path / "checkpoints")
    files = CheckpointFiles(ckpts)
    before = tree(ckpts)
    files.tmp_path().write_bytes(b"half a checkpoint")  # killed between write and rename
    assert files.find_resumable() == (files.last, None)
    DistillCheckpoint(files, 3)  # a new run on this directory clears what a killed writer left
    assert tree(ckpts) == before


# ---- tracebacks that are one line now ------------------------------------------------------------------------------

def _truncate(f: Path, keep: float = 0.5) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


def _case_dirs(world: Path, tmp_path: Path, killed_run: Path, case: str) -> list:
    m = tmp_path / "m"
    if case in ("missing model.safetensors", "truncated model.safetensors", "tensor of the wrong shape"):
        copy(world / "model", m)
        if case == "missing model.safetensors":
            (m / "model.safetensors").unlink()
        elif case == "truncated model.safetensors":
            _truncate(m / "model.safetensors")
        else:
            sd = load_file(m / "model.safetensors")
            sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(128, 32)
            save_file(sd, str(m / "model.safetensors"), metadata={"format": "pt"})
        return ["eval", "--model", m, "--data", world / "val.txt", "--seq-len", "64"]
    if case in ("student without qat_student.json", "student with {} as qat_student.json"):
        copy(world / "student", m)
        if case == "student without qat_student.json":
            (m / "qat_student.json").unlink()
        else:
            (m / "qat_student.json").write_text("{}")
        return ["export", "--student", m, "--output", tmp_path / "e"]
    if case in ("truncated last.ckpt, no prev", "empty last.ckpt, no prev"):
        out = run_copy(killed_run, tmp_path)
        ckpts = Path(str(out) + ".run") / "checkpoints"
        (ckpts / "prev.ckpt").unlink()
        if case.startswith("truncated"):
            _truncate(ckpts / "last.ckpt")
        else:
            (ckpts / "last.ckpt").write_bytes(b"")
        return ["distill", "--config", TINY_RECIPE, "--model", world / "model", "--data.train_file",
                world / "train.txt", "--eval.file", world / "val.txt", "--output", out, "--checkpoint_every", "3",
                "--resume", "last"]
    if case == "truncated GGUF":
        from qat.models.convert_gguf import bundled_gguf

        g = tmp_path / "x.gguf"
        g.write_bytes(bundled_gguf().read_bytes()[:5_000_000])
        return ["convert-gguf", "--gguf", g, "--output", tmp_path / "c"]
    if case == "generate --prompt ''":
        return ["generate", "--model", world / "export", "--prompt", ""]
    if case == "generate --device cuda without CUDA":
        return ["generate", "--model", world / "export", "--prompt", "hi", "--device", "cuda"]
    if case == "output path under a file":
        (tmp_path / "file.txt").write_text("a file")
        return ["ptq", "--model", world / "model", "--method", "rtn", "--bits", "2", "--group-size", "32",
                "--output", tmp_path / "file.txt" / "student", "--device", "cpu"]
    raise AssertionError(case)


TRACEBACKS = {
    "missing model.safetensors": r"qat eval: error: model directory '.*m' has no weights \(model\.safetensors or "
                                 r"pytorch_model\.bin\)",
    "truncated model.safetensors": r"qat eval: error: .*model\.safetensors: truncated or corrupt safetensors file",
    "tensor of the wrong shape": r"qat eval: error: .*m: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' has shape "
                                 r"\[128, 32\], the architecture needs \[128, 64\]",
    "student without qat_student.json": r"qat export: error: '.*m' is not a qat student checkpoint \(no "
                                        r"qat_student\.json\) \(it has student\.safetensors: an incomplete",
    "student with {} as qat_student.json": r"qat export: error: .*qat_student\.json: corrupt student metadata \(no "
                                           r"'spec'\)",
    "truncated last.ckpt, no prev": r"qat distill: error: no usable checkpoint in .*checkpoints: last\.ckpt truncated "
                                    r".*, prev\.ckpt missing",
    "empty last.ckpt, no prev": r"qat distill: error: no usable checkpoint in .*checkpoints: last\.ckpt empty file, "
                                r"prev\.ckpt missing",
    "truncated GGUF": r"qat convert-gguf: error: GGUF file '.*x\.gguf' is truncated or corrupt",
    "generate --prompt ''": r"qat generate: error: --prompt is empty; give the text to continue",
    "generate --device cuda without CUDA": r"qat generate: error: --device cuda: CUDA is not available on this "
                                           r"machine \(use --device cpu\)",
    "output path under a file": r"qat ptq: error: --output '.*file\.txt/student' is under '.*file\.txt', which is a "
                                r"file",
}


@pytest.mark.parametrize("case", list(TRACEBACKS))
def test_tracebacks_are_one_line_with_exit_status_2(world, killed_run, tmp_path, capsys, monkeypatch, case):
    if case == "generate --device cuda without CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = _case_dirs(world, tmp_path, killed_run, case)
    if case == "output path under a file":  # found before any work: the model is never loaded
        from qat.models import loading

        monkeypatch.setattr(loading, "load_fp_model", lambda *a, **k: pytest.fail("loaded the model"))
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "it/s]" not in ln]
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(TRACEBACKS[case] + ".*", err[0]), err[0]


def test_load_quantized_device_cuda_without_cuda_is_one_line(world):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from qat import load_quantized

    with pytest.raises(ValueError, match=r"^device cuda: CUDA is not available on this machine"):
        load_quantized(world / "export", device="cuda")
    with pytest.raises(ValueError, match=r"is a qat student checkpoint; this needs a native qat export"):
        load_quantized(world / "student")


# ---- the real model ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_eval_of_a_native_export_equals_eval_of_its_student(smollm2_dir, wikitext_test, tmp_path, capsys):
    """The default model: RTN W4g64 student -> native exports in float32 and in the default float16. `qat eval` (the
    README protocol: 16,384 tokens of WikiText-2 raw test in windows of 512) on the float32 export equals it on the
    student to 1e-4 relative; the float16 export rounds the FP tensors (embeddings, norms), measured and bounded."""
    s = tmp_path / "student"
    rc, err, _ = cli(capsys, "ptq", "--model", smollm2_dir, "--method", "rtn", "--bits", "4", "--group-size", "64",
                     "--output", s, "--device", "cpu")
    assert rc == 0, err
    for name, dtype in (("e32", "float32"), ("e16", "float16")):
        rc, err, _ = cli(capsys, "export", "--student", s, "--output", tmp_path / name, "--dtype", dtype)
        assert rc == 0, err
    res = {}
    for name in ("student", "e32", "e16"):
        rc, err, out = cli(capsys, "eval", "--model", tmp_path / name, "--data", wikitext_test, "--seq-len", "512",
                           "--max-tokens", "16384", "--json", "--device", "cpu")
        assert rc == 0, err
        res[name] = json.loads(out.strip().splitlines()[-1])
    ppl = {k: v["perplexity"] for k, v in res.items()}
    print(f"\nsmollm2 W4g64 RTN, qat eval: student {ppl['student']:.6f}, float32 export {ppl['e32']:.6f} (rel "
          f"{abs(ppl['e32'] / ppl['student'] - 1):.2e}), float16 export {ppl['e16']:.6f} (rel "
          f"{abs(ppl['e16'] / ppl['student'] - 1):.2e}); bits/weight {res['student']['bits_per_weight']:.4f} / "
          f"{res['e32']['bits_per_weight']:.4f}")
    assert ppl["e32"] == pytest.approx(ppl["student"], rel=1e-4)
    assert ppl["e16"] == pytest.approx(ppl["student"], rel=1e-2)
    assert res["e32"]["bits_per_weight"] == res["student"]["bits_per_weight"] == pytest.approx(4.375)


@pytest.mark.slow
def test_convert_gguf_of_the_real_model_knows_its_source(tmp_path, capsys):
    from qat.models.convert_gguf import bundled_gguf

    out = tmp_path / "m"
    rc, err, stdout = cli(capsys, "convert-gguf", "--output", out)
    assert rc == 0 and "wrote" in stdout, err
    before = tree(out)
    rc, err, stdout = cli(capsys, "convert-gguf", "--output", out)
    assert rc == 0 and "already converted from SmolLM2-135M-Instruct.Q4_1.gguf (float32)" in stdout
    other = tmp_path / "other.gguf"
    data = bytearray(bundled_gguf().read_bytes())
    data[-100] ^= 0xFF  # the same layout, other weights
    other.write_bytes(bytes(data))
    one_error(capsys, r"holds a model converted from SmolLM2-135M-Instruct\.Q4_1\.gguf \(float32, sha256 .*\), not "
                      r"from other\.gguf \(float32", "convert-gguf", "--gguf", other, "--output", out)
    one_error(capsys, r"not from SmolLM2-135M-Instruct\.Q4_1\.gguf \(float16", "convert-gguf", "--output", out,
              "--dtype", "float16")
    assert tree(out) == before


def test_a_writer_killed_between_its_two_renames_loses_nothing(world, tmp_path, capsys):
    """Replacing an output moves the old one aside, then renames the new one in: a kill in between leaves the old one
    under a temporary name, and the next claim of that output puts it back before anything else."""
    out = copy(world / "export", tmp_path / "e")
    good = tree(out)
    out.rename(tmp_path / ".e.old-12345")
    (tmp_path / ".e.tmp-abc").mkdir()  # the new one, half written
    one_error(capsys, "already exists; pass --overwrite", "export", "--student", world / "student", "--output", out)
    assert tree(out) == good and sorted(p.name for p in tmp_path.iterdir()) == ["e"]
