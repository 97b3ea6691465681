"""Block-sequential PTQ (RTN / GPTQ) on tiny models, the `qat ptq` command, and its bad-input errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_model

from qat.checkpoint import load_student, read_student_meta
from qat.cli import main as qat_main
from qat.config import QuantSpec
from qat.nn import quant_linears
from qat.ptq.pipeline import ptq_quantize


def _loss(model, ids):
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def _tiny_llama_dir(tmp_path, assets_dir, text="The quick brown fox jumps over the lazy dog. " * 400):
    """A tiny random Llama with the real SmolLM2 tokenizer, saved as a local HF directory, plus a text file."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(assets_dir / "smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "calib.txt"
    data.write_text(text)
    return model_dir, data


def test_gptq_beats_rtn_on_the_calibration_distribution():
    torch.manual_seed(0)
    teacher = tiny_model("llama")
    ids = torch.randint(0, 256, (16, 32))
    fp = _loss(teacher, ids)
    losses = {}
    for method in ("rtn", "gptq"):
        student = tiny_model("llama")
        ptq_quantize(student, QuantSpec.from_dict({"weight": {"bits": 2, "group_size": 32}}), ids, method,
                     progress=False)
        losses[method] = _loss(student, ids)
        assert len(quant_linears(student)) == 3 * 7
    # both degrade a random model; GPTQ keeps the output closer to FP on the data it calibrated on
    assert abs(losses["gptq"] - fp) < abs(losses["rtn"] - fp)


def test_gptq_latent_weights_reproduce_the_ptq_model():
    model = tiny_model("opt")
    ids = torch.randint(0, 256, (8, 16))
    ptq_quantize(model, QuantSpec.from_dict({"weight": {"bits": 3, "group_size": 32}}), ids, "gptq", progress=False)
    for m in quant_linears(model).values():
        assert torch.equal(m.weight_quantizer(m.weight), m.weight)  # GPTQ's latent sits exactly on the grid


def test_gptq_needs_calibration_data():
    with pytest.raises(ValueError, match="needs calibration data"):
        ptq_quantize(tiny_model("llama"), QuantSpec(), None, "gptq", progress=False)
    with pytest.raises(ValueError, match="unknown PTQ method 'awq'"):
        ptq_quantize(tiny_model("llama"), QuantSpec(), None, "awq", progress=False)


