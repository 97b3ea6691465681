"""Try every bad or unusual input of docs/RELIABILITY.md against the real `qat` command and write the table there.

    python scripts/bad_inputs.py [--assets ../shared/assets] [--doc docs/RELIABILITY.md] [--only SUBSTRING]

Each case builds its inputs in a scratch directory (a tiny random Llama with the SmolLM2 tokenizer, a W2g32 RTN
student of it, its native and compressed-tensors exports, a finished tiny distillation run; the bundled GGUF for the
convert-gguf cases), runs `qat ...` as a subprocess (so the exit status and every stderr line are the real ones),
and checks that the files the case names as precious are byte-identical afterwards. The table between the markers in
the doc is replaced; the rest of the doc is prose. Takes about 10 minutes on 2 CPU cores (one real GGUF conversion).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bad-inputs:begin (scripts/bad_inputs.py) -->", "<!-- bad-inputs:end -->"
TINY_RECIPE = REPO / "configs" / "tiny" / "w2-three-stages.yaml"


@dataclass
class Case:
    command: str
    what: str
    argv: list[str]
    keep: list[Path] = field(default_factory=list)  # must be byte-identical afterwards
    python: str | None = None  # a Python snippet instead of a CLI call


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(str(f).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def qat(*args) -> list[str]:
    return [str(Path(sys.executable).with_name("qat")), *map(str, args)]


def sh(*argv) -> None:
    subprocess.run([str(a) for a in argv], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class World:
    """The shared inputs, built once."""

    def __init__(self, root: Path, assets: Path):
        import torch
        from safetensors.torch import load_file, save_file  # noqa: F401  (used by the cases)
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        self.root, self.assets = root, assets
        tok = AutoTokenizer.from_pretrained(assets / "smollm2-135m-instruct")
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        self.model = root / "model"
        LlamaForCausalLM(cfg).save_pretrained(self.model)
        tok.save_pretrained(self.model)
        text = (assets / "corpora" / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
        self.train, self.val = root / "train.txt", root / "val.txt"
        self.train.write_text(text[:20000], encoding="utf-8")
        self.val.write_text(text[20000:40000], encoding="utf-8")
        self.student, self.export, self.ct = root / "student", root / "export", root / "ct"
        sh(*qat("ptq", "--model", self.model, "--method", "rtn", "--bits", "2", "--group-size", "32", "--output",
                self.student, "--device", "cpu"))
        sh(*qat("export", "--student", self.student, "--output", self.export, "--dtype", "float32"))
        s4 = root / "student-w4"
        sh(*qat("ptq", "--model", self.model, "--method", "rtn", "--bits", "4", "--group-size", "32", "--output", s4,
                "--device", "cpu"))
        sh(*qat("export", "--student", s4, "--output", self.ct, "--format", "compressed-tensors", "--dtype",
                "float32"))
        self.run_out = root / "distilled"
        sh(*self.distill(self.run_out, "--checkpoint_every", "3"))
        self.run_dir = Path(str(self.run_out) + ".run")
        self.adapter = root / "adapter"  # a finished LoRA run on the student (its run dir: adapter.run)
        sh(*self.finetune(self.adapter, "--checkpoint_every", "3"))
        self.ft_run_dir = Path(str(self.adapter) + ".run")

    def distill(self, out, *extra) -> list[str]:
        return qat("distill", "--config", TINY_RECIPE, "--model", self.model, "--data.train_file", self.train,
                   "--eval.file", self.val, "--output", out, *extra)

    def finetune(self, out, *extra) -> list[str]:
        return qat("finetune", "--model", self.student, "--data", self.train, "--output", out, "--steps", "6",
                   "--batch_size", "2", "--seq_len", "32", "--num_samples", "8", "--lora.r", "4", "--progress",
                   "false", *extra)

    def copy(self, src: Path, name: str) -> Path:
        dst = Path(tempfile.mkdtemp(dir=self.root)) / name
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
        return dst

    def run_copy(self) -> tuple[Path, Path]:
        """(output, run_dir) of a copy of the finished run, to resume."""
        d = Path(tempfile.mkdtemp(dir=self.root))
        shutil.copytree(self.run_dir, d / "distilled.run")
        return d / "distilled", d / "distilled.run"


def edit_json(path: Path, fn) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def edit_tensors(path: Path, fn) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    fn(sd)
    save_file(sd, str(path), metadata=meta)


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def cases(w: World, gguf: Path) -> list[Case]:
    import torch

    out: list[Case] = []
    scratch = w.root / "scratch"
    scratch.mkdir()
    n = iter(range(1000))

    def fresh(name: str) -> Path:
        return scratch / f"{next(n)}-{name}"

    def user_dir() -> Path:
        d = fresh("documents")
        (d / "figures").mkdir(parents=True)
        (d / "thesis.txt").write_text("years of work")
        (d / "figures" / "a.png").write_bytes(b"\x89PNG")
        return d

    def ev(model, *extra) -> list[str]:
        return qat("eval", "--model", model, "--data", w.val, "--seq-len", "64", "--max-tokens", "2048", *extra)

    def ptq(model, output, *extra) -> list[str]:
        return qat("ptq", "--model", model, "--method", "rtn", "--bits", "2", "--group-size", "32", "--output", output,
                   "--device", "cpu", *extra)

    # ---- convert-gguf ----
    conv = fresh("converted")
    out += [
        Case("convert-gguf", "`--gguf` that does not exist", qat("convert-gguf", "--gguf", fresh("no.gguf"),
                                                                   "--output", fresh("c"))),
    ]
    t = fresh("truncated.gguf")
    t.write_bytes(gguf.read_bytes()[:5_000_000])
    e = fresh("empty.gguf")
    e.write_bytes(b"")
    txt = fresh("text.gguf")
    txt.write_text("not a gguf file\n" * 100)
    ud = user_dir()
    f = fresh("file.txt")
    f.write_text("a file")
    other = fresh("other.gguf")
    b = bytearray(gguf.read_bytes())
    b[-100] ^= 0xFF  # same model layout, different bytes
    other.write_bytes(bytes(b))
    out += [
        Case("convert-gguf", "a truncated GGUF (first 5 MB)", qat("convert-gguf", "--gguf", t, "--output", fresh("c"))),
        Case("convert-gguf", "an empty GGUF file", qat("convert-gguf", "--gguf", e, "--output", fresh("c"))),
        Case("convert-gguf", "a text file named .gguf", qat("convert-gguf", "--gguf", txt, "--output", fresh("c"))),
        Case("convert-gguf", "`--output` a directory of the user's files", qat("convert-gguf", "--output", ud),
             keep=[ud]),
        Case("convert-gguf", "the same, with `--overwrite`", qat("convert-gguf", "--output", ud, "--overwrite"),
             keep=[ud]),
        Case("convert-gguf", "`--output` under a file", qat("convert-gguf", "--output", f / "m"), keep=[f]),
        Case("convert-gguf", "first conversion of the bundled GGUF", qat("convert-gguf", "--output", conv)),
        Case("convert-gguf", "the same GGUF again into its output", qat("convert-gguf", "--output", conv), keep=[conv]),
        Case("convert-gguf", "a different GGUF into that output, no `--overwrite`",
             qat("convert-gguf", "--gguf", other, "--output", conv), keep=[conv]),
    ]

    # ---- eval: model directories of every kind, damaged ----
    def model_copy(fn, name="model") -> Path:
        m = w.copy(w.model, name)
        fn(m)
        return m

    def no_weights(m):
        (m / "model.safetensors").unlink()

    def drop(name):
        return lambda m: edit_tensors(m / "model.safetensors", lambda sd: sd.pop(name))

    def reshape(m):
        edit_tensors(m / "model.safetensors",
                     lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 32)))

    def extra(m):
        edit_tensors(m / "model.safetensors", lambda sd: sd.__setitem__("model.layers.2.mlp.up_proj.weight",
                                                                         torch.zeros(128, 64)))

    def bert(m):
        edit_json(m / "config.json", lambda c: c.update(model_type="bert"))

    nocfg = model_copy(lambda m: (m / "config.json").unlink())
    badjson = model_copy(lambda m: (m / "config.json").write_text("{not json"))
    out += [
        Case("eval", "`--model` that does not exist", ev(fresh("nowhere"))),
        Case("eval", "`--model` a hub name", ev("HuggingFaceTB/SmolLM2-135M")),
        Case("eval", "a directory without config.json", ev(nocfg)),
        Case("eval", "config.json that is not JSON", ev(badjson)),
        Case("eval", "a model directory without model.safetensors", ev(model_copy(no_weights))),
        Case("eval", "a truncated model.safetensors", ev(model_copy(lambda m: truncate(m / "model.safetensors")))),
        Case("eval", "model.safetensors lacking one MLP weight",
             ev(model_copy(drop("model.layers.1.mlp.up_proj.weight")))),
        Case("eval", "a tensor of the wrong shape", ev(model_copy(reshape))),
        Case("eval", "a tensor the architecture does not have", ev(model_copy(extra))),
        Case("eval", "an unsupported architecture (model_type bert)", ev(model_copy(bert))),
    ]

    def student_copy(fn) -> Path:
        s = w.copy(w.student, "student")
        fn(s)
        return s

    def spec_edit(**kw):
        return lambda s: edit_json(s / "qat_student.json", lambda m: m["spec"]["weight"].update(**kw))

    def drop_quantized(s):
        edit_json(s / "qat_student.json", lambda m: m.update(quantized=m["quantized"][:-1]))

    def zero_out_of_grid(s):
        edit_tensors(s / "student.safetensors", lambda sd: (
            sd["model.layers.0.mlp.down_proj.weight_quantizer.zero"].__setitem__((0, 0), 7.0)))

    def no_embedded_spec_zero(s):
        from safetensors.torch import load_file, save_file

        sd = load_file(s / "student.safetensors")
        sd["model.layers.0.mlp.down_proj.weight_quantizer.zero"][0, 0] = 7.0
        save_file(sd, str(s / "student.safetensors"), metadata={"format": "pt"})

    out += [
        Case("eval", "a student without qat_student.json", ev(student_copy(lambda s: (s / "qat_student.json").unlink()))),
        Case("eval", "qat_student.json holding `{}`", ev(student_copy(lambda s: (s / "qat_student.json").write_text("{}")))),
        Case("eval", "qat_student.json that is not JSON",
             ev(student_copy(lambda s: (s / "qat_student.json").write_text("{\"spec\":")))),
        Case("eval", "a student whose spec says bits 1 (tensors: 2)", ev(student_copy(spec_edit(bits=1)))),
        Case("eval", "a student whose spec says bits 3 (tensors: 2)", ev(student_copy(spec_edit(bits=3)))),
        Case("eval", "a student whose spec says group size 64 (tensors: 32)",
             ev(student_copy(spec_edit(group_size=64)))),
        Case("eval", "a student whose spec says bits 9", ev(student_copy(spec_edit(bits=9)))),
        Case("eval", "a student whose module list lacks one layer", ev(student_copy(drop_quantized))),
        Case("eval", "a truncated student.safetensors",
             ev(student_copy(lambda s: truncate(s / "student.safetensors")))),
        Case("eval", "a zero point of 7 in a 2-bit student written before the spec was embedded",
             ev(student_copy(no_embedded_spec_zero))),
        Case("eval", "a zero point of 7 in a 2-bit student (spec unchanged)", ev(student_copy(zero_out_of_grid))),
    ]

    def export_copy(fn, src=None) -> Path:
        x = w.copy(src or w.export, "export")
        fn(x)
        return x

    def qc_bits(x):
        edit_json(x / "config.json", lambda c: c["quantization_config"].update(bits=3))

    def spec_bits(x):
        edit_json(x / "config.json", lambda c: (c["quantization_config"].update(bits=3),
                                                 c["quantization_config"]["spec"]["weight"].update(bits=3)))

    def zeros(x):
        edit_tensors(x / "model.safetensors", lambda sd: sd["model.layers.1.self_attn.v_proj.zeros"].__setitem__(
            (3, 0), 9))

    def modules(x):
        edit_json(x / "config.json", lambda c: c["quantization_config"].update(
            modules=c["quantization_config"]["modules"][1:]))

    def method(x):
        edit_json(x / "config.json", lambda c: c["quantization_config"].update(quant_method="gptq"))

    def ct_shape(x):
        edit_tensors(x / "model.safetensors", lambda sd: sd.__setitem__(
            "model.layers.0.mlp.up_proj.weight_shape", torch.tensor([128, 32])))

    out += [
        Case("eval", "a native export (is it the student's perplexity?)", ev(w.export)),
        Case("eval", "the student it came from", ev(w.student)),
        Case("eval", "a native export whose summary says bits 3", ev(export_copy(qc_bits))),
        Case("eval", "a native export whose spec says bits 3 (packed: 2)", ev(export_copy(spec_bits))),
        Case("eval", "a native export with a zero point of 9 in a 2-bit grid", ev(export_copy(zeros))),
        Case("eval", "a native export lacking a packed tensor",
             ev(export_copy(lambda x: edit_tensors(x / "model.safetensors",
                                                   lambda sd: sd.pop("model.layers.0.self_attn.o_proj.scales"))))),
        Case("eval", "a native export whose module list lacks a layer", ev(export_copy(modules))),
        Case("eval", "a truncated native export", ev(export_copy(lambda x: truncate(x / "model.safetensors")))),
        Case("eval", "a compressed-tensors export (is it the student's?)", ev(w.ct)),
        Case("eval", "a compressed-tensors export lacking a weight_scale",
             ev(export_copy(lambda x: edit_tensors(x / "model.safetensors", lambda sd: sd.pop(
                 "model.layers.0.mlp.up_proj.weight_scale")), w.ct))),
        Case("eval", "a compressed-tensors weight_shape that disagrees", ev(export_copy(ct_shape, w.ct))),
        Case("eval", "quant_method gptq (not one qat reads)", ev(export_copy(method))),
        Case("eval", "`--device cuda` on a machine without CUDA", ev(w.model, "--device", "cuda")),
        Case("eval", "`--seq-len 0`", qat("eval", "--model", w.model, "--data", w.val, "--seq-len", "0")),
    ]
    empty = fresh("empty.txt")
    empty.write_text("")
    out.append(Case("eval", "an empty `--data` file", qat("eval", "--model", w.model, "--data", empty, "--seq-len",
                                                           "64")))

    # ---- ptq ----
    m_in = w.copy(w.model, "model")
    ud2, f2, ex = user_dir(), fresh("file.txt"), w.copy(w.export, "export")
    f2.write_text("a file")
    out += [
        Case("ptq", "`--model` a student checkpoint", ptq(w.student, fresh("o"))),
        Case("ptq", "`--model` lacking one tensor", ptq(model_copy(drop("model.layers.1.mlp.up_proj.weight")),
                                                         fresh("o"))),
        Case("ptq", "`--output` equal to `--model`, with `--overwrite`", ptq(m_in, m_in, "--overwrite"), keep=[m_in]),
        Case("ptq", "`--output` under a file (checked before PTQ)", ptq(w.model, f2 / "student"), keep=[f2]),
        Case("ptq", "`--output` a directory of the user's files, `--overwrite`", ptq(w.model, ud2, "--overwrite"),
             keep=[ud2]),
        Case("ptq", "`--output` an export, `--overwrite`", ptq(w.model, ex, "--overwrite"), keep=[ex]),
        Case("ptq", "`--output` an existing student, no `--overwrite`", ptq(w.model, w.student), keep=[w.student]),
        Case("ptq", "`--group-size 48` (does not divide 64)", qat("ptq", "--model", w.model, "--method", "rtn",
                                                                  "--group-size", "48", "--output", fresh("o"))),
        Case("ptq", "`--device cuda` without CUDA", ptq(w.model, fresh("o"), "--device", "cuda")),
    ]

    # ---- export ----
    s_in, ud3 = w.copy(w.student, "student"), user_dir()
    parent = fresh("runs")
    shutil.copytree(w.student, parent / "student")
    out += [
        Case("export", "`--student` an FP model directory", qat("export", "--student", w.model, "--output",
                                                                 fresh("e"))),
        Case("export", "`--student` a native export", qat("export", "--student", w.export, "--output", fresh("e"))),
        Case("export", "`--output` equal to `--student`, `--overwrite`",
             qat("export", "--student", s_in, "--output", s_in, "--overwrite"), keep=[s_in]),
        Case("export", "`--output` the directory holding `--student`, `--overwrite`",
             qat("export", "--student", parent / "student", "--output", parent, "--overwrite"), keep=[parent]),
        Case("export", "`--output` a directory of the user's files, `--overwrite`",
             qat("export", "--student", w.student, "--output", ud3, "--overwrite"), keep=[ud3]),
        Case("export", "`--format gguf` (not a choice)", qat("export", "--student", w.student, "--output",
                                                             fresh("e"), "--format", "gguf")),
        Case("export", "a student whose spec says bits 3 (tensors: 2)",
             qat("export", "--student", student_copy(spec_edit(bits=3)), "--output", fresh("e"))),
    ]

    # ---- generate ----
    out += [
        Case("generate", "`--prompt \"\"`", qat("generate", "--model", w.export, "--prompt", "")),
        Case("generate", "`--device cuda` without CUDA", qat("generate", "--model", w.export, "--prompt", "hi",
                                                             "--device", "cuda")),
        Case("generate", "`--max-new-tokens 0`", qat("generate", "--model", w.export, "--prompt", "hi",
                                                     "--max-new-tokens", "0")),
        Case("generate", "a native export with a zero point outside the grid",
             qat("generate", "--model", export_copy(zeros), "--prompt", "hi")),
    ]

    # ---- distill ----
    def resume_case(what, damage=None, *extra) -> Case:
        o, r = w.run_copy()
        if damage:
            damage(r / "checkpoints")
        return Case("distill", what, w.distill(o, "--checkpoint_every", "3", "--resume", "last", *extra),
                    keep=[r / "recipe.json"])

    def trunc_last(c):
        truncate(c / "last.ckpt")

    def trunc_both(c):
        truncate(c / "last.ckpt")
        truncate(c / "prev.ckpt")

    def empty_last_no_prev(c):
        (c / "last.ckpt").write_bytes(b"")
        (c / "prev.ckpt").unlink()

    changed_text = fresh("train.txt")
    changed_text.write_text(w.train.read_text()[::-1])
    foreign = fresh("runs")
    (foreign / "checkpoints").mkdir(parents=True)
    (foreign / "checkpoints" / "mine.ckpt").write_bytes(b"someone else's")
    shared = fresh("runs")
    (shared / "other-run").mkdir(parents=True)
    (shared / "other-run" / "result.json").write_text("{}")
    s_in2 = w.copy(w.student, "student")
    short_run = ["--stages", "[{kind: blockwise, steps: 1, batch_size: 4}]", "--quant.act.bits", "16"]
    out += [
        Case("distill", "`--resume last` with no run yet", w.distill(fresh("o"), "--resume", "last")),
        resume_case("`--resume last`, last.ckpt truncated (prev.ckpt good)", trunc_last),
        resume_case("`--resume last`, last.ckpt and prev.ckpt truncated", trunc_both),
        resume_case("`--resume last`, last.ckpt empty, no prev.ckpt", empty_last_no_prev),
        resume_case("`--resume last --quant.weight.bits 4`", None, "--quant.weight.bits", "4"),
        resume_case("`--resume last --stages.0.steps 2` (fewer than already ran)", None, "--stages.0.steps", "2"),
        resume_case("`--resume last` with other text at `--data.train_file`", None, "--data.train_file",
                    changed_text),
        resume_case("`--resume last --progress true --checkpoint_every 5` (safe keys)", None, "--progress", "true",
                    "--checkpoint_every", "5"),
        Case("distill", "a fresh start over an existing run", w.distill(fresh("o"), "--run_dir", w.run_dir),
             keep=[w.run_dir]),
        Case("distill", "`--run_dir` holding someone's `checkpoints/`, `--overwrite true`",
             w.distill(fresh("o"), "--run_dir", foreign, "--overwrite", "true"), keep=[foreign]),
        Case("distill", "`--run_dir` shared with another run's files", w.distill(fresh("o"), "--run_dir", shared,
             *short_run), keep=[shared / "other-run"]),
        Case("distill", "the same `--run_dir` again, `--overwrite true`", w.distill(
             fresh("o"), "--run_dir", shared, "--overwrite", "true", *short_run), keep=[shared / "other-run"]),
        Case("distill", "`--output` equal to `--student`, `--overwrite true`",
             w.distill(s_in2, "--student", s_in2, "--overwrite", "true"), keep=[s_in2]),
        Case("distill", "`--student` a native export", w.distill(fresh("o"), "--student", w.export)),
        Case("distill", "`--model` lacking one tensor",
             w.distill(fresh("o"), "--model", model_copy(drop("model.layers.1.mlp.up_proj.weight")))),
    ]

    # ---- finetune / merge ----
    def ft_resume(what, *extra) -> Case:
        d = Path(tempfile.mkdtemp(dir=w.root))
        shutil.copytree(w.ft_run_dir, d / "adapter.run")
        return Case("finetune", what, w.finetune(d / "adapter", "--checkpoint_every", "3", "--resume", "last", *extra),
                    keep=[d / "adapter.run" / "finetune.json"])

    ud4, ud5, ad_in = user_dir(), user_dir(), w.copy(w.adapter, "adapter")
    other_student = fresh("other-student")
    sh(*qat("ptq", "--model", w.model, "--method", "rtn", "--bits", "4", "--group-size", "32", "--output",
            other_student, "--device", "cpu"))
    s_in3 = w.copy(w.student, "student")
    out += [
        Case("finetune", "`--data` that does not exist", w.finetune(fresh("a"), "--data", fresh("none.txt"))),
        Case("finetune", "`--model` a native export (supported: LoRA on the packed linears)",
             w.finetune(fresh("a"), "--model", w.export)),
        Case("finetune", "`--model` an FP model (no quantized linears)", w.finetune(fresh("a"), "--model", w.model)),
        Case("finetune", "`--lora.targets` matching no module", w.finetune(fresh("a"), "--lora.targets", "[nothing]")),
        Case("finetune", "`--lora.qalora true` on an FP model, `--lora.targets [q_proj]`",
             w.finetune(fresh("a"), "--model", w.model, "--lora.qalora", "true", "--lora.targets", "[q_proj]")),
        Case("finetune", "`--output` a directory of the user's files, `--overwrite true`",
             w.finetune(ud4, "--overwrite", "true"), keep=[ud4]),
        Case("finetune", "`--output` an existing adapter, no `--overwrite`", w.finetune(ad_in), keep=[ad_in]),
        Case("finetune", "`--resume last` with no run yet", w.finetune(fresh("a"), "--resume", "last")),
        ft_resume("`--resume last --optim.default_lr 0.02` (changes the result)", "--optim.default_lr", "0.02"),
        ft_resume("`--resume last --progress true` (safe key)", "--progress", "true"),
        Case("merge", "`--adapter` a student directory", qat("merge", "--student", w.student, "--adapter", w.student,
                                                             "--output", fresh("m"))),
        Case("merge", "an adapter onto another student", qat("merge", "--student", other_student, "--adapter",
                                                             w.adapter, "--output", fresh("m"))),
        Case("merge", "`--output` equal to `--student`, `--overwrite`",
             qat("merge", "--student", s_in3, "--adapter", w.adapter, "--output", s_in3, "--overwrite"),
             keep=[s_in3]),
        Case("merge", "`--output` a directory of the user's files, `--overwrite`",
             qat("merge", "--student", w.student, "--adapter", w.adapter, "--output", ud5, "--overwrite"),
             keep=[ud5]),
        Case("merge", "`--refine-steps 2` without `--data`", qat("merge", "--student", w.student, "--adapter",
                                                                 w.adapter, "--output", fresh("m"), "--mode",
                                                                 "approx", "--refine-steps", "2")),
    ]

    # ---- Python API ----
    out += [
        Case("qat.load_quantized", "a student directory", [], python=f"import qat; qat.load_quantized({str(w.student)!r})"),
        Case("qat.load_quantized", "`device='cuda'` without CUDA", [],
             python=f"import qat; qat.load_quantized({str(w.export)!r}, device='cuda')"),
    ]
    return out


def run_case(c: Case, env: dict) -> dict:
    before = digest(c.keep) if c.keep else None
    argv = [sys.executable, "-c", c.python] if c.python else c.argv
    t0 = time.time()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    err = [ln for ln in p.stderr.replace("\r", "\n").splitlines()  # without progress bars and Python warnings
           if ln.strip() and "%|" not in ln and "Warning" not in ln and not ln.startswith("  warnings.warn")]
    if c.python:  # an API raises: report the exception line
        said = err[-1] if p.returncode else (p.stdout.strip().splitlines() or ["(returned)"])[-1]
    else:
        said = next((ln for ln in err if ln.startswith("qat ")), None) or (p.stdout.strip().splitlines() or [""])[-1]
    return {"rc": p.returncode, "said": said, "stderr_lines": len(err), "traceback": "Traceback" in p.stderr,
            "kept": None if before is None else digest(c.keep) == before, "seconds": round(time.time() - t0, 1)}


def short(text: str, root: Path) -> str:
    text = text.replace(str(root) + "/", "").replace(str(root), "")
    for tmp in sorted({p for p in text.split() if "/tmp" in p}, key=len, reverse=True):
        text = text.replace(tmp, "…")
    return (text[:230] + "…" if len(text) > 230 else text).replace("|", "\\|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=str(REPO.parent / "shared" / "assets"))
    ap.add_argument("--doc", default=str(REPO / "docs" / "RELIABILITY.md"))
    ap.add_argument("--only", default=None, help="run only the cases whose description contains this")
    a = ap.parse_args()
    from qat.models.convert_gguf import bundled_gguf

    root = Path(tempfile.mkdtemp(prefix="qat-bad-inputs-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QAT_CACHE_DIR": str(root / "token-cache"), "PYTHONWARNINGS": "ignore"}
    try:
        t0 = time.time()
        world = World(root, Path(a.assets))
        rows = []
        for i, c in enumerate(cases(world, bundled_gguf()), 1):
            if a.only and a.only not in c.what and a.only != c.command:
                continue
            r = run_case(c, env)
            rows.append((i, c, r))
            print(f"{i:3d} {c.command:18s} rc={r['rc']} lines={r['stderr_lines']} kept={r['kept']} "
                  f"{c.what}: {short(r['said'], root)}", flush=True)
        minutes = (time.time() - t0) / 60
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if a.only:
        return 0
    when = datetime.date.today().isoformat()
    head = (f"Generated by `python scripts/bad_inputs.py` on {when} ({platform.machine()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, {minutes:.0f} min). `exit` is the status of the real `qat` process; "
            "`says` is its one `qat <cmd>: error:` line (or, on success, its last line of output); `lines` counts "
            "the non-empty stderr lines besides progress bars; `kept` is whether the files the case names as "
            "precious (its inputs, or the existing output) are byte-identical afterwards. Paths are shortened.\n\n")
    table = ["| # | command | input | exit | lines | kept | says |", "| --: | --- | --- | --: | --: | :-: | --- |"]
    for i, c, r in rows:
        kept = "–" if r["kept"] is None else ("yes" if r["kept"] else "**NO**")
        lines = f"{r['stderr_lines']}" + (" (traceback)" if r["traceback"] else "")
        table.append(f"| {i} | {c.command} | {c.what} | {r['rc']} | {lines} | {kept} | {short(r['said'], root)} |")
    doc = Path(a.doc)
    text = doc.read_text() if doc.exists() else f"{BEGIN}\n{END}\n"
    pre, rest = text.split(BEGIN, 1)
    post = rest.split(END, 1)[1]
    doc.write_text(pre + BEGIN + "\n" + head + "\n".join(table) + "\n" + END + post)
    print(f"wrote {doc} ({len(rows)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
