"""A number format is one class (qat/quantizers): WeightSpec, the kernels' dispatch table and the export runtime read
their per-format knowledge from it. A toy format defined and registered here alone goes through PTQ -> export -> load."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from qat_kernels import dispatch
from qat_kernels.packing import pack_bits, unpack_bits
from torch import nn

from qat.config import QuantConfigError, QuantSpec, WeightSpec
from qat.quantizers import WEIGHT_FORMATS, WeightQuantizer, make_weight_quantizer, register_weight_format
from qat.quantizers.base import ste_round


# ---- the kernels' own table agrees with the registry -------------------------------------------------------------
def test_dispatch_table_names_exactly_the_registered_formats():
    assert set(dispatch.FORMATS) == set(WEIGHT_FORMATS) == {"uniform", "binary11", "vq"}


@pytest.mark.parametrize("spec_dict", [
    {"format": "uniform", "bits": 3, "group_size": 32},
    {"format": "uniform", "bits": 4, "group_size": -1, "sym": True},
    {"format": "binary11", "group_size": 32},
    {"format": "vq", "vq_dim": 2, "hadamard_block": 32},
], ids=["uniform-w3g32", "uniform-w4ch-sym", "binary11", "vq"])
def test_kernel_meta_and_dispatch_dequantize_equal_the_quantizers_unpack(spec_dict):
    """For every registered format: the meta its class gives and the tensors its pack() writes are accepted by the
    dispatcher, whose reference dequantization equals the quantizer's own unpack() and eval forward bit for bit."""
    torch.manual_seed(0)
    spec = WeightSpec(**spec_dict)
    w = torch.randn(48, 64)
    q = make_weight_quantizer(spec, 48, 64).eval()
    latent = q.init_from(w)
    if hasattr(q, "harden"):  # binary11 stores the hard bitmap (its final trained state)
        q.harden()
    packed = q.pack(latent)
    cls = spec.quantizer_class()
    meta = {**cls.kernel_meta(spec, 48, 64), **cls.meta_from_packed(packed)}
    got = dispatch.dequantize(spec.format, packed, meta)
    with torch.no_grad():
        assert torch.equal(got, q.unpack(packed).float())
        assert torch.equal(got, q(latent).float())


def test_format_options_become_weight_spec_fields_with_their_defaults_and_docs():
    fields = WeightSpec.__dataclass_fields__
    for cls in WEIGHT_FORMATS.values():
        for o in cls.options:
            assert fields[o.name].default == o.default
            assert f"{o.name}: {cls.format} only: {o.doc[:30]}" in WeightSpec.__doc__
    assert WeightSpec(format="binary11").bits == 2 and WeightSpec(format="vq").bits == 2
    assert WeightSpec().bits == 4
    with pytest.raises(QuantConfigError, match="float_zero applies to the uniform format only, got format 'vq'"):
        WeightSpec(format="vq", float_zero=True)
    with pytest.raises(QuantConfigError, match="unknown weight format 'int3'; supported: binary11, uniform, vq"):
        WeightSpec(format="int3")


# ---- a toy format, registered from this test only ----------------------------------------------------------------
class SignQuantizer(WeightQuantizer):
    """1-bit sign times a per-group fp16 scale (mean |w| of the group): w_hat = s * (2q - 1), q = [w >= 0]."""

    format = "toysign"
    default_bits = 1

    @classmethod
    def validate_spec(cls, spec):
        if spec.bits != 1:
            raise QuantConfigError(f"format toysign stores one bit per weight, got bits={spec.bits}")

    @classmethod
    def describe(cls, spec):
        return f"S1{cls.group_label(spec)}"

    def __init__(self, spec, out_features, in_features):
        super().__init__(spec, out_features, in_features)
        self.group_size = spec.group_for(in_features)
        self.scale = nn.Parameter(torch.ones(out_features, in_features // self.group_size))

    def _grouped(self, w):
        return w.float().reshape(self.out_features, -1, self.group_size)

    def init_from(self, weight, *, hessian=None, **_):
        with torch.no_grad():
            self.scale.copy_(self._grouped(weight).abs().mean(-1).to(torch.float16).float())
        return weight.detach().clone()

    def forward(self, weight):
        sign = 2 * ste_round(torch.sigmoid(1e4 * self._grouped(weight))) - 1  # +-1, straight-through
        return (sign * self.scale.to(torch.float16).float().unsqueeze(-1)).reshape(self.out_features, -1)

    def pack(self, weight):
        q = (weight.float() >= 0).to(torch.int32)
        return {"signs": pack_bits(q, 1), "scales": self.scale.detach().to(torch.float16)}

    def unpack(self, packed):
        q = unpack_bits(packed["signs"], 1, self.in_features).float().reshape(self.out_features, -1, self.group_size)
        return ((2 * q - 1) * packed["scales"].float().unsqueeze(-1)).reshape(self.out_features, -1)

    @property
    def bits_per_weight(self):
        return 1 + 16 / self.group_size


@pytest.fixture
def toy_format():
    register_weight_format(SignQuantizer)
    yield SignQuantizer
    del WEIGHT_FORMATS[SignQuantizer.format]


def test_a_format_registered_from_a_test_round_trips_ptq_export_load(toy_format, tmp_path):
    from qat.export.load import load_quantized
    from qat.export.pack import export_native
    from qat.export.runtime import PackedLinear
    from qat.nn import model_bits_per_weight, quant_linears
    from qat.ptq.pipeline import ptq_quantize

    spec = QuantSpec.from_dict({"weight": {"format": "toysign", "group_size": 32}})
    assert spec.describe() == "S1g32" and spec.weight.bits == 1
    with pytest.raises(QuantConfigError, match="toysign stores one bit per weight, got bits=2"):
        QuantSpec.from_dict({"weight": {"format": "toysign", "bits": 2}})
    model = tiny_model("llama")
    fp = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ptq_quantize(model, spec, None, "rtn", progress=False)
    layers = quant_linears(model)
    assert layers and all(type(q.weight_quantizer) is SignQuantizer for q in layers.values())
    assert model_bits_per_weight(model)["bits_per_weight"] == pytest.approx(1 + 16 / 32)
    name, q = next(iter(layers.items()))
    w = fp[name]
    expected = torch.sign(w).masked_fill(w == 0, 1) * w.reshape(w.shape[0], -1, 32).abs().mean(-1).half().float() \
        .repeat_interleave(32, dim=1)  # the toy's math written independently
    with torch.no_grad():
        assert torch.equal(q.quantized_weight().float(), expected)

    export_native(model, None, spec, tmp_path / "e", dtype=torch.float32)
    loaded = load_quantized(tmp_path / "e")
    packed = [m for m in loaded.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == len(layers) and all(m.format == "toysign" for m in packed)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model.eval()(x).logits)
    assert not any(m.use_dispatch for m in packed)  # the kernels do not know the toy: its own unpack() ran
