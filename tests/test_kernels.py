"""Triton kernels vs kernels/reference.py, and qat_kernels.dispatch.linear's backend choice and input checks.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is slow: shapes
stay small (72 x 576 and the like) but ragged (72 is not a multiple of the row tiles, 576 = 4.5 x 128 columns).

Tolerances. Kernel and reference dequantize to the same float32 weights (bit-exact; the uniform and binary11 math is
exact in float32) and differ only in how the K products are summed. For float32 the worst case of any summation order
is K * 2^-24 * sum_k |x_k w_k| per side, 3.4e-5 for K = 576, so |kernel - reference| <= 1e-4 * (|x| @ |W|^T).
For float16 inputs the kernels accumulate in float32 but (on the tensor-core path, like the reference) round W_hat to
float16 (2^-11 relative) and round the output to float16: 1e-3 * (|x| @ |W|^T) + 1e-3 * |y|.
"""
from __future__ import annotations

import os

import pytest
import torch
from qat_kernels import dispatch, reference
from qat_kernels.hadamard import block_hadamard, hadamard_block_size, random_signs
from conftest import import_triton
from qat_kernels.packing import pack_bits, unpack_bits

triton = import_triton()  # an error where pyproject.toml requires triton, a skip elsewhere

from qat_kernels.triton import binary11, common, uniform, vq, w4a4  # noqa: E402  (after the triton skip)

N, K, G = 72, 576, 64


