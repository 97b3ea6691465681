"""Learned rounding in the block-wise stage (qat/distill/rounding.py, SignRound): the forward is AutoRound's formula,
the baked student reproduces the trained forward bit for bit (and packs to it), codes actually move, a window with
rounding resumes bit-exactly, and bad combinations fail before any work."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from test_distill import KillAt, recipe_for, run

from qat.config import QuantSpec
from qat.distill.recipe import RecipeError, RoundingSpec
from qat.distill.rounding import AdaRound, SignRound
from qat.nn import QuantLinear, quant_linears


def _autoround_asym(w, bits, group, v, min_scale, max_scale):
    """AutoRound 0.16's quant_tensor_asym (auto_round/data_type/int.py), restated: the independent reference."""
    out_f, in_f = w.shape
    t = w.reshape(-1, group)
    maxq = 2**bits - 1
    wmin = torch.clamp(t.min(-1)[0], max=0) * min_scale.reshape(-1)
    wmax = torch.clamp(t.max(-1)[0], min=0) * max_scale.reshape(-1)
    scale = ((wmax - wmin) / maxq).to(torch.float16).float().clamp(min=1e-5)
    zp = torch.round(-wmin / scale).unsqueeze(-1)
    scale = scale.unsqueeze(-1)
    q = torch.clamp(torch.round(t / scale + v.reshape(-1, group)) + zp, 0, maxq)
    return (scale * (q - zp)).reshape(out_f, in_f)


def _layer(bits=2, group=32, sym=False, seed=0):
    torch.manual_seed(seed)
    spec = QuantSpec.from_dict({"weight": {"bits": bits, "group_size": group, "sym": sym}})
    lin = QuantLinear.from_linear(torch.nn.Linear(64, 16), spec)
    with torch.no_grad():
        lin.weight.copy_(lin.weight_quantizer.init_from(lin.weight))
    return lin


def test_forward_is_autorounds_formula():
    lin = _layer()
    sr = SignRound({"lin": lin}, RoundingSpec(method="signround"), total_steps=10).attach()
    layer = sr.layers["lin"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.V.copy_(torch.rand(layer.V.shape, generator=g) - 0.5)
        layer.min_scale.copy_(0.5 + 0.5 * torch.rand(layer.min_scale.shape, generator=g))
        layer.max_scale.copy_(0.5 + 0.5 * torch.rand(layer.max_scale.shape, generator=g))
    ref = _autoround_asym(lin.weight.detach(), 2, 32, layer.V, layer.min_scale, layer.max_scale)
    assert torch.equal(lin.weight_quantizer(lin.weight).detach(), ref)


@pytest.mark.parametrize("bits, sym", [(2, False), (3, False), (4, True)])
def test_bake_reproduces_the_trained_forward_and_its_packing(bits, sym):
    lin = _layer(bits=bits, sym=sym)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(2))
    target = torch.nn.functional.linear(x, lin.weight.detach() * 0.9)  # something the grid must move towards
    sr = SignRound({"lin": lin}, RoundingSpec(method="signround", lr=0.05), total_steps=20).attach()
    codes_before = sr.layers["lin"].quantize(lin.weight)[3].detach().clone()
    for _ in range(20):
        loss = (lin(x) - target).pow(2).mean()
        sr.observe(float(loss.detach()))
        loss.backward()
        sr.step()
        for p in sr.parameters():
            p.grad = None
    best_loss = sr.best_loss
    sr.finish()  # best step restored, then baked
    codes_after = lin.weight_quantizer.pack(lin.weight)
    w_hat = lin.weight_quantizer(lin.weight).detach()
    assert torch.equal(lin.weight_quantizer.unpack(codes_after), w_hat)  # pack/unpack == forward, bit for bit
    assert torch.equal(w_hat, lin.weight.detach())  # the latent sits exactly on its grid
    with torch.no_grad():
        assert float((lin(x) - target).pow(2).mean()) == pytest.approx(best_loss, rel=1e-5)
    q = lin.weight_quantizer._codes(lin.weight, *lin.weight_quantizer.scale_zero(lin.weight))
    assert (q != codes_before).any()  # the rounding moved


def test_adaround_starts_at_the_fp_weight_and_bakes_its_hard_rounding():
    lin = _layer()
    w = lin.weight.detach().clone()
    ar = AdaRound({"lin": lin}, RoundingSpec(method="adaround", lr=0.05), total_steps=10).attach()
    layer = ar.layers["lin"]
    s, z = (t.unsqueeze(-1) for t in lin.weight_quantizer.scale_zero(lin.weight))
    soft = lin.weight_quantizer(lin.weight).detach().reshape(16, 2, 32)
    inside = (w.reshape(16, 2, 32) / s + z > 0.5) & (w.reshape(16, 2, 32) / s + z < lin.weight_quantizer.qmax - 0.5)
    # h(V) = frac(w / s): the soft weight is the FP weight wherever the grid does not clip it
    assert torch.allclose(soft[inside], w.reshape(16, 2, 32)[inside], atol=1e-4 * float(s.max()))
    assert ar.regularizer(0.1) is None and ar.regularizer(0.5) > 0  # no regulariser in the warm-up
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    for _ in range(10):
        loss = lin(x).pow(2).mean() + ar.regularizer(0.5)
        loss.backward()
        ar.step()
        for p in ar.parameters():
            p.grad = None
    up = (layer.V >= 0).float()
    ar.finish()
    expected = torch.clamp(torch.floor(w.reshape(16, 2, 32) / s) + up + z, 0, 3)
    got = lin.weight_quantizer._codes(lin.weight, *lin.weight_quantizer.scale_zero(lin.weight))
    assert torch.equal(got, expected)
    assert torch.equal(lin.weight_quantizer.unpack(lin.weight_quantizer.pack(lin.weight)),
                       lin.weight_quantizer(lin.weight).detach())


