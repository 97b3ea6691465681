"""W(1+1) binary weights (qat/quantizers/binary.py): storage round trip, soft/hard forwards, gradients, PTQ init."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qat.config import QuantConfigError, QuantSpec, WeightSpec
from qat.nn import QuantLinear
from qat.quantizers import binary, make_weight_quantizer
from qat.quantizers.binary import Binary11Quantizer, em_binary11


def make(out: int = 32, inf: int = 256, g: int = 64, **kw) -> Binary11Quantizer:
    return Binary11Quantizer(WeightSpec(format="binary11", group_size=g), out, inf, **kw)


def heavy_tailed(out: int, inf: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, inf, generator=gen) * 0.02 * (1 + torch.rand(out, inf, generator=gen) ** 8 * 4)


def correlated_inputs(n: int, d: int, seed: int = 1) -> torch.Tensor:
    """Low-rank + noise activations with a few loud channels, like a transformer's linear inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d // 8, generator=gen) @ torch.randn(d // 8, d, generator=gen)
    x = x + 0.3 * torch.randn(n, d, generator=gen)
    return x * (1 + 5 * (torch.rand(d, generator=gen) < 0.03))


def out_err(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative output error ||x W^T - x W_hat^T||^2 / ||x W^T||^2."""
    return float(((x @ (w - w_hat.detach()).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def sign_mean(w: torch.Tensor) -> torch.Tensor:
    """Plain binarization: sign(W) * mean|W| per output row."""
    return torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)


def hard_forward(q: Binary11Quantizer, w: torch.Tensor) -> torch.Tensor:
    mode = q.bitmap_forward
    q.bitmap_forward = "hard_ste"
    try:
        return q(w)
    finally:
        q.bitmap_forward = mode


# ---- spec, registry, storage --------------------------------------------------------------------------------------
def test_registry_and_bits_per_weight():
    q = make_weight_quantizer(WeightSpec(format="binary11", group_size=64), 8, 128)
    assert isinstance(q, Binary11Quantizer) and q.format == "binary11"
    assert q.bits_per_weight == 3.0
    assert make(g=128).bits_per_weight == 2.5
    assert make(inf=256, g=-1).bits_per_weight == 2.25


def test_bits_other_than_two_rejected():
    with pytest.raises(QuantConfigError, match=r"format binary11 stores 1 sign bit \+ 1 bitmap bit per weight "
                                               r"\(bits=2\), got bits=3"):
        QuantSpec.from_dict({"weight": {"format": "binary11", "bits": 3}})


def test_group_must_divide_width():
    with pytest.raises(QuantConfigError, match="group_size 128 does not divide in_features 576"):
        make(out=8, inf=576, g=128)


def test_bad_options_rejected():
    with pytest.raises(QuantConfigError, match="bitmap_forward must be one of .* got 'hard'"):
        make(bitmap_forward="hard")
    q = make()
    with pytest.raises(QuantConfigError, match="importance must be one of .* got 'hessian'"):
        q.init_from(heavy_tailed(32, 256), importance="hessian")
    with pytest.raises(QuantConfigError, match="NaN or inf"):
        q.init_from(torch.full((32, 256), float("nan")))


@pytest.mark.parametrize("g", [32, 64, 128, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpack_pack_bit_exact_after_training_and_harden(g, dtype):
    out, inf = 24, 256
    q = make(out, inf, g)
    w = q.init_from(heavy_tailed(out, inf).to(dtype))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained: bitmap anywhere in (and beyond) [0, 1], params and latent moved
        q.bitmap_fp.copy_(torch.rand(out, inf, generator=gen) * 1.4 - 0.2)
        q.alpha.mul_(1 + 0.1 * torch.randn(q.alpha.shape, generator=gen))
        q.mu.add_(0.003 * torch.randn(q.mu.shape, generator=gen))
        w = (w.float() + 0.005 * torch.randn(out, inf, generator=gen)).to(dtype)
    assert torch.equal(q.unpack(q.pack(w)), hard_forward(q, w))  # hard_ste forward is already the packed form
    q.harden()
    packed = q.pack(w)
    ng = inf // q.group_size
    assert packed["signs"].dtype == packed["bitmap"].dtype == torch.uint8
    assert packed["signs"].shape == packed["bitmap"].shape == (out, inf // 8)
    assert packed["alpha"].dtype == packed["mu"].dtype == torch.float16
    assert packed["alpha"].shape == packed["mu"].shape == (out, ng, 2)
    assert torch.equal(q.unpack(packed), q(w))


def test_bitmap_bit_is_pair_index():
    """G_FP = 1 (bitmap bit 1) selects pair 1 in the forward, in the packed bitmap and in the reference dequant."""
    q = make(4, 64, 64)
    w = heavy_tailed(4, 64)
    with torch.no_grad():
        q.alpha.copy_(torch.tensor([0.01, 0.04]).expand(4, 1, 2))
        q.mu.copy_(torch.tensor([0.002, -0.003]).expand(4, 1, 2))
        q.bitmap_fp.fill_(1.0)
    a1, m1 = torch.tensor(0.04).half().float(), torch.tensor(-0.003).half().float()
    expected = a1 * torch.where(w - m1 >= 0, 1.0, -1.0) + m1
    assert torch.equal(q(w), expected)
    assert torch.all(q.pack(w)["bitmap"] == 255)
    assert torch.equal(q.unpack(q.pack(w)), expected)


def test_soft_forward_with_binary_bitmap_equals_hard():
    q = make()
    w = q.init_from(heavy_tailed(32, 256))
    with torch.no_grad():
        q.bitmap_fp.copy_(torch.randint(0, 2, q.bitmap_fp.shape, generator=torch.Generator().manual_seed(0)).float())
    soft = q(w)
    assert torch.equal(soft, hard_forward(q, w))
    q.harden()
    assert torch.equal(soft, q(w))
    assert torch.equal(soft, q.unpack(q.pack(w)))
    with torch.no_grad():  # and a bitmap strictly inside (0, 1) really mixes the pairs
        q.bitmap_fp.fill_(0.3)
    q.hardened.fill_(False)
    q._sync_hardened()
    assert not torch.equal(q(w), soft)


def test_harden_snaps_and_persists_through_state_dict():
    spec = QuantSpec(weight=WeightSpec(format="binary11", group_size=64))
    torch.manual_seed(0)
    lin = QuantLinear.from_linear(nn.Linear(128, 16), spec)
    qz = lin.weight_quantizer
    with torch.no_grad():
        lin.weight.copy_(qz.init_from(lin.weight))
        qz.bitmap_fp[0, :4] = torch.tensor([0.49, 0.5, 1.3, -0.2])
    qz.harden()
    assert qz.bitmap_fp[0, :4].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert qz.is_hard and bool(qz.hardened)
    sd = lin.state_dict()
    assert set(sd) == {"weight", "bias", "weight_quantizer.alpha", "weight_quantizer.mu",
                       "weight_quantizer.bitmap_fp", "weight_quantizer.hardened"}
    fresh = QuantLinear(128, 16, True, spec)
    assert not fresh.weight_quantizer.is_hard
    fresh.load_state_dict(sd)
    assert fresh.weight_quantizer.is_hard and bool(fresh.weight_quantizer.hardened)
    x = torch.randn(5, 128)
    assert torch.equal(fresh(x), lin(x))


def test_polarization_loss_values():
    q = make(2, 64, 64)
    with torch.no_grad():
        q.bitmap_fp.fill_(0.5)
        assert float(q.polarization_loss(2.0)) == 1.0
        q.bitmap_fp.copy_(torch.randint(0, 2, (2, 64)).float())
        assert float(q.polarization_loss(2.0)) == 0.0
        q.bitmap_fp.fill_(0.75)  # |2G - 1| = 0.5 -> (1 - 0.5^2)^2 = 0.5625, (1 - 0.5^4)^2 = 0.87890625
        assert float(q.polarization_loss(2.0)) == 0.5625
        assert float(q.polarization_loss(4.0)) == 0.87890625
        q.bitmap_fp.fill_(0.6)
    q.polarization_loss(2.0).backward()
    assert torch.all(q.bitmap_fp.grad < 0)  # descent pushes 0.6 towards 1


# ---- training ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["soft", "hard_ste"])
def test_gradients_reach_every_learnable(mode):
    q = make(bitmap_forward=mode)
    w = nn.Parameter(q.init_from(heavy_tailed(32, 256)))
    x = correlated_inputs(64, 256)
    ((x @ (q(w) - heavy_tailed(32, 256, seed=5)).T) ** 2).mean().backward()
    for name, p in [("latent", w), ("alpha", q.alpha), ("mu", q.mu), ("bitmap_fp", q.bitmap_fp)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_hardened_forward_freezes_bitmap_and_clipped_ste_masks_latent():
    q = make(ste_clip=1.0)
    w = nn.Parameter(q.init_from(heavy_tailed(32, 256)))
    q.harden()
    q(w).sum().backward()
    assert q.bitmap_fp.grad is None
    assert q.alpha.grad.abs().sum() > 0 and q.mu.grad.abs().sum() > 0
    a, m = (t.repeat_interleave(q.group_size, 1) for t in q.pair_params())  # [out, in, 2]
    G = q.hard_bitmap().long().unsqueeze(-1)
    a_sel, m_sel = a.gather(2, G).squeeze(-1), m.gather(2, G).squeeze(-1)
    inside = (w.detach() - m_sel).abs() <= a_sel
    assert inside.any() and (~inside).any()
    assert torch.equal(w.grad, a_sel * inside)  # d W_hat / dW = alpha_G inside the clip range, 0 outside


@pytest.mark.parametrize("mode,lam_reg", [("soft", 10.0), ("hard_ste", 0.0)])
def test_adam_steps_lower_output_reconstruction(mode, lam_reg):
    """A few Adam steps on ||x W^T - x W_hat^T||^2 (+ the annealed polarization term for the soft bitmap) lower the
    error of the *hardened* layer below the PTQ init's."""
    torch.manual_seed(0)
    w_fp = heavy_tailed(32, 256)
    x = correlated_inputs(256, 256)
    q = make(bitmap_forward=mode)
    w = nn.Parameter(q.init_from(w_fp))
    start = out_err(x, w_fp, hard_forward(q, w))
    opt = torch.optim.Adam([{"params": [w], "lr": 1e-4}, {"params": [q.alpha, q.mu], "lr": 1e-3},
                            {"params": [q.bitmap_fp], "lr": 1e-2}])
    steps = 40
    for i in range(steps):
        beta = 20 - 18 * i / (steps - 1)  # docs/METHODS.md §5.3: beta annealed 20 -> 2
        loss = ((x @ (w_fp - q(w)).T) ** 2).mean() + lam_reg * q.polarization_loss(beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.harden()
    end = out_err(x, w_fp, q(w))
    assert end < 0.7 * start, (start, end)


# ---- PTQ init ----------------------------------------------------------------------------------------------------
def test_em_init_is_canonical_nearest_level_and_beats_sign_mean():
    w = heavy_tailed(64, 256)
    x = correlated_inputs(512, 256)
    q = make(64, 256, 64)
    latent = q.init_from(w)
    assert torch.equal(latent, w)
    alpha, mu = q.alpha.detach(), q.mu.detach()
    assert torch.all(alpha[..., 0] <= alpha[..., 1])  # pair 0 has the smaller alpha
    assert torch.equal(alpha.half().float(), alpha) and torch.equal(mu.half().float(), mu)
    # the bitmap picks the nearest of the 4 levels mu_k +- alpha_k
    levels = torch.cat([mu - alpha, mu + alpha], -1).repeat_interleave(64, 1)  # [out, in, 4]
    nearest = (w.unsqueeze(-1) - levels).abs().amin(-1)
    w_hat = hard_forward(q, latent)
    assert torch.equal((w - w_hat).abs(), nearest)
    # G_FP starts 0.05 inside (0, 1) on the PTQ bitmap
    torch.testing.assert_close(q.bitmap_fp.detach(), torch.where(q.hard_bitmap(), 0.95, 0.05), rtol=0, atol=1e-6)
    e_em, e_sign = out_err(x, w, w_hat), out_err(x, w, sign_mean(w))
    assert e_em < 0.5 * e_sign, (e_em, e_sign)


def test_em_importance_pulls_levels_to_heavy_columns():
    w = heavy_tailed(256, 64).reshape(256, 64)
    imp = torch.ones(64)
    imp[7] = 1000.0

    def err_col7(importance):
        a, m, G = em_binary11(w, importance)
        a, m = a.gather(1, G), m.gather(1, G)
        return (w - (a * torch.where(w - m >= 0, 1.0, -1.0) + m))[:, 7].abs().mean()

    assert err_col7(imp) < 0.1 * err_col7(None)


def test_degenerate_groups_stay_finite():
    w = torch.zeros(4, 128)
    w[1] = 0.5
    w[2, 0] = 1.0  # one outlier, the rest zero
    q = make(4, 128, 64)
    w_hat = hard_forward(q, q.init_from(w))
    assert torch.isfinite(w_hat).all() and torch.all(q.alpha >= 1e-5)
    assert (w_hat - w).abs().max() < 1e-4


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("gptq_chunk", ["group", "column"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gptq_latent_reproduces_ptq_weight_exactly(monkeypatch, gptq_chunk, dtype):
    seen = {}
    real = binary.gptq_sequential

    def spy(*args, **kwargs):
        seen["Q"] = real(*args, **kwargs)
        return seen["Q"]

    monkeypatch.setattr(binary, "gptq_sequential", spy)
    w = heavy_tailed(32, 256).to(dtype)
    H = _hessian(correlated_inputs(512, 256))
    q = make(32, 256, 64)
    latent = q.init_from(w, hessian=H, gptq_chunk=gptq_chunk)
    assert latent.dtype == dtype and not torch.equal(latent, w)  # error-compensated
    assert torch.equal(hard_forward(q, latent), seen["Q"])
    q.harden()
    assert torch.equal(q(latent), seen["Q"]) and torch.equal(q.unpack(q.pack(latent)), seen["Q"])


def test_soft_forward_at_init_is_eps_blend():
    """Documented choice: with the default bitmap_eps=0.05 the soft forward mixes 5% of the other pair in; with
    bitmap_eps=0 it is the PTQ weight exactly."""
    w = heavy_tailed(32, 256)
    H = _hessian(correlated_inputs(512, 256))
    q = make()
    latent = q.init_from(w, hessian=H)
    p0, p1 = (p.reshape(32, 256) for p in q._pair_values(latent))
    G = q.hard_bitmap()
    blend = torch.where(G, 0.05 * p0 + 0.95 * p1, 0.95 * p0 + 0.05 * p1)
    torch.testing.assert_close(q(latent), blend, rtol=0, atol=1e-6)
    latent = q.init_from(w, hessian=H, bitmap_eps=0.0)
    assert torch.equal(q(latent), hard_forward(q, latent))


@pytest.mark.parametrize("importance", ["diag", "inv_diag", "uniform"])
def test_gptq_em_beats_no_hessian_em_on_output_error(importance):
    w = heavy_tailed(64, 256)
    x = correlated_inputs(1024, 256)
    q = make(64, 256, 64)
    e_plain = out_err(x, w, hard_forward(q, q.init_from(w)))
    e_group = out_err(x, w, hard_forward(q, q.init_from(w, hessian=_hessian(x), importance=importance)))
    e_col = out_err(x, w, hard_forward(q, q.init_from(w, hessian=_hessian(x), importance=importance,
                                                      gptq_chunk="column")))
    assert e_group < 0.7 * e_plain, (e_group, e_plain)
    assert e_col < 0.7 * e_plain, (e_col, e_plain)


# ---- real model ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_layers_init_beats_sign_mean(smollm2, wikitext_valid):
    model, tok = smollm2
    seq, n_cal = 256, 2
    ids = tok(wikitext_valid.read_text()[:60000], return_tensors="pt").input_ids[0, : (n_cal + 1) * seq]
    ids = ids.reshape(n_cal + 1, seq)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.14.mlp.down_proj", "model.layers.29.mlp.gate_proj"]
    inputs, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, n=n: inputs.__setitem__(n, args[0].detach().float())))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    print()
    for n in names:
        w = model.get_submodule(n).weight.detach().float()
        x_all = inputs[n]
        x_cal, x_eval = x_all[:n_cal].reshape(-1, x_all.shape[-1]), x_all[n_cal]  # held-out sequence for the error
        q = Binary11Quantizer(WeightSpec(format="binary11", group_size=64), *w.shape)
        errs = {"sign*mean|w|": out_err(x_eval, w, sign_mean(w)),
                "EM": out_err(x_eval, w, hard_forward(q, q.init_from(w)))}
        for chunk in ("group", "column"):
            errs[f"GPTQ+EM {chunk}"] = out_err(x_eval, w, hard_forward(q, q.init_from(w, hessian=_hessian(x_cal),
                                                                                      gptq_chunk=chunk)))
        print(n, tuple(w.shape), "  ".join(f"{k} {v:.4f}" for k, v in errs.items()))
        assert errs["EM"] < errs["sign*mean|w|"] and errs["GPTQ+EM group"] < errs["sign*mean|w|"], errs
