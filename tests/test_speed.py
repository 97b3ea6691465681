"""Speed levers (qat/speed.py) against their reference paths: the fused fake-quant functions give the reference's
values bit for bit and its gradients (numerically), the chunked losses give the reference losses and gradients, and
the eval-mode weight cache gives the uncached values and follows every parameter change."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from qat.config import ActSpec, QuantSpec, WeightSpec
from qat.nn import QuantLinear, quant_linears, quantize_model
from qat.quantizers.activation import ActQuantizer
from qat.quantizers.binary import Binary11Quantizer
from qat.quantizers.uniform import UniformQuantizer
from qat.quantizers.vq import VQQuantizer
from qat.speed import LEVERS, levers


def _grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def _run(fwd, params, seed: int = 0):
    """(output, grads of every param) of fwd() against a fixed random upstream gradient."""
    for p in params:
        p.grad = None
    out = fwd()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(g)
    return out.detach(), _grads(params)


def assert_fused_matches_reference(fwd, params, rtol=1e-5, atol=1e-4):
    """Forward bit for bit; gradients within float32 rounding of the reference's (atol relative to the largest
    entry: group sums like an LSQ step-size gradient cancel, and the two paths round them differently)."""
    with levers(fused_quant=False):
        ref, ref_g = _run(fwd, params)
    with levers(fused_quant=True):
        got, got_g = _run(fwd, params)
    assert torch.equal(got, ref)  # the fused forward is the reference's value, bit for bit
    for p, a, b in zip(params, ref_g, got_g):
        assert (a is None) == (b is None), p.shape
        if a is not None:
            scale = a.abs().max().clamp_min(1e-30)
            torch.testing.assert_close(b / scale, a / scale, rtol=rtol, atol=atol)
    return ref_g


def test_levers_context_restores_and_rejects_unknown_names():
    assert LEVERS.fused_quant
    with levers(fused_quant=False, fused_loss=False):
        assert not LEVERS.fused_quant and not LEVERS.fused_loss
    assert LEVERS.fused_quant and LEVERS.fused_loss
    with pytest.raises(ValueError, match="unknown speed lever"):
        with levers(fused_quantizer=False):
            pass


# ---- weight and activation quantizers: fused forward/backward == autograd reference ---------------------------------
@pytest.mark.parametrize("bits,group,sym,lwc", [(2, 64, False, False), (4, 32, False, False), (3, 16, True, False),
                                                (8, -1, False, False), (2, 32, False, True), (4, 64, True, True)])
def test_uniform_fused_matches_reference(bits, group, sym, lwc):
    torch.manual_seed(0)
    w0 = torch.randn(48, 128) * 0.05
    w0[:, :3] *= 10  # outliers: with the shrunk scales below, many weights sit outside the grid (clamp masks)
    q = UniformQuantizer(WeightSpec(bits=bits, group_size=group, sym=sym, lwc=lwc), 48, 128)
    w = torch.nn.Parameter(q.init_from(w0))
    with torch.no_grad():
        if lwc:
            q.clip_max_logit.uniform_(-1, 3)
            q.clip_min_logit.uniform_(-1, 3)
        else:
            q.scale.mul_(torch.empty_like(q.scale).uniform_(0.3, 1.2))
            q.zero.add_(0.4)  # off-integer: the straight-through round of z is exercised too
    params = [w, *(p for p in q.parameters() if p.requires_grad)]
    grads = assert_fused_matches_reference(lambda: q(w), params)
    assert grads[0].abs().sum() > 0 and all(g is None or g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # the no-grad path gives the same value
        assert torch.equal(q(w), q.unpack(q.pack(w)))


def test_uniform_frozen_codes_fused_matches_reference():
    torch.manual_seed(1)
    q = UniformQuantizer(WeightSpec(bits=2, group_size=32), 16, 64)
    w = q.init_from(torch.randn(16, 64))
    s, z = q.scale_zero(w)
    q.frozen_codes = torch.clamp(torch.round(w.reshape(16, 2, 32) / s.detach().unsqueeze(-1)) + z.detach()
                                 .unsqueeze(-1), 0, 3)
    with torch.no_grad():
        q.scale.mul_(1.1)
    grads = assert_fused_matches_reference(lambda: q(w), [q.scale, q.zero])
    assert grads[0].abs().min() > 0  # every step size trains with frozen codes


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, False)])
def test_activation_fused_matches_reference(bits, sym):
    torch.manual_seed(2)
    a = ActQuantizer(ActSpec(bits=bits, sym=sym), 64).train()
    with torch.no_grad():
        a.clip_max_logit.fill_(1.0)  # clip ~0.73 of the range: the clamp masks are exercised
        if a.clip_min_logit is not None:
            a.clip_min_logit.fill_(0.5)
    x = torch.nn.Parameter(torch.randn(3, 10, 64) * torch.linspace(0.1, 4, 64))
    params = [x, *(p for p in a.parameters() if p.requires_grad)]
    grads = assert_fused_matches_reference(lambda: a(x), params)
    assert all(g.abs().sum() > 0 for g in grads)
    a.eval()
    with torch.no_grad():
        from qat_kernels.act_quant import act_fake_quant

        assert torch.equal(a(x), act_fake_quant(x, a.export_params()))


@pytest.mark.parametrize("mode", ["soft", "hard_ste", "hardened"])
def test_binary11_fused_matches_reference(mode):
    torch.manual_seed(3)
    q = Binary11Quantizer(WeightSpec(format="binary11", group_size=32), 24, 128,
                          bitmap_forward="soft" if mode == "soft" else "hard_ste")
    w = torch.nn.Parameter(q.init_from(torch.randn(24, 128) * 0.05))
    with torch.no_grad():  # spread the relaxed bitmap over [-0.2, 1.2]: both clamp edges and exact 0 / 1 occur
        q.bitmap_fp.copy_(torch.empty_like(q.bitmap_fp).uniform_(-0.2, 1.2))
        q.bitmap_fp[:, :8] = torch.randint(0, 2, (24, 8)).float()
    if mode == "hardened":
        q.harden()
    params = [w, q.alpha, q.mu, q.bitmap_fp]
    grads = assert_fused_matches_reference(lambda: q(w), params)
    assert (grads[3] is None) == (mode == "hardened")
    if mode != "soft":
        with torch.no_grad():
            assert torch.equal(q(w), q.unpack(q.pack(w)))


@pytest.mark.parametrize("m,n", [(32, 64), (24, 96)])
def test_vq_fused_matches_reference(m, n):
    torch.manual_seed(4)
    q = VQQuantizer(WeightSpec(format="vq"), m, n)
    U = torch.nn.Parameter(q.init_from(torch.randn(m, n) * 0.05))
    with torch.no_grad():
        for p in (q.A, q.b, q.s_u, q.s_v):
            p.add_(1e-2 * torch.randn(p.shape))
        U.add_(0.3 / q.latent_scale * torch.randn(m, n))  # off the code centres: DGE slopes vary
    params = [U, q.A, q.b, q.s_u, q.s_v]
    grads = assert_fused_matches_reference(lambda: q(U), params, rtol=1e-4, atol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        assert torch.equal(q(U), q.unpack(q.pack(U)))


def test_quant_linear_training_step_matches_reference():
    """A whole QuantLinear (W4A4 with Hadamard rotation) through F.linear: same output, same gradients."""
    torch.manual_seed(5)
    spec = QuantSpec.from_dict({"weight": {"bits": 4, "group_size": 32}, "act": {"bits": 4, "hadamard": True}})
    lin = QuantLinear.from_linear(torch.nn.Linear(64, 48), spec)
    with torch.no_grad():
        lin.weight.copy_(lin.weight_quantizer.init_from(lin.weight))
    lin.train()
    x = torch.nn.Parameter(torch.randn(2, 7, 64))
    params = [x, *(p for p in lin.parameters() if p.requires_grad)]
    assert_fused_matches_reference(lambda: lin(x), params)


# ---- chunked logit losses == the autograd reference --------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "cakld", "ce"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_logit_losses_match_reference(kind, temperature, monkeypatch):
    from qat.distill import losses

    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk: chunks cross no batch row, 7 = 3+3+1
    g = torch.Generator().manual_seed(7)
    s0 = torch.randn(2, 7, 50, generator=g) * 3
    t = torch.randn(2, 7, 50, generator=g) * 3
    ids = torch.randint(0, 50, (2, 7), generator=g)
    out = {}
    for fused in (False, True):
        s = s0.clone().requires_grad_(True)
        with levers(fused_loss=fused):
            loss = losses.logits_loss(kind, s, t, ids, temperature=temperature, gamma=0.3)
        (loss * 1.7).backward()  # a non-unit upstream gradient
        out[fused] = (loss.detach(), s.grad)
    assert out[True][0].dtype == out[False][0].dtype == torch.float32
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-4, atol=1e-7)
    if kind == "ce":
        assert torch.equal(out[True][1][:, -1], torch.zeros(2, 50))  # the last position predicts nothing
    with torch.no_grad():  # no gradient wanted: same value, nothing else
        assert torch.allclose(losses.logits_loss(kind, s0, t, ids, temperature=temperature, gamma=0.3), out[True][0])


# ---- eval-mode weight cache: student inference at its export's speed ------------------------------------------------
def _counting(model) -> dict[str, int]:
    """Count weight-quantizer forwards per layer (a forward hook registered once, before anything is cached)."""
    calls = {}
    for name, m in quant_linears(model).items():
        calls[name] = 0

        def hook(_mod, _args, _out, name=name):
            calls[name] += 1

        m.weight_quantizer.register_forward_hook(hook)
    return calls


def _reference_logits(model, x):
    with levers(cache_eval_weight=False), torch.no_grad():
        return model(x).logits


def test_eval_weight_cache_dequantizes_once_and_follows_every_change():
    model = tiny_model("llama")
    quantize_model(model, QuantSpec.from_dict({"weight": {"bits": 2, "group_size": 32}}))
    model.eval()
    calls = _counting(model)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = model(x).logits
        again = model(x).logits
    assert all(c == 1 for c in calls.values())  # dequantized once, reused by the second forward
    assert torch.equal(first, again) and torch.equal(first, _reference_logits(model, x))

    # an optimizer step on one layer's step sizes: only that layer is dequantized again, and the logits follow
    name, lin = next(iter(quant_linears(model).items()))
    opt = torch.optim.SGD([lin.weight_quantizer.scale], lr=1e-2)
    lin.weight_quantizer.scale.grad = torch.ones_like(lin.weight_quantizer.scale)
    opt.step()
    before = dict(calls)
    with torch.no_grad():
        stepped = model(x).logits
    assert calls[name] == before[name] + 1 and sum(calls.values()) == sum(before.values()) + 1
    assert not torch.equal(stepped, first) and torch.equal(stepped, _reference_logits(model, x))

    # load_state_dict, frozen codes and training mode all bypass or refresh the cache
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    before = sum(calls.values())
    with torch.no_grad():
        assert torch.equal(model(x).logits, stepped)
    assert sum(calls.values()) == before + len(calls)
    q = lin.weight_quantizer
    s, z = q.scale_zero(lin.weight)
    q.frozen_codes = torch.zeros(q.out_features, q.n_groups, q.group_size)  # every code 0: a visibly different weight
    with torch.no_grad():
        frozen = model(x).logits
    assert not torch.equal(frozen, stepped) and torch.equal(frozen, _reference_logits(model, x))
    q.frozen_codes = None
    for m in quant_linears(model).values():
        m.weight_quantizer.train()
    before = sum(calls.values())
    with torch.no_grad():
        model(x)
        model(x)
    assert sum(calls.values()) == before + 2 * len(calls)  # quantizers in training mode: never cached
    assert all(m._cache is None for m in quant_linears(model).values())


def test_binary11_cache_follows_hardening_and_bitmap_mode():
    model = tiny_model("llama")
    quantize_model(model, QuantSpec.from_dict({"weight": {"format": "binary11", "group_size": 32}}))
    model.eval()
    x = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        soft = model(x).logits
    lin = next(iter(quant_linears(model).values()))
    lin.weight_quantizer.bitmap_forward = "hard_ste"
    with torch.no_grad():
        hard = model(x).logits
    assert not torch.equal(soft, hard) and torch.equal(hard, _reference_logits(model, x))
    lin.weight_quantizer.bitmap_forward = "soft"
    lin.weight_quantizer.harden()
    with torch.no_grad():
        assert torch.equal(model(x).logits, _reference_logits(model, x))


@pytest.mark.parametrize("spec_dict", [{"weight": {"bits": 2, "group_size": 32}, "act": {"bits": 4}},
                                       {"weight": {"format": "binary11", "group_size": 32}},
                                       {"weight": {"format": "vq", "vq_dim": 4}}], ids=["W2A4", "binary11", "vq"])
def test_student_and_export_give_the_same_logits_and_tokens(tmp_path, spec_dict):
    """qat eval / qat generate on a student: the cached eval path gives its export's logits bit for bit (float32)
    and the same greedy tokens, and dequantizes each layer once for a whole generation (KV cache on)."""
    from test_export import export, make_student

    from qat.export import load_quantized
    from qat.export.generate import generate_ids
    from qat.export.runtime import set_dense_cache

    model, _, student = make_student(tmp_path, spec_dict)
    assert export(student, tmp_path / "export", "--dtype", "float32") == 0
    loaded = load_quantized(tmp_path / "export")
    set_dense_cache(loaded, True)  # qat generate's CPU path for exports
    calls = _counting(model)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for _ in range(2):  # the first call fills the cache, the second uses it
            assert torch.equal(model(x).logits, loaded(x).logits)
    prompt = x[:1, :6]
    a = generate_ids(model, prompt, max_new_tokens=10)
    b = generate_ids(loaded, prompt, max_new_tokens=10)
    assert a.shape == (1, 10) and torch.equal(a, b)
    assert all(c == 1 for c in calls.values())  # one dequantization per layer for every forward above


# ---- the benchmark script's smoke test -----------------------------------------------------------------------------
@pytest.mark.timeout(1000)  # 71 s on a loaded 2-core machine; the script itself is bounded by 900 s below
def test_bench_train_quick_runs_every_path(tmp_path):
    """scripts/bench_train.py --quick on a tiny random model: every path, two lever variants, a table, a profile."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(repo / "scripts" / "bench_train.py"), "--quick", "--out", str(tmp_path), "--threads", "1",
           "--rounds", "1", "--formats", "W2g64", "--variants", "default", "plain:fused_quant=0,fused_loss=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "train_speed" / "current.json").read_text())
    got = {(r["variant"], r["path"], r["format"]) for r in res["rows"]}
    want = {(v, p, f) for v in ("default", "plain") for p in ("qat", "kd", "kd_latent", "block")
            for f in ("W2g64",)} | {("default", "fp", "FP"), ("plain", "fp", "FP")}
    assert got == want
    assert all(r["median_s"] > 0 and r["memory_mib"] > 0 for r in res["rows"])
    assert all(r["ratio"] == 1.0 for r in res["rows"] if r["path"] == "fp")
    doc = (tmp_path / "TRAIN_SPEED.md").read_text()
    assert "<!-- bench_train:current begin -->" in doc and "| default | 2 | qat | W2g64 |" in doc
    assert res["profile"] and "aten::" in res["profile"]["table"]
