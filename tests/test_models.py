"""Architecture adapters, block replay on cached hidden states, and the QuantLinear swap on every family."""
from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model

from qat.config import QuantSpec
from qat.models import UnsupportedArchitectureError, capture_block_inputs, get_adapter, run_block, run_unit
from qat.nn import QuantLinear, quant_disabled, quant_linears, quantize_model

EXPECTED_LINEARS = {  # per block
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"},
    "qwen2": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
}


def _final(model, family, h):
    if family in ("llama", "qwen2"):
        return model.lm_head(model.model.norm(h))
    if family == "opt":
        return model.lm_head(model.model.decoder.final_layer_norm(h))
    if family == "gpt2":
        return model.lm_head(model.transformer.ln_f(h))
    return model.get_output_embeddings()(model.gpt_neox.final_layer_norm(h))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_the_right_linears(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    names = ad.linear_names(model)
    n_blocks = len(ad.blocks(model))
    assert len(names) == n_blocks * len(EXPECTED_LINEARS[family])
    block0 = {n.split(".", ad.blocks_path.count(".") + 2)[-1] for n in names if f"{ad.blocks_path}.0." in n}
    assert block0 == EXPECTED_LINEARS[family]
    units = ad.unit_linears(ad.blocks(model)[0])
    assert all(n.startswith(ad.attn) for n in units["attn"]) and units["mlp"]
    assert not any("lm_head" in n or "embed" in n for n in names)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_replay_reproduces_the_full_forward(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (3, 24))
    ref = model(ids).logits
    ad = get_adapter(model)
    h, kw = capture_block_inputs(model, ids, batch_size=2)
    for block in ad.blocks(model):
        h = run_block(block, h, kw)
    torch.testing.assert_close(_final(model, family, h), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_attention_and_mlp_units_compose_to_the_block(family):
    model = tiny_model(family)
    ad = get_adapter(model)
    h, kw = capture_block_inputs(model, torch.randint(0, 256, (2, 16)))
    for block in ad.blocks(model):
        split = run_unit(ad, block, "mlp", run_unit(ad, block, "attn", h, kw), kw)
        h = run_block(block, h, kw)
        torch.testing.assert_close(split, h, rtol=1e-6, atol=1e-6)


def test_parallel_residual_cannot_be_split():
    model = tiny_model("gpt_neox")
    ad = get_adapter(model)
    with pytest.raises(UnsupportedArchitectureError, match="parallel-residual"):
        run_unit(ad, ad.blocks(model)[0], "attn", torch.zeros(1, 4, 64), {})


@pytest.mark.parametrize("family", FAMILIES)
def test_quantization_off_is_exactly_the_original_model(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 20))
    ref = model(ids).logits
    names = quantize_model(model, QuantSpec.from_dict({"weight": {"bits": 2, "group_size": 32}}))
    assert len(quant_linears(model)) == len(names) > 0
    with quant_disabled(model):
        assert torch.equal(model(ids).logits, ref)
    quantized = model(ids).logits
    assert not torch.equal(quantized, ref)  # and quantization on really changes the model


def test_swap_validates_every_layer_before_touching_the_model():
    model = tiny_model("llama")  # hidden 64, intermediate 128: group 128 fits the MLP down_proj only
    with pytest.raises(Exception, match="group_size 128 does not divide in_features 64"):
        quantize_model(model, QuantSpec.from_dict({"weight": {"bits": 4, "group_size": 128}}))
    assert not quant_linears(model)


def test_skip_patterns_keep_layers_in_floating_point():
    model = tiny_model("llama")
    names = quantize_model(model, QuantSpec.from_dict({"weight": {"group_size": 32}, "skip": ["lm_head", "down_proj"]}))
    assert names and not any(n.endswith("down_proj") for n in names)
    assert not isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)


def test_gpt2_conv1d_is_transposed_into_quantlinear():
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 64)
    ref = conv(x)
    ad = get_adapter(model)
    assert ad.is_linear(conv) and ad.linear_shape(conv) == (192, 64) == tuple(ad.linear_weight(conv).shape)
    assert not get_adapter("llama").is_linear(conv)  # only the gpt2 adapter says Conv1D is a (transposed) linear
    q = QuantLinear.from_linear(conv, QuantSpec.from_dict({"weight": {"group_size": 32}}), adapter=ad)
    q.quant_enabled = False
    assert torch.equal(q(x), ref) or torch.allclose(q(x), ref, atol=1e-6)


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'bert'.*gpt2.*llama"):
        get_adapter("bert")
