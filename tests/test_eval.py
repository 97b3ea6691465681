"""Perplexity: the eval protocol against a float64 cross-entropy reference (tiny FP and quantized models), the
`qat eval` command (JSON line, errors), and agreement with transformers' own loss on the real model."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, tiny_model

from qat.eval.perplexity import NextTokenPerplexity, perplexity


@pytest.fixture(autouse=True)
def _token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path / "qat-cache"))


def manual_nll(model, windows: torch.Tensor) -> float:
    """Mean next-token NLL over every predicted position, all in float64."""
    with torch.no_grad():
        logits = model(windows).logits.double()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)).item()


def random_ids(n: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_matches_float64_reference(family):
    model = tiny_model(family)
    ids = random_ids(700)
    ref = manual_nll(model, ids[:640].view(10, 64))
    for batch_size in (1, 3, 4):
        res = perplexity(model, ids, 64, batch_size=batch_size, progress=False)
        assert res["nll"] == pytest.approx(ref, rel=1e-6)
        assert res["perplexity"] == pytest.approx(math.exp(ref), rel=1e-6)
        assert (res["tokens"], res["predicted"], res["windows"]) == (640, 630, 10)


def test_max_tokens_and_ready_windows():
    model = tiny_model("llama")
    ids = random_ids(1000, seed=1)
    res = perplexity(model, ids, 32, max_tokens=100, progress=False)  # 3 windows, tail of 4 dropped
    assert res["tokens"] == 96 and res["nll"] == pytest.approx(manual_nll(model, ids[:96].view(3, 32)), rel=1e-6)
    windows = ids[:320].view(10, 32)
    assert perplexity(model, windows, 32, progress=False)["nll"] == pytest.approx(manual_nll(model, windows), rel=1e-6)
    with pytest.raises(ValueError, match="windows have length 32, seq_len is 64"):
        perplexity(model, windows, 64, progress=False)
    with pytest.raises(ValueError, match="20 tokens are fewer than one window of seq_len 32"):
        perplexity(model, ids[:20], 32, progress=False)


def test_restores_training_mode_and_records_no_grad():
    model = tiny_model("gpt2").train()
    perplexity(model, random_ids(256), 64, progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_quantized_student_matches_its_own_float64_reference():
    from qat.config import QuantSpec, WeightSpec
    from qat.nn import quant_disabled, quantize_model

    model = tiny_model("llama")
    quantize_model(model, QuantSpec(weight=WeightSpec(bits=2, group_size=32)))
    windows = random_ids(512, seed=2).view(8, 64)
    res = perplexity(model, windows, 64, batch_size=3, progress=False)
    assert res["nll"] == pytest.approx(manual_nll(model, windows), rel=1e-6)
    with quant_disabled(model):
        fp = perplexity(model, windows, 64, progress=False)
    assert abs(fp["nll"] - res["nll"]) > 1e-3  # the quantized forward is what was measured


def test_metric_state_is_float64_and_survives_tiny_probabilities():
    m = NextTokenPerplexity()
    assert m.total_log_probs.dtype == torch.float64
    logits = torch.tensor([[[0.0, -1000.0], [3.0, 1.0]]])  # p(target 1) = e^-1000 underflows in log(softmax)
    m.update(logits, torch.tensor([[1, 0]]))
    expected = (1000.0 + math.log1p(math.exp(-2.0))) / 2
    assert (m.total_log_probs / m.count).item() == pytest.approx(expected, rel=1e-9)
    assert m.compute().item() == pytest.approx(math.exp(expected), rel=1e-6)


# ---- qat eval ----

@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, assets_dir):
    """A tiny llama with the SmolLM2 tokenizer's vocab, saved as an FP directory and as a W4 student checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qat.checkpoint import save_student
    from qat.config import QuantSpec, WeightSpec
    from qat.models.loading import load_tokenizer
    from qat.nn import quantize_model

    tok = load_tokenizer(assets_dir / "smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("models")
    model.save_pretrained(root / "fp")
    tok.save_pretrained(root / "fp")
    spec = QuantSpec(weight=WeightSpec(bits=4, group_size=32))
    quantize_model(model, spec)
    save_student(model, tok, spec, root / "student")
    return root / "fp", root / "student"


def _eval_json(capsys, *args) -> dict:
    from qat.cli import main

    assert main(["eval", *map(str, args), "--json", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_cli_json_on_fp_dir_and_student(tiny_dirs, assets_dir, capsys):
    from qat.data.text import tokenize_file
    from qat.models.loading import load_any

    fp_dir, student_dir = tiny_dirs
    data = assets_dir / "corpora" / "tinystories" / "tinystories_sample.txt"
    for path, bpw in ((fp_dir, 16.0), (student_dir, None)):
        got = _eval_json(capsys, "--model", path, "--data", data, "--seq-len", 64, "--max-tokens", 500,
                         "--batch-size", 3)
        assert set(got) == {"perplexity", "nll", "tokens", "model", "bits_per_weight"}
        model, tok = load_any(path)
        ids = tokenize_file(data, tok)
        assert ids[0].item() == tok.bos_token_id
        windows = ids[:448].view(7, 64)
        assert got["tokens"] == 448 and got["model"] == str(path)
        assert got["nll"] == pytest.approx(manual_nll(model, windows), rel=1e-6)
        assert got["perplexity"] == pytest.approx(math.exp(got["nll"]), rel=1e-12)
        if bpw is not None:
            assert got["bits_per_weight"] == bpw
        else:  # every linear is W4g32: 4 payload bits + an fp16 scale and a uint8 zero point per 32 weights
            assert got["bits_per_weight"] == pytest.approx(4 + (16 + 8) / 32, abs=1e-12)


def test_cli_human_line(tiny_dirs, assets_dir, capsys):
    from qat.cli import main

    data = assets_dir / "corpora" / "tinystories" / "tinystories_sample.txt"
    assert main(["eval", "--model", str(tiny_dirs[0]), "--data", str(data), "--seq-len", "128"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and " perplexity " in out[0] and "16.000 bits/weight" in out[0]


def test_cli_errors_are_one_line(tmp_path, tiny_dirs, wikitext_test, capsys):
    from qat.cli import main

    assert main(["eval", "--model", str(tmp_path / "nomodel"), "--data", str(wikitext_test), "--seq-len", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"qat eval: error: --model '{tmp_path / 'nomodel'}' does not exist or is not a dir")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["eval", "--model", str(tiny_dirs[0]), "--data", str(empty), "--seq-len", "8"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"qat eval: error: data file '{empty}' is empty"]
    assert main(["eval", "--model", str(tiny_dirs[0]), "--data", str(tmp_path / "x.txt"), "--seq-len", "8"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dirs[0]), "--data", str(wikitext_test), "--seq-len", "0"]) == 2
    assert capsys.readouterr().err.strip() == "qat eval: error: --seq-len must be positive, got 0"


@pytest.mark.slow
def test_cli_matches_transformers_loss_on_smollm2(smollm2, smollm2_dir, wikitext_test, capsys):
    """qat eval --json on the first 2048 tokens of wiki.test.raw at seq-len 512 vs HF's own mean loss per window."""
    model, tok = smollm2
    got = _eval_json(capsys, "--model", smollm2_dir, "--data", wikitext_test, "--seq-len", 512, "--max-tokens", 2048)
    text = wikitext_test.read_bytes().decode("utf-8").replace("\r\n", "\n")
    ids = torch.tensor([tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"][:2047])
    with torch.no_grad():  # every window predicts 511 positions, so the mean of window losses is the token mean
        losses = [model(w[None], labels=w[None]).loss.double().item() for w in ids.view(4, 512)]
    ref = sum(losses) / len(losses)
    assert got["tokens"] == 2048 and got["bits_per_weight"] == 16.0
    assert got["nll"] == pytest.approx(ref, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(ref), rel=1e-4)
    assert 15 < got["perplexity"] < 60  # a trained model, not noise (the first 2048 tokens give ~30.5)