def test_stage_with_rounding_flips_codes_lowers_loss_and_bakes(tiny_dir, tmp_path):  # noqa: F811
    out = tmp_path / "student"
    stages = json.dumps([{"kind": "blockwise", "name": "signround", "steps": 8, "batch_size": 4,
                          "loss": {"kind": "mse"}, "rounding": {"method": "signround"}}])
    res = run(recipe_for(tiny_dir, out, "--stages", stages, "--quant.act.bits", "16"))
    hist = res["history"][1]
    assert hist["stage"] == "signround"
    assert all(w["last_loss"] <= w["first_loss"] for w in hist["windows"])
    student = res["module"].student
    for m in quant_linears(student).values():  # baked: the latent is exactly its quantized value
        assert torch.equal(m.weight_quantizer(m.weight).detach(), m.weight.detach())
    # codes differ from RTN's on the FP weights
    from qat.models.loading import load_fp_model

    fp = load_fp_model(tiny_dir / "model")
    flipped = 0
    for n, m in quant_linears(student).items():
        q = m.weight_quantizer
        rtn = QuantLinear.from_linear(fp.get_submodule(n), m.spec)
        with torch.no_grad():
            rtn.weight.copy_(rtn.weight_quantizer.init_from(rtn.weight))
        flipped += int((rtn.weight_quantizer(rtn.weight) != q(m.weight)).sum())
    assert flipped > 0


@pytest.mark.parametrize("rounding", [{"method": "signround", "best": False}, {"method": "adaround", "lr": 0.1}])
def test_rounding_window_resumes_bit_exactly(tiny_dir, tmp_path, rounding):  # noqa: F811
    # best: false, so the final rounding is the last step's and depends on every step's restored state
    stages = json.dumps([{"kind": "blockwise", "name": "rounding", "steps": 4, "batch_size": 4,
                          "rounding": rounding},
                         {"kind": "e2e", "name": "e2e", "steps": 2, "train": ["wq.scale"], "freeze_codes": True}])
    args = ("--stages", stages, "--quant.act.bits", "16", "--checkpoint_every", "3")
    ref = run(recipe_for(tiny_dir, tmp_path / "ref", *args))
    out = tmp_path / "student"
    with pytest.raises(KeyError):
        run(recipe_for(tiny_dir, out, *args), callbacks=[KillAt(3)])  # checkpoint at step 3: window 0, step 3 of 4
    last = json.loads((Path(str(out) + ".run") / "checkpoints" / "last.json").read_text())
    assert last["global_step"] == 3
    res = run(recipe_for(tiny_dir, out, *args), resume="last")
    a, b = ref["module"].student.state_dict(), res["module"].student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage, quant, match", [
    ({"rounding": {"method": "signround"}, "train": ["wq"]}, None, "remove 'wq' from train"),
    ({"rounding": {"method": "signround"}, "freeze_codes": True}, None, "cannot run with freeze_codes"),
    ({"rounding": {"method": "flexround"}}, None, "unknown rounding method 'flexround'"),
    ({"kind": "e2e", "rounding": {"method": "signround"}}, None, "rounding only applies to blockwise stages"),
    ({"rounding": {"method": "signround", "range": 0}}, None, "range > 0"),
    ({"rounding": {"method": "signround"}}, '{weight: {format: binary11, group_size: 32}}', "needs the uniform format"),
])
def test_bad_rounding_options_fail_before_work(tiny_dir, tmp_path, stage, quant, match):
    s = {"kind": "blockwise", "steps": 2, **stage}
    extra = ["--quant", quant] if quant else []
    with pytest.raises(RecipeError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe_for(tiny_dir, tmp_path / "s", "--stages", json.dumps([s]), "--quant.act.bits", "16", *extra)


# ---- the mixed data pool (teacher samples beside corpus windows) ---------------------------------------------------

def test_interleave_keeps_every_prefix_mixed():
    from qat.distill.data import interleave

    a, b = torch.zeros(6, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)
    out = interleave(a, b)[:, 0].tolist()
    assert out == [0, 0, 1, 0, 0, 0, 1, 0]  # b at 1/4 and 3/4 of the pool, after a's rows at the same place
    assert torch.equal(interleave(a, b), interleave(a, b))


def test_mixed_pool_holds_corpus_and_teacher_windows(tiny_dir, tmp_path):
    from qat.distill.data import corpus_windows, teacher_windows, training_pool
    from qat.distill.recipe import DataSpec
    from qat.models.loading import load_fp_model, load_tokenizer

    teacher, tok = load_fp_model(tiny_dir / "model"), load_tokenizer(tiny_dir / "model")
    spec = DataSpec(source="mixed", teacher_fraction=0.25, train_file=str(tiny_dir / "train.txt"), seq_len=24,
                    num_samples=8, prompt_len=4, gen_batch_size=4)
    pool = training_pool(spec, teacher, tok, tiny_dir / "model", 0, tmp_path, progress=False)
    corpus = corpus_windows(spec, tok, 6, 24, 0)
    gen = teacher_windows(DataSpec(**{**spec.__dict__, "num_samples": 2}), teacher, tok, tiny_dir / "model", 0,
                          tmp_path, progress=False)
    assert pool.shape == (8, 24)
    assert torch.equal(pool[[0, 1, 3, 4, 5, 7]], corpus) and torch.equal(pool[[2, 6]], gen)
    with pytest.raises(RecipeError, match="teacher_fraction must be in"):
        recipe_for(tiny_dir, tmp_path / "s", "--data.source", "mixed", "--data.teacher_fraction", "1.0")
