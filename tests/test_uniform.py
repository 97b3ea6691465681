"""Uniform intN quantizer: grid math, pack/unpack bit-exactness, gradients, GPTQ against a direct implementation."""
from __future__ import annotations

import pytest
import torch

from qat.config import QuantConfigError, QuantSpec, WeightSpec
from qat.quantizers.uniform import UniformQuantizer
from qat_kernels.packing import pack_bits, packed_width, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8])
def test_bit_stream_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 77), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_width(77, bits))
    assert torch.equal(unpack_bits(packed, bits, 77), codes.to(torch.int32))


def test_bit_stream_layout_is_little_endian_nibbles():
    # code j of a 4-bit row lives in byte j // 2, low nibble first: the layout the kernels read
    packed = pack_bits(torch.tensor([[1, 2, 3, 4]]), 4)
    assert packed.tolist() == [[0x21, 0x43]]
    assert pack_bits(torch.tensor([[1, 0, 3, 2]]), 2).tolist() == [[1 | 0 << 2 | 3 << 4 | 2 << 6]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [16, 64, -1])
@pytest.mark.parametrize("lwc", [False, True])
def test_unpack_pack_equals_forward_bit_exact(bits, sym, group_size, lwc):
    torch.manual_seed(0)
    w = torch.randn(24, 128) * 0.05
    q = UniformQuantizer(WeightSpec(bits=bits, group_size=group_size, sym=sym, lwc=lwc), 24, 128)
    q.init_from(w)
    with torch.no_grad():
        if not lwc:  # move off the init so the test also covers trained (non min/max) parameters
            q.scale.mul_(0.9)
        fq = q(w)
        packed = q.pack(w)
    assert torch.equal(q.unpack(packed), fq)
    assert packed["qweight"].shape == (24, packed_width(128, bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_matches_explicit_asymmetric_formula(bits):
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    q = UniformQuantizer(WeightSpec(bits=bits, group_size=32), 8, 64)
    q.init_from(w)
    wg = w.view(8, 2, 32)
    mx, mn = wg.amax(-1).clamp_min(0), wg.amin(-1).clamp_max(0)
    s = ((mx - mn) / (2**bits - 1)).half().float()
    z = torch.round(-mn / ((mx - mn) / (2**bits - 1))).clamp(0, 2**bits - 1)
    ref = (torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 2**bits - 1) - z[..., None]) * s[..., None]
    assert torch.equal(q(w), ref.view(8, 64))
    # at most half a step of error inside the range
    assert ((q(w) - w).abs().view(8, 2, 32) <= s[..., None] / 2 + 1e-7).all()


def test_symmetric_grid_is_centred():
    w = torch.linspace(-1, 1, 64).repeat(4, 1)
    q = UniformQuantizer(WeightSpec(bits=4, group_size=64, sym=True), 4, 64)
    q.init_from(w)
    assert torch.all(q.zero == 8)
    levels = torch.unique(q(w)[0])
    assert len(levels) <= 16 and levels.min() >= -8 * q.scale[0, 0] - 1e-6


def test_gradients_reach_scale_zero_and_clipping():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * 0.1
    for lwc in (False, True):
        q = UniformQuantizer(WeightSpec(bits=3, group_size=32, lwc=lwc), 16, 64)
        q.init_from(w)
        latent = w.clone().requires_grad_(True)
        x = torch.randn(32, 64)
        loss = ((x @ q(latent).t() - x @ w.t()) ** 2).mean()
        loss.backward()
        params = [latent] + list(q.parameters())
        for p in params:
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("lwc", [False, True])
def test_adam_steps_lower_reconstruction_error(lwc):
    torch.manual_seed(0)
    w = torch.randn(32, 128) * 0.05
    w[:, :4] *= 8  # a few outlier columns: the min/max init is not optimal
    x = torch.randn(256, 128)
    q = UniformQuantizer(WeightSpec(bits=2, group_size=64, lwc=lwc), 32, 128)
    latent = torch.nn.Parameter(q.init_from(w))
    opt = torch.optim.Adam([{"params": [latent], "lr": 1e-4}, {"params": q.parameters(), "lr": 1e-2 if lwc else 1e-3}])  # OmniQuant: LWC lr 1e-2

    def err():
        return ((x @ q(latent).t() - x @ w.t()) ** 2).mean()

    before = err().item()
    for _ in range(120):
        opt.zero_grad()
        loss = err()
        loss.backward()
        opt.step()
    assert err().item() < 0.92 * before


def _reference_gptq(W, H, bits, group, damp=0.01, block=128):
    """The original GPTQ column loop (Frantar et al.), with group params fitted on the compensated weights."""
    W = W.clone().double()
    H = H.clone().double()
    n = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    qmax = 2**bits - 1
    Q = torch.zeros_like(W)
    s = z = None
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:
                g = W1[:, i : i + group]
                mx, mn = g.amax(1).clamp_min(0), g.amin(1).clamp_max(0)
                s = ((mx - mn) / qmax).clamp_min(1e-5).half().double()
                z = torch.round(-mn / ((mx - mn) / qmax).clamp_min(1e-5)).clamp(0, qmax)
            w = W1[:, i]
            q = (torch.clamp(torch.round(w / s) + z, 0, qmax) - z) * s
            Q[:, i1 + i] = q
            e = (w - q) / Hinv[i1 + i, i1 + i]
            W1[:, i:] -= e[:, None] * Hinv[i1 + i, i1 + i : i2][None, :]
            Err[:, i] = e
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q


def test_gptq_matches_reference_loop_and_beats_rtn():
    torch.manual_seed(0)
    n, m = 128, 48
    X = torch.randn(512, n) @ (torch.randn(n, n) * 0.3 + torch.eye(n))  # correlated inputs
    H = 2 * X.t() @ X / X.shape[0]
    W = torch.randn(m, n) * 0.05
    q = UniformQuantizer(WeightSpec(bits=3, group_size=32), m, n)
    latent = q.init_from(W, hessian=H, block_size=64)
    ref = _reference_gptq(W, H, 3, 32, block=64).float()
    # same algorithm, float32 vs float64 arithmetic: codes agree except for rare ties at rounding boundaries
    agree = (q(latent) - ref).abs() < 1e-5
    assert agree.float().mean() > 0.99
    assert torch.equal(q(latent), latent.float()) or torch.allclose(q(latent), latent, atol=0)
    rtn = UniformQuantizer(WeightSpec(bits=3, group_size=32), m, n)
    rtn.init_from(W)

    def out_err(Wq):
        return ((X @ Wq.t() - X @ W.t()) ** 2).mean().item()

    assert out_err(q(latent)) < 0.7 * out_err(rtn(W))


def test_gptq_act_order_static_groups():
    torch.manual_seed(0)
    n, m = 64, 16
    X = torch.randn(256, n) * torch.linspace(0.1, 3, n)
    H = 2 * X.t() @ X / 256
    W = torch.randn(m, n)
    q = UniformQuantizer(WeightSpec(bits=4, group_size=16), m, n)
    latent = q.init_from(W, hessian=H, act_order=True)
    assert torch.equal(q(latent), latent)  # the latent is exactly the quantized weight
    rtn = UniformQuantizer(WeightSpec(bits=4, group_size=16), m, n)
    rtn.init_from(W)
    err = lambda Wq: ((X @ (Wq - W).t()) ** 2).mean().item()  # noqa: E731
    assert err(latent) < err(rtn(W))


def test_spec_errors_are_one_clear_line():
    with pytest.raises(QuantConfigError, match="bits in 1..8, got 9"):
        WeightSpec(bits=9)
    with pytest.raises(QuantConfigError, match="bits in 1..8, got 0"):
        WeightSpec(bits=0)
    with pytest.raises(QuantConfigError, match="group_size 128 does not divide in_features 576"):
        UniformQuantizer(WeightSpec(bits=4, group_size=128), 64, 576)
    with pytest.raises(QuantConfigError, match="unknown weight format 'int5'"):
        QuantSpec.from_dict({"weight": {"format": "int5"}})
    with pytest.raises(QuantConfigError, match="unknown key"):
        QuantSpec.from_dict({"weight": {"bitz": 4}})
    assert QuantSpec.from_dict({"weight": {"bits": 2, "group_size": 64}}).describe() == "W2g64"


def test_bits_per_weight_counts_metadata():
    q = UniformQuantizer(WeightSpec(bits=2, group_size=64), 8, 128)
    assert q.bits_per_weight == pytest.approx(2 + 24 / 64)
