"""Memory savers of `qat distill` and `qat finetune` (qat/distill/memory.py, optim.py): activation checkpointing
(recomputes blocks, gradients bit-identical, only inside whole-model forwards), the int8 / NF4 teacher through
bitsandbytes, bitsandbytes' 8-bit AdamW on CPU, and one-line errors where a saver cannot run."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from test_distill import recipe_for, run
from test_finetune import finetune, tiny  # noqa: F401  (tiny: the fine-tuning tests' fixture)
from test_finetune import recipe_for as finetune_recipe

from qat.cli import main as cli
from qat.distill import memory

pytestmark = pytest.mark.usefixtures("one_thread", "token_cache")  # conftest.py


def _grads(model, x):
    model.zero_grad()
    model(input_ids=x, use_cache=False).logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_recomputes_blocks_with_identical_gradients():
    torch.manual_seed(0)
    model = tiny_model("llama").eval()  # eval mode, as every distillation / fine-tuning step runs
    x = torch.randint(0, 256, (2, 16))
    calls = []
    model.model.layers[1].input_layernorm.register_forward_hook(lambda *a: calls.append(1))
    ref = _grads(model, x)
    assert len(calls) == 1
    ac = memory.ActivationCheckpointing(model)
    calls.clear()
    got = _grads(model, x)
    assert len(calls) == 2  # the block ran again in the backward pass
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # a block called on its own (block-wise stages) is not checkpointed, and no module was left in training mode
    calls.clear()
    h = torch.randn(1, 16, 64, requires_grad=True)
    pe = model.model.rotary_emb(h, torch.arange(16)[None])
    model.model.layers[1](h, position_embeddings=pe).sum().backward()
    assert len(calls) == 1 and not any(m.training for m in model.modules())
    ac.remove()
    calls.clear()
    _grads(model, x)
    assert len(calls) == 1


@pytest.mark.parametrize("precision, cls, max_rel_err", [("int8", "Linear8bitLt", 0.05), ("nf4", "Linear4bit", 0.3)])
def test_quantized_teacher(tiny_dir, precision, cls, max_rel_err):  # noqa: F811
    fp = memory.load_teacher(tiny_dir / "model", "cpu")
    t = memory.load_teacher(tiny_dir / "model", "cpu", precision)
    assert type(t.model.layers[0].mlp.down_proj).__name__ == cls and type(t.lm_head).__name__ == "Linear"
    assert not any(p.requires_grad for p in t.parameters()) and not t.training
    assert t.get_memory_footprint() < 0.5 * fp.get_memory_footprint()
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = fp(x).logits, t(x).logits
    assert 0 < float((got - ref).norm() / ref.norm()) < max_rel_err


E2E = "[{kind: e2e, steps: 3, batch_size: 2, train: [wq], loss: {kind: kl}, optim: {lr: {wq: 1.0e-3}}}]"


def test_distill_stage2_with_memory_savers(tiny_dir, tmp_path):  # noqa: F811
    """Activation checkpointing changes nothing in the result (bit for bit); the int8 teacher and the 8-bit AdamW run
    and train (on CPU: bitsandbytes 0.50 runs both)."""
    def student(name, *extra):
        res = run(recipe_for(tiny_dir, tmp_path / name, "--quant.act.bits", "16", "--stages", E2E, "--eval.file",
                             "null", *extra))
        return res["module"]

    plain = student("plain")
    ckpt = student("ckpt", "--memory.grad_checkpointing", "true")
    assert ckpt.student.model.layers[0].gradient_checkpointing
    assert not plain.student.model.layers[0].gradient_checkpointing
    a, b = plain.student.state_dict(), ckpt.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    saver = student("all", "--memory.teacher", "int8", "--memory.grad_checkpointing", "true",
                    "--stages.0.optim.name", "adamw8bit")
    assert type(saver.teacher.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    c = saver.student.state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a if ".weight_quantizer." in k)
    meta = json.loads((tmp_path / "all" / "qat_student.json").read_text())
    assert meta["distill"]["recipe"]["memory"] == {"teacher": "int8", "grad_checkpointing": True}


def test_finetune_with_memory_savers(tiny, tmp_path):  # noqa: F811
    a = finetune(finetune_recipe(tiny, tmp_path / "a"))
    b = finetune(finetune_recipe(tiny, tmp_path / "b", "--memory.grad_checkpointing", "true"))
    sa, sb = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if ".lora_" in k)
    c = finetune(finetune_recipe(tiny, tmp_path / "c", "--teacher", str(tiny / "fp"), "--memory.teacher", "nf4",
                                 "--optim.name", "adamw8bit"))
    assert type(c["module"].ctx.teacher.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    assert c["history"][-1]["val_ppl"] < c["history"][0]["val_ppl"]


def test_savers_that_cannot_run_fail_before_work(tiny_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from conftest import REPO

    cmd = ["distill", "--config", str(REPO / "configs" / "tiny" / "w2-three-stages.yaml"), "--model",
           str(tiny_dir / "model"), "--data.train_file", str(tiny_dir / "train.txt"), "--output", str(tmp_path / "o")]
    assert cli([*cmd, "--stages.1.optim.name", "paged_adamw"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "qat distill: error: optim.name paged_adamw keeps optimizer state in CUDA unified memory and runs on CUDA "
        "devices only (this run is on cpu); use adamw8bit for 8-bit optimizer state"]
    monkeypatch.setattr(memory, "bnb_teacher_usable", lambda precision, dev: "RuntimeError: no kernel")
    assert cli([*cmd, "--memory.teacher", "nf4"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "qat distill: error: memory.teacher nf4: bitsandbytes cannot run nf4 layers on cpu (RuntimeError: no kernel); "
        "it runs them on CUDA GPUs and on x86-64 CPUs (bitsandbytes >= 0.46)"]
    assert cli([*cmd, "--memory.teacher", "fp4"]) == 2
    assert "unknown memory.teacher 'fp4'; supported: fp, int8, nf4" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.run").exists()
