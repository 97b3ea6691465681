"""Dynamic per-token activation quantization: qat_kernels.act_quant (plain-torch math) and
qat.quantizers.activation.ActQuantizer (learnable clip / knee), plus W4A4 through QuantLinear with and without the
Hadamard rotation."""
from __future__ import annotations

import pytest
import torch
from qat_kernels.act_quant import (
    MIN_SCALE,
    act_fake_quant,
    dequantize_per_token,
    fake_quant_knee_per_token,
    fake_quant_per_token,
    per_token_scale_zero,
    quantize_per_token,
)
from torch import nn

from qat.config import ActSpec, QuantConfigError, QuantSpec, WeightSpec
from qat.nn import QuantLinear
from qat.quantizers import make_act_quantizer
from qat.quantizers.activation import ActQuantizer

BITS_SYM = [(4, False), (4, True), (8, False), (8, True)]


def _tokens(seed: int = 0, shape=(3, 5, 64)) -> torch.Tensor:
    """Random tokens plus the awkward ones: all zero, constant positive, constant negative, tiny."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 4
    x[0, 0] = 0.0
    x[0, 1] = 3.0
    x[0, 2] = -0.5
    x[0, 3] = 1e-30
    return x


def _reference_per_token(x: torch.Tensor, bits: int, sym: bool):
    """The docstring formula, token by token on 0-d float32 tensors (clip factors = 1)."""
    codes, scales, zeros = [], [], []
    for t in x.reshape(-1, x.shape[-1]).float():
        if sym:
            qmax = 2 ** (bits - 1) - 1
            s = torch.clamp_min(t.abs().max() / qmax, MIN_SCALE)
            z = torch.tensor(0.0)
            q = torch.clamp(torch.round(t / s), -qmax, qmax)
        else:
            qmax = 2**bits - 1
            hi, lo = torch.clamp_min(t.max(), 0), torch.clamp_max(t.min(), 0)
            s = torch.clamp_min((hi - lo) / qmax, MIN_SCALE)
            z = torch.clamp(torch.round(-lo / s), 0, qmax)
            q = torch.clamp(torch.round(t / s) + z, 0, qmax)
        codes.append(q)
        scales.append(s)
        zeros.append(z)
    return torch.stack(codes).reshape(x.shape), torch.stack(scales), torch.stack(zeros)


# ---- kernel math ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym", BITS_SYM)
@pytest.mark.parametrize("clip", [(1.0, 1.0), (0.8, 0.6), "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_equals_dequantize_quantize(bits, sym, clip, dtype):
    x = _tokens(1).to(dtype)
    if clip == "tensor":  # per-token factors, as a learnable/ calibrated caller may pass
        g = torch.Generator().manual_seed(2)
        clip = (0.5 + 0.5 * torch.rand(3, 5, 1, generator=g), 0.5 + 0.5 * torch.rand(3, 5, 1, generator=g))
    q, scale, zero = quantize_per_token(x, bits, *clip, sym=sym)
    fq = fake_quant_per_token(x, bits, *clip, sym=sym)
    assert fq.dtype == dtype
    assert q.dtype == (torch.int8 if sym else torch.uint8) and q.shape == x.shape
    assert scale.dtype == zero.dtype == torch.float32 and scale.shape == (3, 5, 1)
    assert torch.equal(fq, dequantize_per_token(q, scale, zero, dtype))
    # bf16 input: the math is the float32 math of the (exactly widened) input
    assert torch.equal(fq, fake_quant_per_token(x.float(), bits, *clip, sym=sym).to(dtype))


@pytest.mark.parametrize("bits,sym", BITS_SYM)
def test_codes_match_reference_and_error_is_half_a_step(bits, sym):
    x = _tokens(3)
    q, scale, zero = quantize_per_token(x, bits, sym=sym)
    ref_q, ref_s, ref_z = _reference_per_token(x, bits, sym)
    assert torch.equal(q.float(), ref_q)
    assert torch.equal(scale.reshape(-1), ref_s) and torch.equal(zero.reshape(-1), ref_z)
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    # every output lies on its token's grid and within half a step of the input (clip factors = 1)
    x_hat = dequantize_per_token(q, scale, zero)
    assert torch.equal(x_hat, (q.float() - zero) * scale)
    err = (x - x_hat).abs()
    assert (err <= scale / 2 * (1 + 1e-6)).all(), float((err / scale).max())
    assert torch.equal(x_hat[0, 0], torch.zeros(64))  # zero-width token: exact zeros
    assert float(zero[0, 0]) == 0.0 and scale[0, 0].item() == torch.tensor(MIN_SCALE).item()
    assert torch.equal(x_hat[0, 1], x[0, 1]) and torch.equal(x_hat[0, 2], x[0, 2])  # constant tokens hit the edge


@pytest.mark.parametrize("bits,sym,n_levels", [(4, False, 16), (8, False, 256), (4, True, 15), (8, True, 255)])
def test_all_levels_used_on_a_spread_token(bits, sym, n_levels):
    x = torch.linspace(-2.0, 2.0, 4096).unsqueeze(0) if sym else torch.linspace(-1.0, 2.0, 4096).unsqueeze(0)
    q = quantize_per_token(x, bits, sym=sym)[0]
    assert torch.unique(q).numel() == n_levels
    assert torch.unique(fake_quant_per_token(x, bits, sym=sym)).numel() == n_levels


def test_clipping_saturates_at_the_clipped_range():
    x = torch.linspace(-1.0, 2.0, 301).unsqueeze(0)
    x_hat = fake_quant_per_token(x, 8, clip_hi=0.5, clip_lo=0.25)
    # range [-0.25, 1.0] (within float rounding of the grid), everything beyond saturates
    assert abs(float(x_hat.max()) - 1.0) < 1e-6 and abs(float(x_hat.min()) + 0.25) < 2.5e-3
    assert int((x_hat == x_hat.max()).sum()) >= 100


def test_kernel_rejects_bad_factors_and_bits():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"clip_hi must be in \(0, 1\], got 1.5"):
        quantize_per_token(x, 4, clip_hi=1.5)
    with pytest.raises(ValueError, match=r"clip_lo must be in \(0, 1\], got 0.0"):
        fake_quant_per_token(x, 4, clip_lo=0.0)
    with pytest.raises(ValueError, match="supports 2..8 bits, got 16"):
        quantize_per_token(x, 16)
    with pytest.raises(ValueError, match="unknown activation quantization mode 'lut'"):
        act_fake_quant(x, {"mode": "lut"})


# ---- ActQuantizer, uniform mode -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym", BITS_SYM)
def test_uniform_eval_forward_is_the_kernel_bit_for_bit(bits, sym):
    qz = ActQuantizer(ActSpec(bits=bits, sym=sym), 64)
    with torch.no_grad():
        qz.clip_max_logit.fill_(1.3)
        if not sym:
            qz.clip_min_logit.fill_(0.4)
    x = _tokens(4)
    y_train = qz.train()(x)
    y = qz.eval()(x)
    p = qz.export_params()
    assert p == {"mode": "uniform", "bits": bits, "sym": sym, "clip_hi": pytest.approx(0.785835, abs=1e-6),
                 "clip_lo": pytest.approx(0.785835 if sym else 0.598688, abs=1e-6)}
    q, scale, zero = quantize_per_token(x, bits, p["clip_hi"], p["clip_lo"], sym)
    assert torch.equal(y, dequantize_per_token(q, scale, zero))
    assert torch.equal(y, act_fake_quant(x, p))
    assert torch.equal(y_train, y)  # the straight-through round changes gradients, never values


def test_bf16_inputs_and_params():
    qz = ActQuantizer(ActSpec(bits=4), 64).eval()
    x = _tokens(5).to(torch.bfloat16)
    y = qz(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, act_fake_quant(x.float(), qz.export_params()).to(torch.bfloat16))
    qz.to(torch.bfloat16)  # a model cast to bf16: the factors are still computed in float32
    assert qz.clip_factors()[0].dtype == torch.float32 and qz(x).dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["uniform", "knee"])
@pytest.mark.parametrize("sym", [False, True])
def test_gradients_reach_clip_and_knee_logits(mode, sym):
    qz = ActQuantizer(ActSpec(bits=4, sym=sym, mode=mode), 64).train()
    torch.manual_seed(7)
    x = (torch.distributions.StudentT(3.0).sample((16, 64))).requires_grad_()
    ((qz(x) - x.detach()) ** 2).mean().backward()
    names = {n for n, _ in qz.named_parameters()}
    expected = {"clip_max_logit"} | ({"knee_max_logit"} if mode == "knee" else set())
    if not sym:
        expected |= {n.replace("max", "min") for n in expected}
    assert names == expected
    for n, p in qz.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs()) > 0, n
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0


def test_learned_clipping_beats_unclipped_on_heavy_tails():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((64, 256))

    def mse(y):
        return float(((y.detach() - x) ** 2).mean())

    unclipped = mse(fake_quant_per_token(x, 4))
    best_grid = min(mse(fake_quant_per_token(x, 4, c / 100, c / 100)) for c in range(50, 101, 2))
    qz = ActQuantizer(ActSpec(bits=4), 256).train()
    opt = torch.optim.Adam(qz.parameters(), lr=0.1)
    for _ in range(60):
        loss = ((qz(x) - x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned = mse(qz.eval()(x))
    # measured: unclipped 0.0477, best scalar clip on a 0.02 grid 0.0414 (c = 0.88), learned 0.0416
    assert learned < 0.9 * unclipped
    assert learned < 1.02 * best_grid
    assert qz.export_params()["clip_hi"] < 0.95


def test_init_from_percentiles():
    sym = ActQuantizer(ActSpec(bits=4, sym=True, mode="knee"), 1001)
    sym.init_from(torch.linspace(0.0, 1.0, 1001).repeat(4, 1), clip_pct=0.9, knee_pct=0.45)
    p = sym.export_params()
    assert p["clip_hi"] == pytest.approx(0.9, abs=1e-5) and p["knee_hi"] == pytest.approx(0.5, abs=1e-5)
    # asymmetric: each side's tail at half the probability; x in [-1, 2]
    asym = ActQuantizer(ActSpec(bits=4), 3001)
    asym.init_from(torch.linspace(-1.0, 2.0, 3001).repeat(2, 3, 1), clip_pct=0.9, knee_pct=0.45)
    p = asym.export_params()
    assert p["clip_hi"] == pytest.approx(1.85 / 2, abs=1e-5) and p["clip_lo"] == pytest.approx(0.85, abs=1e-5)
    with pytest.raises(ValueError, match="need 0 < knee_pct < clip_pct < 1"):
        asym.init_from(torch.randn(4, 3001), clip_pct=0.9)
    with pytest.raises(ValueError, match="sample width 10 != in_features 3001"):
        asym.init_from(torch.randn(4, 10))
    with pytest.raises(ValueError, match="input width 10 != in_features 3001"):
        asym(torch.randn(4, 10))


# ---- ActQuantizer, knee mode ---------------------------------------------------------------------------------------
def _knee_levels(t: torch.Tensor, p: dict) -> torch.Tensor:
    """The explicit level set of one token (float32, as the docstring builds it)."""
    one = lambda v: torch.tensor(v, dtype=torch.float32)
    if p["sym"]:
        hi = lo = t.abs().max()
        c_hi = c_lo = one(p["clip_hi"]) * hi
        k_hi = k_lo = one(p["knee_hi"]) * c_hi
    else:
        hi, lo = t.max().clamp_min(0), (-t.min()).clamp_min(0)
        c_hi, c_lo = one(p["clip_hi"]) * hi, one(p["clip_lo"]) * lo
        k_hi, k_lo = one(p["knee_hi"]) * c_hi, one(p["knee_lo"]) * c_lo
    l_in, half = p["levels_in"], p["levels_out"] // 2
    s_in = ((k_hi + k_lo) / (l_in - 1)).clamp_min(MIN_SCALE)
    bottom = -k_lo
    top = bottom + (l_in - 1) * s_in
    s_up, s_dn = ((c_hi - top) / half).clamp_min(MIN_SCALE), ((c_lo + bottom) / half).clamp_min(MIN_SCALE)
    body = [bottom + i * s_in for i in range(l_in)]
    tails = [top + j * s_up for j in range(1, half + 1)] + [bottom - j * s_dn for j in range(1, half + 1)]
    return torch.stack(body + tails)


@pytest.mark.parametrize("bits,sym", BITS_SYM)
def test_knee_eval_uses_at_most_2_to_the_bits_levels(bits, sym):
    qz = ActQuantizer(ActSpec(bits=bits, sym=sym, mode="knee"), 4096).eval()
    g = torch.Generator().manual_seed(6)
    spread = torch.linspace(-3.0, 3.0, 4096) if sym else torch.linspace(-1.0, 3.0, 4096)
    x = torch.cat([spread.unsqueeze(0), torch.randn(3, 4096, generator=g) ** 3])
    qz.init_from(x)
    y = qz(x)
    p = qz.export_params()
    assert p["levels_in"] + p["levels_out"] == 2**bits
    assert torch.equal(y, act_fake_quant(x, p))
    for t, yt in zip(x, y):
        levels = _knee_levels(t, p)
        used = torch.unique(yt)
        assert used.numel() <= 2**bits
        assert torch.isin(used, levels).all()
    assert torch.unique(y[0]).numel() == 2**bits  # the spread token fills every level


def test_knee_soft_mask_follows_temperature():
    qz = ActQuantizer(ActSpec(bits=4, mode="knee"), 256)
    torch.manual_seed(8)
    x = torch.distributions.StudentT(3.0).sample((8, 256))
    qz.init_from(x)
    with torch.no_grad():
        hard = qz.eval()(x)
        qz.train()
        soft = qz(x)
        assert float((soft - hard).abs().max()) > 1e-3  # temperature 0.1: the soft mask blends body and tail
        qz.temperature = 1e-7
        assert torch.allclose(qz(x), hard, atol=1e-5)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        qz.temperature = 0


def test_knee_hard_mask_reduces_to_the_body_grid_inside_the_knee():
    x = torch.tensor([[-1.0, -0.2, 0.0, 0.1, 0.3, 2.0]])
    y = fake_quant_knee_per_token(x, 4, 1.0, 1.0, 0.5, 0.5, sym=True)
    # c = 2, k = 1: body step 2/11 from -1; tails step 0.5 beyond +-1
    s = torch.tensor(2.0) / 11
    assert torch.allclose(y[0, :5], -1 + torch.round((x[0, :5] + 1) / s) * s)
    assert float(y[0, 5]) == pytest.approx(2.0)


# ---- specs ---------------------------------------------------------------------------------------------------------
def test_spec_errors():
    with pytest.raises(QuantConfigError, match=r"act bits must be one of \(4, 8, 16\) \(16 = no activation "
                                               r"quantization\), got 3"):
        ActSpec(bits=3)
    with pytest.raises(QuantConfigError, match="unknown activation mode 'foo'; supported: uniform, knee"):
        ActSpec(bits=4, mode="foo")
    with pytest.raises(QuantConfigError, match="ActQuantizer needs act bits 4 or 8, got 16"):
        ActQuantizer(ActSpec(bits=16), 64)
    with pytest.raises(QuantConfigError, match="knee levels_out must be even, >= 2 and leave >= 2 body levels of 16"):
        ActQuantizer(ActSpec(bits=4, mode="knee"), 64, knee_levels_out=3)
    assert make_act_quantizer(ActSpec(bits=16), 64) is None
    assert isinstance(make_act_quantizer(ActSpec(bits=8), 64), ActQuantizer)


# ---- W4A4 through QuantLinear --------------------------------------------------------------------------------------
def _w4a4(hadamard: bool, seed: int = 0, n: int = 256, m: int = 128):
    torch.manual_seed(seed)
    lin = nn.Linear(n, m)
    with torch.no_grad():
        lin.weight.normal_(0, n**-0.5)
    spec = QuantSpec(weight=WeightSpec(bits=4, group_size=128), act=ActSpec(bits=4, hadamard=hadamard))
    q = QuantLinear.from_linear(lin, spec)
    with torch.no_grad():
        q.weight.copy_(q.weight_quantizer.init_from(q.weight))
    return lin, q.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("hadamard", [False, True])
def test_w4a4_quantlinear_close_to_fp_on_gaussian_inputs(hadamard):
    """Rounding-noise model: each quantized value is off by U(-s/2, s/2) (variance s^2/12), independently, so
    rel_err(y)^2 ~= rel_err(x)^2 + rel_err(W)^2 with both computed from the actual scales. Gaussian tokens of width
    256 span ~5.6 sigma -> s ~ 0.37 sigma -> rel_err(x) ~ 0.108; Gaussian weights in groups of 128 -> ~0.10; so
    ~0.147 (measured 0.146-0.148 over seeds, rotated or not: a rotation does not change Gaussian statistics)."""
    lin, q = _w4a4(hadamard)
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        rel = _rel(q(x), lin(x))
        xr = q.rotate_input(x)
        s_x, _ = per_token_scale_zero(xr, 4, *q.act_quantizer.clip_factors())
        rel_x2 = float((s_x**2 / 12).sum() * 256 / (xr**2).sum())
        s_w, _ = q.weight_quantizer.scale_zero(q.weight)
        rel_w2 = float((s_w**2 / 12).sum() * 128 / (q.weight.float() ** 2).sum())
    predicted = (rel_x2 + rel_w2) ** 0.5
    assert 0.13 < predicted < 0.16
    assert abs(rel - predicted) < 0.1 * predicted, (rel, predicted)


def test_hadamard_rotation_tames_outlier_channels():
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(2))
    x[:, [3, 77, 150, 201]] *= 30  # a few outlier channels, as in LLM residual streams
    errs = {}
    for hadamard in (False, True):
        lin, q = _w4a4(hadamard)
        with torch.no_grad():
            errs[hadamard] = _rel(q(x), lin(x))
    # the outliers set every token's scale, flattening the 252 normal channels to ~0 unless rotated
    assert errs[True] < 0.75 * errs[False], errs


@pytest.mark.parametrize("mode", ["uniform", "knee"])
def test_w4a4_tiny_model_trains_activation_params(mode):
    from conftest import tiny_model

    from qat.nn import quant_linears, quantize_model

    model = tiny_model("llama")
    spec = QuantSpec(weight=WeightSpec(bits=4, group_size=32), act=ActSpec(bits=4, mode=mode, hadamard=True))
    names = quantize_model(model, spec)
    keys = set(model.state_dict())
    assert all(f"{n}.act_quantizer.clip_max_logit" in keys for n in names)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(9))
    for p in model.parameters():
        p.requires_grad_(False)
    act_params = [p for n, p in model.named_parameters() if ".act_quantizer." in n]
    for p in act_params:
        p.requires_grad_(True)
    model.train()
    model(ids).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in act_params)
    assert sum(float(p.grad.abs()) > 0 for p in act_params) == len(act_params)
    model.eval().to(torch.bfloat16)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert len(quant_linears(model)) == len(names)
