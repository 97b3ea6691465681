"""Fine-tuning the low-bit model (qat/finetune) on tiny random models: peft LoRA / QA-LoRA on QuantLinear and
PackedLinear through peft's custom-module dispatch, the straight-through frozen base, training, adapter save/load (peft
format) on students and exports, bit-exact resume, the exact and approximate merges and their export, --adapter on
eval/generate, and one-line errors for adapters and targets that do not fit."""
from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from lightning.pytorch.callbacks import Callback
from test_export import byte_tokenizer

from qat.checkpoint import save_student
from qat.cli import main as cli
from qat.config import QuantSpec
from qat.nn import QuantLinear, quant_linears, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread", "token_cache")  # conftest.py

W2 = {"weight": {"bits": 2, "group_size": 32}}
U32 = 2.0**-24


def save_tiny_student(path: Path, spec_dict: dict, seed: int = 0, **cfg) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**{**tiny_model("llama").config.to_dict(), **cfg})).eval()
    else:
        model = tiny_model("llama", seed=seed)
    spec = QuantSpec.from_dict(spec_dict)
    quantize_model(model, spec)
    save_student(model, byte_tokenizer(), spec, path, overwrite=True)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, assets_dir):
    """An FP tiny llama (the teacher), its RTN W2g32 student, the student's float32 export, and code text."""
    d = tmp_path_factory.mktemp("ft")
    model = tiny_model("llama")
    model.save_pretrained(d / "fp")
    byte_tokenizer().save_pretrained(d / "fp")
    save_tiny_student(d / "student", W2)
    assert cli(["export", "--student", str(d / "student"), "--output", str(d / "export"), "--dtype", "float32"]) == 0
    code = assets_dir / "corpora" / "python-stdlib"
    (d / "train.txt").write_text((code / "train.py.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    (d / "val.txt").write_text((code / "test.py.txt").read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return d


def recipe_for(tiny, out, *overrides, model="student"):
    from qat.finetune.recipe import parse_args

    recipe, _ = parse_args(["--model", str(tiny / model), "--data", str(tiny / "train.txt"), "--output", str(out),
                            "--steps", "8", "--batch_size", "2", "--seq_len", "32", "--num_samples", "16",
                            "--lora.r", "4", "--optim.default_lr", "1e-2", "--eval.file", str(tiny / "val.txt"),
                            "--eval.seq_len", "32", "--eval.max_tokens", "1024", "--progress", "false",
                            "--checkpoint_every", "3", *overrides])
    return recipe


def finetune(recipe, **kw):
    from qat.finetune.run import run_finetune

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_finetune(recipe, tensorboard=kw.pop("tensorboard", False), **kw)


def ids(n: int = 2, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids() if x is None else x, use_cache=False).logits


def adapter_model(base_dir, adapter_dir):
    from qat.finetune.base import load_base
    from qat.finetune.lora import load_adapter

    model, _, _ = load_base(base_dir)
    return load_adapter(model, adapter_dir)


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    return {"out": out, "result": finetune(recipe_for(tiny, out), tensorboard=True)}


@pytest.fixture(scope="module")
def qalora_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("qalora") / "adapter"
    return {"out": out, "result": finetune(recipe_for(tiny, out, "--lora.qalora", "true"))}


# ---- peft layers ------------------------------------------------------------------------------------------------------

def test_quantized_linears_get_peft_lora_layers(tiny):
    """Every QuantLinear / PackedLinear is wrapped by the registered custom LoRA layer; with B = 0 the model is the
    base exactly; trainable parameters are r (in + out) per layer (QA-LoRA: r (in / g + out))."""
    from peft import get_peft_model

    from qat.finetune.base import load_base
    from qat.finetune.lora import QuantLoraLinear, default_targets, lora_config

    for kind in ("student", "export"):
        base, _, k = load_base(tiny / kind)
        assert k == kind
        ref = logits(base)
        targets = default_targets(base)
        assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
        for group in (0, 32):
            model = get_peft_model(copy.deepcopy(base), lora_config(4, 8, targets, qalora_group=group))
            layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLoraLinear)}
            assert len(layers) == 21
            assert torch.equal(logits(model), ref)
            want = sum(4 * (m.in_features // (group or 1) + m.out_features) for m in layers.values())
            assert sum(p.numel() for p in model.parameters() if p.requires_grad) == want


def test_frozen_base_gives_the_straight_through_input_gradient():
    """The base runs without autograd (packed kernels have none); dy/dx is W_hat (rotated back for Hadamard layers):
    for a weight-only layer exactly what autograd through its eval forward gives."""
    from qat.finetune.lora import FrozenBase

    torch.manual_seed(0)
    for spec in (W2, {"weight": {"bits": 4, "group_size": 32}, "act": {"bits": 8, "hadamard": True}}):
        lin = QuantLinear.from_linear(torch.nn.Linear(64, 16), QuantSpec.from_dict(spec)).eval()
        for p in lin.parameters():
            p.requires_grad_(False)
        x = torch.randn(3, 5, 64, requires_grad=True)
        gy = torch.randn(3, 5, 16)
        y = FrozenBase.apply(x, lin)
        assert torch.equal(y, lin(x))  # the deployed forward, bit for bit
        (gx,) = torch.autograd.grad(y, x, gy)
        x2 = x.detach().clone().requires_grad_(True)
        w = lin.quantized_weight()
        ref = torch.nn.functional.linear(lin.rotate_input(x2), w)  # activation quantizer passed straight through
        (gref,) = torch.autograd.grad(ref, x2, gy)
        torch.testing.assert_close(gx, gref, rtol=1e-6, atol=1e-6)
        if not spec.get("act"):
            assert torch.equal(gx, gref)


# ---- training, saving, loading ----------------------------------------------------------------------------------------

def test_finetune_trains_the_adapter_only_and_saves_it_in_peft_format(lora_run, tiny):
    res, out = lora_run["result"], lora_run["out"]
    hist = res["history"]
    assert [h["stage"] for h in hist] == ["base", "lora"]
    assert hist[1]["val_ppl"] < 0.9 * hist[0]["val_ppl"]  # it learned the code text
    assert hist[1]["steps"] == 8 and hist[1]["tokens"] == 8 * 2 * 32
    assert res["trainable_params"] == sum(4 * (m.in_features + m.out_features)  # r (in + out) per layer
                                          for m in quant_linears(res["model"]).values())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 32 and not cfg["use_qalora"]
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    meta = json.loads((out / "qat_adapter.json").read_text())
    assert meta["base_kind"] == "student" and len(meta["modules"]) == 21 and len(meta["base_fingerprint"]) == 64
    assert (out / "finetune_summary.png").stat().st_size > 10_000
    assert list((Path(res["run_dir"]) / "tb").glob("events.out.tfevents.*"))
    # the base never changed: the student checkpoint's weights are what the adapter model still computes with
    from qat.checkpoint import load_student

    student, _ = load_student(tiny / "student")
    base = res["model"].get_base_model()
    for name, m in quant_linears(student).items():
        assert torch.equal(base.get_submodule(name).get_base_layer().weight, m.weight)
    # the Lightning checkpoint holds the adapter alone
    ck = torch.load(Path(res["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["state_dict"] and all(".lora_" in k for k in ck["state_dict"])


def test_adapter_save_load_gives_the_same_logits(lora_run, tiny):
    """Saved -> loaded (qat's checked loader, and peft's documented from_pretrained with the custom layers registered)
    -> logits bit-identical to the in-memory adapter model."""
    from peft import LoraConfig, PeftModel

    from qat.finetune.base import load_base
    from qat.finetune.lora import registered

    ref = logits(lora_run["result"]["model"].eval())
    assert torch.equal(logits(adapter_model(tiny / "student", lora_run["out"])), ref)
    base, _, _ = load_base(tiny / "student")
    config = registered(LoraConfig.from_pretrained(str(lora_run["out"])))
    assert torch.equal(logits(PeftModel.from_pretrained(base, str(lora_run["out"]), config=config)), ref)
    assert not torch.equal(logits(load_base(tiny / "student")[0]), ref)


def test_peft_from_pretrained_on_a_loaded_export(lora_run, tiny):
    """qat.load_quantized(export) + PeftModel.from_pretrained: the student's adapter model, bit for bit (float32
    export); a run on the export itself trains the same adapter as on the student."""
    import qat
    from peft import LoraConfig, PeftModel

    from qat.finetune.lora import registered

    config = registered(LoraConfig.from_pretrained(str(lora_run["out"])))
    model = PeftModel.from_pretrained(qat.load_quantized(tiny / "export", dtype=torch.float32), str(lora_run["out"]),
                                      config=config)
    assert torch.equal(logits(model), logits(lora_run["result"]["model"].eval()))


def test_finetune_on_an_export_matches_the_student_run(lora_run, tiny, tmp_path):
    res = finetune(recipe_for(tiny, tmp_path / "a", model="export"))
    a = json.loads((tmp_path / "a" / "qat_adapter.json").read_text())
    b = json.loads((lora_run["out"] / "qat_adapter.json").read_text())
    assert a["base_kind"] == "export" and a["base_fingerprint"] == b["base_fingerprint"]
    assert [h["val_ppl"] for h in res["history"]] == [h["val_ppl"] for h in lora_run["result"]["history"]]
    assert torch.equal(logits(adapter_model(tiny / "student", tmp_path / "a")), logits(lora_run["result"]["model"]))


class KillAt(Callback):
    def __init__(self, n):
        self.n = n

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.global_step_ == self.n:
            raise KeyError(f"simulated kill at step {self.n}")


def test_resume_is_bit_exact(lora_run, tiny, tmp_path):
    """Killed after step 5 (last checkpoint at step 3), resumed: the adapter equals the uninterrupted run's."""
    out = tmp_path / "adapter"
    with pytest.raises(KeyError, match="simulated kill at step 5"):
        finetune(recipe_for(tiny, out), callbacks=[KillAt(5)])
    assert not out.exists()
    with pytest.raises(FileExistsError, match="already holds a checkpoint; pass --resume last"):
        finetune(recipe_for(tiny, out))
    res = finetune(recipe_for(tiny, out), resume="last")
    assert res["module"].resumed_from["global_step"] == 3
    ref = lora_run["result"]["model"].state_dict()
    got = res["model"].state_dict()
    lora_keys = [k for k in ref if ".lora_" in k]
    assert lora_keys and all(torch.equal(ref[k], got[k]) for k in lora_keys)
    assert [h["val_ppl"] for h in res["history"]] == [h["val_ppl"] for h in lora_run["result"]["history"]]


def test_resume_with_lora_dropout_is_bit_exact(tiny, tmp_path):
    """With dropout on the LoRA branch every step draws random masks: the RNG states in the checkpoint make the
    resumed run draw the same ones."""
    drop = ("--lora.dropout", "0.1")
    ref = finetune(recipe_for(tiny, tmp_path / "ref", *drop))["model"].state_dict()
    with pytest.raises(KeyError):
        finetune(recipe_for(tiny, tmp_path / "a", *drop), callbacks=[KillAt(4)])
    got = finetune(recipe_for(tiny, tmp_path / "a", *drop), resume="last")["model"].state_dict()
    keys = [k for k in ref if ".lora_" in k]
    assert all(torch.equal(ref[k], got[k]) for k in keys)
    plain = finetune(recipe_for(tiny, tmp_path / "plain"))["model"].state_dict()
    assert not all(torch.equal(ref[k], plain[k]) for k in keys)  # the dropout did act


def test_resume_refuses_a_changed_recipe_or_base(lora_run, tiny, tmp_path):
    """A resume that would mix two runs is refused before any weight loads: another learning rate or another --model
    path (the run's finetune.json against this recipe), or the same path holding other weights (the base
    fingerprint in the checkpoint). What a resume may change (progress, checkpointing) is accepted."""
    from qat.distill.recipe import RecipeError

    base = tmp_path / "base"
    save_tiny_student(base, W2, seed=0)
    out = tmp_path / "adapter"
    with pytest.raises(KeyError):
        finetune(recipe_for(tiny, out, "--model", str(base)), callbacks=[KillAt(4)])
    with pytest.raises(RecipeError, match=r"different recipe or input: optim.default_lr \(0.01 -> 0.02\)"):
        finetune(recipe_for(tiny, out, "--model", str(base), "--optim.default_lr", "2e-2"), resume="last")
    other = save_tiny_student(tmp_path / "other", W2, seed=1)
    with pytest.raises(RecipeError, match="different recipe or input: model "):
        finetune(recipe_for(tiny, out, "--model", str(other)), resume="last")
    save_tiny_student(base, W2, seed=1)  # same path, other weights
    with pytest.raises(ValueError, match="trained on another base model than --model"):
        finetune(recipe_for(tiny, out, "--model", str(base), "--memory.grad_checkpointing", "true",
                            "--checkpoint_every", "2"), resume="last")


# ---- merge ------------------------------------------------------------------------------------------------------------

def _layer_io(model, names):
    """{name: (input, output)} of the named modules for one forward of ids()."""
    seen, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: seen.__setitem__(n, (a[0].detach(), out.detach()))))
    logits(model)
    for h in hooks:
        h.remove()
    return seen


def _gamma(n: int) -> float:
    return n * U32 / (1 - n * U32)


def test_exact_merge_equals_the_adapter_model(qalora_run, tiny, tmp_path):
    """QA-LoRA folds into float zero points. Per layer, on the real activations, |y_adapter - y_merged| stays within the
    derived float32 bound: both differ from the exact x (W_hat + D)^T only by rounding, the adapter by its two matmuls
    (gamma_n |x||W_hat| + gamma_K (n_g pooled|x|) |A|^T |B|^T scaling + u |y|), the merged layer by its matmul and
    the float32 storage of z - d/s (|x| |W' - (W_hat + D)|, itself checked inside the merge)."""
    from qat.checkpoint import load_student
    from qat.finetune.merge import merge_adapter

    out = tmp_path / "merged"
    report = merge_adapter(tiny / "student", qalora_run["out"], out, mode="exact")
    assert report["mode"] == "exact" and report["layers"] == 21 and report["exact_bound_ratio"] <= 1
    merged, meta = load_student(out)
    assert meta["spec"]["weight"]["float_zero"] and meta["merge"]["mode"] == "exact"
    adapter = qalora_run["result"]["model"].eval()
    names = sorted(quant_linears(merged))
    io_a = _layer_io(adapter.get_base_model(), names)
    for n in names:
        x, y_a = io_a[n]
        y_m = merged.get_submodule(n)(x).detach()
        lay = adapter.get_base_model().get_submodule(n)
        w = lay.get_base_layer().quantized_weight().double()
        A, B = lay.lora_A["default"].weight.double(), lay.lora_B["default"].weight.double()
        g, n_in = 32, x.shape[-1]
        ng = n_in // g
        ax = x.double().abs()
        pooled = ax.reshape(*ax.shape[:-1], ng, g).mean(-1) * ng
        bound_a = _gamma(n_in) * ax @ w.abs().T + _gamma(g + ng + A.shape[0] + 4) * lay.scaling["default"] * \
            (pooled @ A.abs().T) @ B.abs().T + U32 * y_a.double().abs()
        w_m = merged.get_submodule(n).quantized_weight().double()
        delta = lay.get_delta_weight("default")
        bound_m = _gamma(n_in) * ax @ w_m.abs().T + ax @ (w_m - (w + delta)).abs().T
        err = (y_a.double() - y_m.double()).abs()
        assert (err <= bound_a + bound_m).all(), n
    # end to end: the same model up to float32 rounding (3 blocks); perplexity to 6 digits
    a, m = logits(adapter), logits(merged)
    assert (a - m).abs().max() <= 1e-5 * a.abs().max()
    # export as usual: the packed merged model is the merged student bit for bit (float zeros, float32)
    assert cli(["export", "--student", str(out), "--output", str(tmp_path / "export"), "--dtype", "float32"]) == 0
    import qat

    assert torch.equal(logits(qat.load_quantized(tmp_path / "export")), m)


def test_approximate_merge_adds_the_delta_to_the_latent_weights(lora_run, tiny, tmp_path):
    from qat.checkpoint import load_student
    from qat.finetune.merge import merge_adapter

    report = merge_adapter(tiny / "student", lora_run["out"], tmp_path / "m", mode="auto")
    assert report["mode"] == "approx" and "plain LoRA" in report["why_not_exact"]
    merged, meta = load_student(tmp_path / "m")
    student, _ = load_student(tiny / "student")
    adapter = lora_run["result"]["model"].get_base_model()
    for name, m in quant_linears(merged).items():
        want = student.get_submodule(name).weight + adapter.get_submodule(name).get_delta_weight("default").float()
        assert torch.equal(m.weight, want)
        assert not m.spec.weight.float_zero
    # a short stage-1 pass against the adapter model brings the merged student closer to it
    refined = merge_adapter(tiny / "student", lora_run["out"], tmp_path / "r", mode="approx", refine_steps=4,
                            data=tiny / "train.txt", refine_samples=8, seq_len=32)
    assert refined["refine"]["history"][-1]["steps"] == 3 * 4  # 4 steps for each of the 3 blocks
    # (on average over the check's logits: its maximum is one outlier logit of a random tiny model)
    assert refined["check"]["mean_abs_logit_diff"] < 0.95 * report["check"]["mean_abs_logit_diff"]
    with pytest.raises(ValueError, match="the exact merge needs none"):
        merge_adapter(tiny / "student", lora_run["out"], tmp_path / "x", mode="exact", refine_steps=2,
                      data=tiny / "train.txt")
    with pytest.raises(FileNotFoundError, match="--refine-steps needs --data"):
        merge_adapter(tiny / "student", lora_run["out"], tmp_path / "x", refine_steps=2)


def test_float_zero_quantizer_packs_bit_exactly():
    from qat.config import WeightSpec
    from qat.export.compressed_tensors import check_compressed_tensors_spec
    from qat.quantizers.uniform import UniformQuantizer

    torch.manual_seed(0)
    q = UniformQuantizer(WeightSpec(bits=2, group_size=32, float_zero=True), 8, 64).eval()
    w = torch.randn(8, 64)
    q.init_from(w)
    q.zero_shift.normal_()
    p = q.pack(w)
    assert p["zeros"].dtype == torch.float32 and torch.equal(q.unpack(p), q(w))
    assert q.bits_per_weight == 2 + (16 + 32) / 32
    s, z = q.scale_zero(w)
    plain = UniformQuantizer(WeightSpec(bits=2, group_size=32), 8, 64).eval()
    plain.load_state_dict({k: v for k, v in q.state_dict().items() if k != "zero_shift"})
    # the shift moves every weight of a group by zero_shift * s (up to float32 rounding); the codes stay
    torch.testing.assert_close(q(w), plain(w) + (q.zero_shift * s).repeat_interleave(32, 1))
    with pytest.raises(ValueError, match="compressed-tensors export stores integer zero points"):
        check_compressed_tensors_spec(QuantSpec.from_dict({"weight": {"bits": 2, "group_size": 32,
                                                                      "float_zero": True}}))
    with pytest.raises(ValueError, match="float_zero applies to the uniform format only"):
        WeightSpec(format="vq", float_zero=True)


# ---- CLI: --adapter, errors -------------------------------------------------------------------------------------------

def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()[-1:]


def test_eval_and_generate_take_an_adapter(lora_run, tiny, capsys):
    rc = cli(["eval", "--model", str(tiny / "student"), "--data", str(tiny / "val.txt"), "--seq-len", "32",
              "--max-tokens", "1024", "--adapter", str(lora_run["out"]), "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and res["perplexity"] == pytest.approx(lora_run["result"]["history"][-1]["val_ppl"], rel=1e-12)
    from qat.export.generate import generate_ids

    model = lora_run["result"]["model"].eval()
    tok = byte_tokenizer()
    x = tok("def main():", return_tensors="pt").input_ids
    want = generate_ids(model, x, max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0]
    assert cli(["generate", "--model", str(tiny / "export"), "--prompt", "def main():", "--adapter",
                str(lora_run["out"]), "--max-new-tokens", "8", "--greedy"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text == tok.decode(want, skip_special_tokens=True)


def test_adapters_that_do_not_fit_are_one_line_errors(lora_run, qalora_run, tiny, tmp_path, capsys):
    other = save_tiny_student(tmp_path / "other", W2, seed=1)  # same architecture, other weights
    wide = save_tiny_student(tmp_path / "wide", W2, intermediate_size=96)  # other MLP shapes
    base = ["eval", "--data", str(tiny / "val.txt"), "--seq-len", "32", "--max-tokens", "256"]
    cases = [
        (other, lora_run["out"], "was trained on another base model"),
        (tiny / "fp", lora_run["out"], "was trained on another base model"),
        (wide, lora_run["out"], r"does not fit this model: model\.layers\.0\.mlp\.down_proj\.lora_A has shape \[4, "
                                r"128\], the layer \(96 -> 64\) needs \[4, 96\]"),
        (tiny / "student", tmp_path / "nowhere", "adapter directory .* does not exist"),
        (tiny / "student", tiny / "student", "missing adapter_config.json; not an adapter written by qat finetune"),
    ]
    for model, adapter, pattern in cases:
        assert cli([*base, "--model", str(model), "--adapter", str(adapter)]) == 2
        err = _err(capsys)
        assert len(err) == 1 and err[0].startswith("qat eval: error: "), err
        assert re.search(pattern, err[0]), err[0]
    # merge: an adapter of another base, plain LoRA with --mode exact, a VQ student, an export
    for argv, pattern in (
        (["--student", str(other), "--adapter", str(qalora_run["out"])], "was trained on another base model"),
        (["--student", str(tiny / "student"), "--adapter", str(lora_run["out"]), "--mode", "exact"],
         "--mode exact: the exact merge needs a QA-LoRA adapter"),
        (["--student", str(tiny / "export"), "--adapter", str(lora_run["out"])], "is not a student checkpoint"),
    ):
        assert cli(["merge", *argv, "--output", str(tmp_path / "m")]) == 2
        err = _err(capsys)
        assert err[0].startswith("qat merge: error: ") and pattern in err[0], err
        assert not (tmp_path / "m").exists()


def test_finetune_bad_targets_and_options_fail_before_work(tiny, tmp_path, capsys):
    out = tmp_path / "a"
    common = ["finetune", "--model", str(tiny / "student"), "--data", str(tiny / "train.txt"), "--output", str(out)]
    for extra, pattern in (
        (["--lora.targets", "[nope]"], "LoRA targets ['nope'] match no module of the model; its quantized linears "
                                       "are named down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"),
        (["--lora.targets", "[mlp]"], "LoRA target 'model.layers.0.mlp' is a LlamaMLP, not a linear layer"),
        (["--loss.kind", "kl"], "loss kl distills against a teacher: pass --teacher FP_DIR"),
        (["--optim.name", "paged_adamw8bit"], "optim.name paged_adamw8bit keeps optimizer state in CUDA unified "
                                              "memory and runs on CUDA devices only (this run is on cpu)"),
        (["--lora.r", "0"], "lora needs r >= 1"),
    ):
        assert cli([*common, *extra]) == 2
        err = _err(capsys)
        assert err == [f"qat finetune: error: {pattern}"] or (pattern in err[0] and err[0].startswith(
            "qat finetune: error: ")), err
        assert not out.exists() and not Path(str(out) + ".run").exists()
    assert cli(["finetune", "--model", str(tiny / "fp"), "--data", str(tiny / "train.txt"), "--output", str(out)]) == 2
    assert _err(capsys) == ["qat finetune: error: the model has no quantized linears to adapt (an FP model?): qat "
                            "finetune trains LoRA on a qat student or export; name the linears with --lora.targets "
                            "(e.g. [q_proj, v_proj]) to adapt an FP model"]
    vq = save_tiny_student(tmp_path / "vq", {"weight": {"format": "vq"}})
    assert cli(["finetune", "--model", str(vq), "--data", str(tiny / "train.txt"), "--output", str(out),
                "--lora.qalora", "true"]) == 2
    assert "lora.qalora needs uniform group-wise weights" in _err(capsys)[0]


def test_finetune_cli_prints_a_json_line(tiny, tmp_path, capsys):
    rc = cli(["finetune", "--model", str(tiny / "student"), "--data", str(tiny / "train.txt"), "--output",
              str(tmp_path / "a"), "--steps", "2", "--batch_size", "1", "--seq_len", "32", "--num_samples", "4",
              "--lora.r", "2", "--lora.targets", "[q_proj, v_proj]", "--progress", "false"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["steps"] == 2 and out["trainable_params"] == 3 * (2 * (64 + 64) + 2 * (64 + 32))
    assert json.loads((tmp_path / "a" / "qat_adapter.json").read_text())["modules"] == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj"))


def test_overwrite_never_deletes_what_finetune_or_merge_did_not_write(lora_run, tiny, tmp_path, capsys):
    """--overwrite replaces an adapter / merged student qat wrote, never a user's directory (as output or run dir)."""
    base = ["finetune", "--model", str(tiny / "student"), "--data", str(tiny / "train.txt"), "--steps", "1",
            "--batch_size", "1", "--seq_len", "32", "--num_samples", "2", "--lora.r", "2", "--progress", "false",
            "--overwrite", "true"]
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    assert cli([*base, "--output", str(user), "--run_dir", str(tmp_path / "r1")]) == 2
    assert "is not a qat output" in _err(capsys)[0]
    assert cli([*base, "--output", str(tmp_path / "a"), "--run_dir", str(user)]) == 0  # used beside the user's files
    capsys.readouterr()
    assert (user / "notes.txt").read_text() == "keep" and (user / "checkpoints").is_dir()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "checkpoints").mkdir()
    assert cli([*base, "--output", str(tmp_path / "b"), "--run_dir", str(tmp_path / "theirs")]) == 2
    assert "which qat finetune did not write" in _err(capsys)[0] and not (tmp_path / "b").exists()
    assert cli(["merge", "--student", str(tiny / "student"), "--adapter", str(lora_run["out"]), "--output",
                str(user), "--overwrite"]) == 2
    assert "not replacing it" in _err(capsys)[0] and (user / "notes.txt").read_text() == "keep"