def test_cli_ptq_writes_a_student_that_reloads_to_the_same_logits(tmp_path, assets_dir, capsys, monkeypatch):
    import qat.checkpoint

    model_dir, data = _tiny_llama_dir(tmp_path, assets_dir)
    out = tmp_path / "student"
    saved = []  # the quantized model the command held in memory when it wrote the checkpoint
    save = qat.checkpoint.save_student

    def keep_and_save(model, *args, **kw):
        saved.append(model)
        return save(model, *args, **kw)

    monkeypatch.setattr(qat.checkpoint, "save_student", keep_and_save)
    rc = qat_main(["ptq", "--model", str(model_dir), "--data", str(data), "--method", "gptq", "--bits", "3",
                   "--group-size", "32", "--calib-samples", "4", "--seq-len", "32", "--output", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantized_linears"] == 14 and summary["bits_per_weight"] == pytest.approx(3 + 24 / 32)
    meta = read_student_meta(out)
    assert meta["spec"]["weight"]["bits"] == 3 and meta["ptq"]["method"] == "gptq"
    student, _ = load_student(out)
    ids = torch.randint(0, 1000, (2, 16))
    assert len(saved) == 1 and torch.equal(student(ids).logits, saved[0].eval()(ids).logits)
    # and `qat eval` reads it (perplexity of a random tiny model: finite and large)
    rc = qat_main(["eval", "--model", str(out), "--data", str(data), "--seq-len", "32", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and res["bits_per_weight"] == pytest.approx(3.75) and 1 < res["perplexity"] < 1e6


@pytest.mark.parametrize("case, args, message", [
    ("missing model", ["--model", "{tmp}/nope"], "does not exist"),
    ("bits", ["--bits", "9"], "bits in 1..8, got 9"),
    ("group", ["--group-size", "48"], "group_size 48 does not divide in_features 64"),
    ("empty data", ["--data", "{tmp}/empty.txt"], "is empty"),
    ("format bits", ["--format", "binary11", "--bits", "3"], "binary11 stores 1 sign bit"),
    ("act bits", ["--act-bits", "3"], "act bits must be one of"),
])
def test_cli_ptq_bad_input_is_one_line_and_writes_nothing(tmp_path, assets_dir, capsys, case, args, message):
    model_dir, data = _tiny_llama_dir(tmp_path, assets_dir)
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    base = {"--model": str(model_dir), "--data": str(data), "--bits": "4", "--group-size": "32",
            "--calib-samples": "2", "--seq-len": "16", "--output": str(out)}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v.format(tmp=tmp_path)
    argv = ["ptq"] + [x for kv in base.items() for x in kv]
    capsys.readouterr()
    assert qat_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qat ptq: error:") and message in err[0]
    assert not out.exists() and not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_cli_ptq_unknown_architecture(tmp_path, assets_dir, capsys):
    model_dir, data = _tiny_llama_dir(tmp_path, assets_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["model_type"] = "bert"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    rc = qat_main(["ptq", "--model", str(model_dir), "--method", "rtn", "--output", str(tmp_path / "o")])
    assert rc == 2 and "unsupported architecture 'bert'" in capsys.readouterr().err


def test_cli_ptq_keeps_an_existing_output_without_overwrite(tmp_path, assets_dir, capsys):
    model_dir, data = _tiny_llama_dir(tmp_path, assets_dir)
    out = tmp_path / "student"
    argv = ["ptq", "--model", str(model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--output", str(out)]
    assert qat_main(argv) == 0
    first = (out / "student.safetensors").read_bytes()
    assert qat_main(argv) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "student.safetensors").read_bytes() == first
    assert qat_main(argv + ["--overwrite"]) == 0  # a student output is replaced by a student output
    assert (out / "student.safetensors").is_file() and (out / ".qat-output.json").is_file()
    shutil.rmtree(out)


def test_shared_gram_matrices_equal_per_module_statistics():
    """q/k/v share one Gram computation per batch; the statistics must equal a per-module float64 accumulation."""
    from qat.models import capture_block_inputs, get_adapter, run_block
    from qat.nn import QuantLinear, quantize_model
    from qat.ptq.calibration import attach_input_stats

    model = tiny_model("llama")
    quantize_model(model, QuantSpec.from_dict({"weight": {"group_size": 32}}))
    block = get_adapter(model).blocks(model)[0]
    h, kw = capture_block_inputs(model, torch.randint(0, 256, (8, 16)))
    mods = {n: m for n, m in block.named_modules() if isinstance(m, QuantLinear)}
    stats, remove = attach_input_stats(mods)
    ref = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}

    def record(name):
        def hook(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            ref[name].add_(2 * x.t() @ x)
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in mods.items()]
    with torch.no_grad():
        for j in range(0, 8, 2):
            run_block(block, h[j : j + 2], kw)
    remove()
    for hk in hooks:
        hk.remove()
    for n in mods:
        torch.testing.assert_close(stats[n].hessian().double(), ref[n] / stats[n].n, rtol=1e-5, atol=1e-6)


def test_the_same_ptq_command_twice_gives_the_same_student(tmp_path, assets_dir, capsys):
    """Reproducibility: calibration windows are drawn by a seeded sampler, GPTQ (act-order) and its reductions are
    deterministic on CPU, so two runs of one command write bit-identical tensors (docs/RESULTS.md, reproducibility)."""
    from safetensors.torch import load_file

    from qat.checkpoint import STUDENT_WEIGHTS

    model_dir, data = _tiny_llama_dir(tmp_path, assets_dir)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert qat_main(["ptq", "--model", str(model_dir), "--data", str(data), "--method", "gptq", "--bits", "2",
                         "--group-size", "32", "--act-bits", "4", "--calib-samples", "4", "--seq-len", "32",
                         "--output", str(out)]) == 0
    a, b = (load_file(o / STUDENT_WEIGHTS) for o in outs)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