def _uniform_layer(bits: int, n: int = N, k: int = K, g: int = G, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ng = k // g
    packed = {
        "qweight": pack_bits(torch.randint(0, 2**bits, (n, k), generator=gen), bits),
        "scales": (torch.rand(n, ng, generator=gen) * 0.1 + 0.01).half(),
        "zeros": torch.randint(0, 2**bits, (n, ng), generator=gen).to(torch.uint8),
    }
    return packed, {"in_features": k, "out_features": n, "bits": bits, "group_size": g}


def _binary11_layer(n: int = N, k: int = K, g: int = G, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ng = k // g
    packed = {
        "signs": pack_bits(torch.randint(0, 2, (n, k), generator=gen), 1),
        "bitmap": pack_bits(torch.randint(0, 2, (n, k), generator=gen), 1),
        "alpha": (torch.rand(n, ng, 2, generator=gen) * 0.1 + 0.01).half(),
        "mu": (torch.randn(n, ng, 2, generator=gen) * 0.02).half(),
    }
    return packed, {"in_features": k, "out_features": n, "group_size": g}


def _inputs(batch: int, k: int = K, n: int = N, dtype=torch.float32, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return x, bias


def _assert_matches(y: torch.Tensor, x_eff: torch.Tensor, fmt: str, packed: dict, meta: dict, bias, dtype):
    """y (kernel) against the float32 reference F.linear(x_eff, W_hat, bias), with the bounds of the module doc."""
    w = dispatch.dequantize(fmt, packed, meta)
    b = None if bias is None else bias.float()
    ref = torch.nn.functional.linear(x_eff.float(), w, b)
    scale = x_eff.float().abs() @ w.abs().t()
    if dtype == torch.float32:
        bound = 1e-4 * scale + 1e-6
    else:
        bound = 1e-3 * scale + 1e-3 * ref.abs() + 1e-6
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, worst err/bound {(err / bound).max().item():.3g}"


# ---- uniform ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("batch", [1, 3, 16, 33])
def test_uniform_matches_reference_fp32(bits, batch):
    packed, meta = _uniform_layer(bits)
    x, bias = _inputs(batch)
    y = dispatch.linear(x, "uniform", packed, meta, bias, backend="triton")
    _assert_matches(y, x, "uniform", packed, meta, bias, torch.float32)


@pytest.mark.parametrize("bits", [1, 3, 8])
@pytest.mark.parametrize("batch", [1, 16])
def test_uniform_other_widths(bits, batch):
    """1 and 8 bits unpack whole codes per word; 3 bits straddle words and take the gather path."""
    packed, meta = _uniform_layer(bits, seed=bits)
    x, bias = _inputs(batch)
    y = dispatch.linear(x, "uniform", packed, meta, bias, backend="triton")
    _assert_matches(y, x, "uniform", packed, meta, bias, torch.float32)


@pytest.mark.parametrize("batch", [1, 16, 33])
def test_uniform_matches_reference_fp16(batch):
    packed, meta = _uniform_layer(4)
    x, bias = _inputs(batch, dtype=torch.float16)
    y = dispatch.linear(x, "uniform", packed, meta, bias, backend="triton")
    _assert_matches(y, x, "uniform", packed, meta, bias, torch.float16)


@pytest.mark.parametrize("batch, config", [
    (3, common.Config(block_m=4, block_n=16, block_k=64, split_k=2, use_dot=False)),  # GEMV, split-K atomics
    (20, common.Config(block_m=16, block_n=16, block_k=64, split_k=3, use_dot=True)),  # dot, split-K, ragged split
    (70, common.Config(block_m=32, block_n=32, block_k=32, use_dot=True, group_m=2)),  # GEMM tiles, grouped order
])
def test_uniform_forced_configs(batch, config):
    packed, meta = _uniform_layer(4)
    x, bias = _inputs(batch)
    y = uniform.linear(x, dispatch.layer_spec("uniform", packed, meta), packed, bias, config=config)
    _assert_matches(y, x, "uniform", packed, meta, bias, torch.float32)


@pytest.mark.parametrize("group", [32, 576])
@pytest.mark.parametrize("batch", [2, 16])
def test_uniform_group_smaller_and_larger_than_tile(group, batch):
    """GEMV (batch 2): g = 32 puts several groups in one K tile, g = 576 (one group per row) spans many tiles.
    Tensor cores (batch 16): one rescale per 32- or 64-column segment (576 = 9 x 64)."""
    packed, meta = _uniform_layer(4, g=group)
    x, _ = _inputs(batch)
    y = dispatch.linear(x, "uniform", packed, meta, None, backend="triton")
    _assert_matches(y, x, "uniform", packed, meta, None, torch.float32)


def test_uniform_kernel_matches_uniform_quantizer_forward():
    """Cross-check with the training side: the packed kernel output equals F.linear(x, quantizer(w))."""
    from qat.config import WeightSpec
    from qat.quantizers.uniform import UniformQuantizer

    torch.manual_seed(0)
    w = torch.randn(N, K)
    quantizer = UniformQuantizer(WeightSpec(format="uniform", bits=4, group_size=G), N, K)
    quantizer.init_from(w)
    packed = quantizer.pack(w)
    meta = {"in_features": K, "out_features": N, "bits": 4, "group_size": G}
    x, bias = _inputs(5)
    y = dispatch.linear(x, "uniform", packed, meta, bias, backend="triton")
    with torch.no_grad():
        w_hat = quantizer(w)
    assert torch.equal(w_hat, dispatch.dequantize("uniform", packed, meta))
    _assert_matches(y, x, "uniform", packed, meta, bias, torch.float32)


# ---- binary11 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3, 16, 33])
def test_binary11_matches_reference_fp32(batch):
    packed, meta = _binary11_layer()
    x, bias = _inputs(batch)
    y = dispatch.linear(x, "binary11", packed, meta, bias, backend="triton")
    _assert_matches(y, x, "binary11", packed, meta, bias, torch.float32)


@pytest.mark.parametrize("batch", [1, 33])
def test_binary11_matches_reference_fp16(batch):
    packed, meta = _binary11_layer(g=128, k=512, seed=3)
    x, bias = _inputs(batch, k=512, dtype=torch.float16)
    y = dispatch.linear(x, "binary11", packed, meta, bias, backend="triton")
    _assert_matches(y, x, "binary11", packed, meta, bias, torch.float16)


def test_binary11_split_k_gemv():
    packed, meta = _binary11_layer()
    x, bias = _inputs(2)
    cfg = common.Config(block_m=2, block_n=32, block_k=64, split_k=4, use_dot=False)
    y = binary11.linear(x, dispatch.layer_spec("binary11", packed, meta), packed, bias, config=cfg)
    _assert_matches(y, x, "binary11", packed, meta, bias, torch.float32)


# ---- VQ ---------------------------------------------------------------------------------------------------------
def _vq_layer(n: int = N, k: int = K, d: int = 4, seed: int = 0):
    """A random LC-QAT layer; b is near the initial codebook's -1.5 A 1 (so the centred constant is small, as trained)."""
    gen = torch.Generator().manual_seed(seed)
    A = (torch.randn(d, d, generator=gen) * 0.5).half()
    packed = {
        "codes": pack_bits(torch.randint(0, 4, (n, k), generator=gen), 2),
        "A": A,
        "b": (-1.5 * A.float().sum(1) + 0.05 * torch.randn(d, generator=gen)).half(),
        "s_u": (torch.rand(k, generator=gen) + 0.5).half(),
        "s_v": (torch.rand(n, generator=gen) * 0.02 + 0.01).half(),
        "signs_in": random_signs(k, seed),
        "signs_out": random_signs(n, seed + 1),
        "hadamard_blocks": torch.tensor([hadamard_block_size(k), hadamard_block_size(n)], dtype=torch.int32),
    }
    return packed, {"in_features": k, "out_features": n}


def _assert_vq_matches(y, x, packed, meta, bias, dtype):
    """y against the reference math in float64. The kernel sums |x'| |z - 1.5| products in the rotated space
    (x' = x_r A per vector), and the output Hadamard block and s_v mix them: the bound maps those magnitudes through
    |H_out| and |s_v|, times 1e-4 (fp32: K * 2^-24 = 3.4e-5 plus the transforms' few roundings) or 2e-3 (fp16:
    the rotated activations and the output are rounded to fp16, 2^-11 each)."""
    spec = dispatch.layer_spec("vq", packed, meta)
    d, bi, bo = spec["vq_dim"], spec["block_in"], spec["block_out"]
    A, b = packed["A"].double(), packed["b"].double()
    z = unpack_bits(packed["codes"], 2, spec["in_features"]).double()
    w_eff = reference.vq_untransform(reference.vq_affine_decode(z, A, b), packed["s_u"].double(),
                                     packed["s_v"].double(), packed["signs_in"], packed["signs_out"], block_in=bi,
                                     block_out=bo)
    xd = x.double()
    ref = xd @ w_eff.t() + (0 if bias is None else bias.double())
    xr = block_hadamard(xd * packed["s_u"].double(), packed["signs_in"], bi)
    xa = (xr.reshape(len(x), -1, d) @ A).reshape(xr.shape)
    c = (xr.reshape(len(x), -1, d) * (b + 1.5 * A.sum(1))).sum((1, 2))
    rotated = xa.abs() @ (z - 1.5).abs().t() + c.abs()[:, None]
    # |H_out| has every entry 1/sqrt(bo): each output of a block sees the block's summed magnitudes
    mapped = packed["s_v"].double().abs() * (rotated.reshape(len(x), -1, bo).sum(-1, keepdim=True)
                                             / bo**0.5).expand(-1, -1, bo).reshape(rotated.shape)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    bound = tol * (mapped + ref.abs()) + 1e-6
    assert y.dtype == dtype and y.shape == ref.shape
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, worst err/bound {(err / bound).max().item():.3g}"
    return err, bound


@pytest.mark.parametrize("batch", [1, 3, 16, 33])
def test_vq_matches_reference_fp32(batch):
    """72 x 576: input Hadamard blocks of 64 (tensor-core path), output blocks of 8 (broadcast path)."""
    packed, meta = _vq_layer()
    x, bias = _inputs(batch)
    y = dispatch.linear(x, "vq", packed, meta, bias, backend="triton")
    _assert_vq_matches(y, x, packed, meta, bias, torch.float32)


@pytest.mark.parametrize("batch", [1, 33])
def test_vq_matches_reference_fp16(batch):
    """64 x 512: Hadamard blocks of 128 in and 64 out."""
    packed, meta = _vq_layer(n=64, k=512, seed=2)
    x, bias = _inputs(batch, k=512, n=64, dtype=torch.float16)
    y = dispatch.linear(x, "vq", packed, meta, bias, backend="triton")
    _assert_vq_matches(y, x, packed, meta, bias, torch.float16)


def test_vq_reference_path_within_the_same_bound():
    """The float32 reference (dequant_vq + F.linear) meets the bound used for the kernel: the bound is not loose
    against the reference's own rounding, and the kernel's algebra (A on the activation side) is the same map."""
    packed, meta = _vq_layer()
    x, bias = _inputs(5)
    y = dispatch.linear(x, "vq", packed, meta, bias, backend="reference")
    _assert_vq_matches(y, x, packed, meta, bias, torch.float32)


def test_vq_split_k_and_block_sizes_from_meta():
    packed, meta = _vq_layer(n=64, k=512, seed=4)
    meta = {**meta, "block_in": 128, "block_out": 64}
    del packed["hadamard_blocks"]
    x, bias = _inputs(6, k=512, n=64)
    cfg = common.Config(block_m=16, block_n=32, block_k=64, split_k=3, use_dot=True)
    y = vq.linear(x, dispatch.layer_spec("vq", packed, meta), packed, bias, config=cfg)
    _assert_vq_matches(y, x, packed, meta, bias, torch.float32)


def test_vq_bad_layout_errors():
    packed, meta = _vq_layer()
    with pytest.raises(ValueError, match=r"Hadamard block_in 48 must be a power of two dividing 576"):
        dispatch.linear(torch.randn(1, K), "vq", packed, {**meta, "block_in": 48})
    with pytest.raises(ValueError, match=r"packed\['A'\] must be a square \[d, d\] matrix, got \(4, 2\)"):
        dispatch.linear(torch.randn(1, K), "vq", {**packed, "A": packed["A"][:, :2]}, meta)
    with pytest.raises(ValueError, match=r"packed\['signs_out'\] has dtype torch.float32"):
        dispatch.linear(torch.randn(1, K), "vq", {**packed, "signs_out": packed["signs_out"].float()}, meta)
    no_blocks = {k: v for k, v in packed.items() if k != "hadamard_blocks"}
    with pytest.raises(ValueError, match="meta is missing 'block_in'"):
        dispatch.linear(torch.randn(1, K), "vq", no_blocks, meta)


# ---- W4A4 -------------------------------------------------------------------------------------------------------
def _act_meta(meta: dict, act_bits=4, sym=False, clip_hi=0.9, clip_lo=0.8) -> dict:
    return {**meta, "act_bits": act_bits, "act_sym": sym, "act_clip_hi": clip_hi, "act_clip_lo": clip_lo}


def _token_batch(batch: int, dtype=torch.float32) -> torch.Tensor:
    x, _ = _inputs(batch, dtype=dtype)
    x[0] = 0  # all-zero token: scale = MIN_SCALE, codes = zero
    x[1] = x[1].abs()  # one-signed token: min clamps to 0
    return x


@pytest.mark.parametrize("bits, sym", [(4, False), (4, True), (8, True), (6, False)])
def test_token_quantization_kernel_equals_act_quant(bits, sym):
    from qat_kernels.act_quant import MIN_SCALE, quantize_per_token

    assert w4a4.MIN_SCALE.value == MIN_SCALE
    x = _token_batch(5, torch.float16) * 3
    q, scale = w4a4.quantize_tokens(x, bits, 0.9, 0.7, sym)
    q_ref, s_ref, z_ref = quantize_per_token(x, bits, 0.9, 0.7, sym)
    assert torch.equal(scale, s_ref[:, 0])
    assert torch.equal(q.to(torch.int32), q_ref.to(torch.int32) - z_ref.to(torch.int32))


@pytest.mark.parametrize("wbits, abits, sym, batch", [(4, 4, False, 3), (4, 4, True, 33), (2, 8, True, 16),
                                                      (3, 4, False, 2)])
def test_w4a4_matches_reference(wbits, abits, sym, batch):
    packed, meta = _uniform_layer(wbits)
    meta = _act_meta(meta, abits, sym)
    spec = dispatch.layer_spec("uniform", packed, meta)
    assert w4a4.unsupported_reason(spec) is None
    x = _token_batch(batch)
    _, bias = _inputs(batch)
    y = dispatch.linear(x, "uniform", packed, meta, bias, backend="triton")
    _assert_matches(y, dispatch.quantize_activations(x, spec), "uniform", packed, meta, bias, torch.float32)
    assert torch.allclose(y, dispatch.linear(x, "uniform", packed, meta, bias, backend="reference"), rtol=0, atol=1e-3)


def test_w4a4_fp16_per_channel_gemm_tile():
    """Per-channel weights (group = K): int32 accumulation across all K tiles, one rescale; a GEMM-sized M tile."""
    packed, meta = _uniform_layer(4, g=K)
    meta = _act_meta(meta)
    x = _token_batch(70, torch.float16)
    y = dispatch.linear(x, "uniform", packed, meta, None, backend="triton")
    spec = dispatch.layer_spec("uniform", packed, meta)
    _assert_matches(y, dispatch.quantize_activations(x, spec), "uniform", packed, meta, None, torch.float16)


def test_act_quant_without_integer_path_falls_back_to_weight_kernel():
    """8-bit asymmetric codes minus zero do not fit int8: x is fake-quantized by the reference, then the weight kernel."""
    packed, meta = _binary11_layer()
    meta = _act_meta(meta, act_bits=8)
    spec = dispatch.layer_spec("binary11", packed, meta)
    x = _token_batch(2)
    y = dispatch.linear(x, "binary11", packed, meta, None, backend="triton")
    _assert_matches(y, dispatch.quantize_activations(x, spec), "binary11", packed, meta, None, torch.float32)
    uni_packed, uni_meta = _uniform_layer(4)
    reason = w4a4.unsupported_reason(dispatch.layer_spec("uniform", uni_packed, _act_meta(uni_meta, act_bits=8)))
    assert reason == "8-bit asymmetric activation codes minus their zero point do not fit int8"


# ---- dispatch: backend choice, shapes, errors --------------------------------------------------------------------
def test_auto_uses_reference_on_cpu_and_kernel_when_asked(monkeypatch):
    packed, meta = _uniform_layer(4)
    x, bias = _inputs(3)
    calls = []
    real = uniform.linear
    monkeypatch.setattr(uniform, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    y_auto = dispatch.linear(x, "uniform", packed, meta, bias)
    assert calls == []
    assert torch.equal(y_auto, dispatch.linear(x, "uniform", packed, meta, bias, backend="reference"))
    dispatch.linear(x, "uniform", packed, meta, bias, backend="triton")
    assert calls == [1]


def test_reference_is_dequant_then_linear_and_flattens_leading_dims():
    packed, meta = _uniform_layer(2)
    x = torch.randn(2, 3, K)
    y = dispatch.linear(x, "uniform", packed, meta, backend="reference")
    assert y.shape == (2, 3, N)
    assert torch.equal(y, torch.nn.functional.linear(x, dispatch.dequantize("uniform", packed, meta)))


def test_triton_backend_keeps_leading_dims_and_dtype():
    packed, meta = _binary11_layer()
    x = torch.randn(2, 2, K, dtype=torch.float16)
    y = dispatch.linear(x, "binary11", packed, meta, backend="triton")
    assert y.shape == (2, 2, N) and y.dtype == torch.float16
    _assert_matches(y.reshape(4, N), x.reshape(4, K), "binary11", packed, meta, None, torch.float16)


def test_triton_backend_refuses_unsupported_layer():
    packed, meta = _uniform_layer(4, k=48, g=48)
    with pytest.raises(ValueError, match="backend='triton' cannot run this layer: in_features 48 is not a multiple"):
        dispatch.linear(torch.randn(1, 48), "uniform", packed, meta, backend="triton")
    # auto falls back to the reference for the same layer
    assert dispatch.linear(torch.randn(1, 48), "uniform", packed, meta).shape == (1, N)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "_interpreting", lambda: False)
    packed, meta = _uniform_layer(4)
    with pytest.raises(ValueError, match="x is not a CUDA tensor"):
        dispatch.linear(torch.randn(1, K), "uniform", packed, meta, backend="triton")


@pytest.mark.parametrize("mutate, message", [
    (lambda p, m: ("int3", p, m), "unknown format 'int3'"),
    (lambda p, m: ("uniform", {**p, "qweight": p["qweight"][:, :-1]}, m), r"packed\['qweight'\] has shape \(72, 287\)"),
    (lambda p, m: ("uniform", {**p, "scales": p["scales"].float()[:, :4]}, m), r"packed\['scales'\] has shape"),
    (lambda p, m: ("uniform", {**p, "zeros": p["zeros"].int()}, m), r"packed\['zeros'\] has dtype torch.int32"),
    (lambda p, m: ("uniform", {k: v for k, v in p.items() if k != "zeros"}, m), "packed is missing 'zeros'"),
    (lambda p, m: ("uniform", p, {**m, "bits": 9}), "bits must be in 1..8, got 9"),
    (lambda p, m: ("uniform", p, {**m, "group_size": 100}), "group_size 100 must divide in_features 576"),
    (lambda p, m: ("uniform", p, {k: v for k, v in m.items() if k != "bits"}), "meta is missing 'bits'"),
    (lambda p, m: ("uniform", p, {**m, "act_bits": 3.5}), "act_bits must be an int in 2..8 or 16"),
    (lambda p, m: ("binary11", p, m), "binary11\\): bits must be 1 .sign . bitmap bit., got 4"),
    (lambda p, m: ("binary11", p, {**m, "bits": 1}), "packed is missing 'signs'"),
])
def test_bad_inputs_are_one_line_value_errors(mutate, message):
    packed, meta = _uniform_layer(4)
    fmt, packed, meta = mutate(packed, meta)
    with pytest.raises(ValueError, match=message) as info:
        dispatch.linear(torch.randn(1, K), fmt, packed, meta)
    assert "\n" not in str(info.value)


def test_bad_x_bias_and_backend():
    packed, meta = _uniform_layer(4)
    with pytest.raises(ValueError, match="x has 64 features, the layer takes 576"):
        dispatch.linear(torch.randn(1, 64), "uniform", packed, meta)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(72,\)"):
        dispatch.linear(torch.randn(1, K), "uniform", packed, meta, torch.zeros(3))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        dispatch.linear(torch.randn(1, K), "uniform", packed, meta, backend="cuda")


# ---- host-side helpers ------------------------------------------------------------------------------------------
def test_block_k_never_straddles_groups_unevenly():
    assert common.block_k_for_group(512, 64) == 512  # 8 whole groups per tile
    assert common.block_k_for_group(512, 4096) == 512  # tile inside one group
    assert common.block_k_for_group(512, 11008) == 256  # 11008 = 2^8 * 43
    assert common.block_k_for_group(128, 576) == 64
    assert common.block_k_for_group(128, 24) == 0  # no usable tile: the layer goes to the reference


def test_pick_config_paths():
    gemv = common.pick_config(1, 4096, 4096, 128, 4, None)
    assert not gemv.use_dot and gemv.block_m == 1 and gemv.split_k == 1
    short_wide = common.pick_config(1, 1024, 4096, 128, 4, None)
    assert short_wide.split_k > 1  # 128 row blocks cannot fill 132 SMs twice
    decode = common.pick_config(16, 4096, 4096, 128, 2, None)
    assert decode.use_dot and decode.swap and decode.block_m == 16 and decode.split_k > 1
    prefill = common.pick_config(512, 4096, 4096, 128, 2, None)
    assert prefill.block_m == 128 and prefill.split_k == 1


def test_uniform_rescale_segments_and_group_limits():
    assert [uniform.segment(g) for g in (32, 128, 576, 4096, 11008)] == [32, 128, 64, 1024, 256]
    packed, meta = _uniform_layer(4, g=16)
    assert uniform.unsupported_reason(dispatch.layer_spec("uniform", packed, meta)) == \
        "group_size 16 is not a multiple of 32"


def test_word_view_of_unaligned_bytes_is_copied():
    buf = torch.arange(0, 13, dtype=torch.uint8)
    view = buf[1:].reshape(3, 4)  # storage offset 1: not 4-byte aligned
    w = common.words(view)
    assert w.dtype == torch.int32 and w.shape == (3, 1)
    assert torch.equal(w.view(torch.uint8).reshape(3, 4), view)


@pytest.mark.slow
@pytest.mark.timeout(700)  # the compile itself is bounded by 600 s below
def test_every_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler: compile one config per kernel and regime for sm_90 ahead of time
    (the ptxas bundled with triton; ~20 s cold) and check it fits the SM (registers, shared memory)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "qat_kernels.triton.compile_check", "--quick"], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "10/10 kernels compile for sm_90" in out.stdout


def test_interpreter_is_on_without_gpu():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"


def test_a_missing_triton_fails_where_it_is_a_dependency(monkeypatch):
    """On Linux x86-64 (where pyproject.toml installs triton) import_triton raises, so the kernel tests error instead of
    skipping and CI cannot go green without them; elsewhere it skips."""
    import platform
    import sys

    import conftest

    assert conftest.TRITON_REQUIRED == (platform.system() == "Linux" and platform.machine() == "x86_64")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setattr(conftest, "TRITON_REQUIRED", True)
    with pytest.raises(ImportError, match=r"triton is a dependency on Linux x86-64 .* reinstall with `make install`"):
        conftest.import_triton()
    monkeypatch.setattr(conftest, "TRITON_REQUIRED", False)
    with pytest.raises(pytest.skip.Exception, match="triton is not installed"):
        conftest.import_triton()
