"""Student checkpoints and atomic output directories: round trips, and failures that lose nothing."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from qat.checkpoint import STUDENT_META, STUDENT_WEIGHTS, load_student, save_student
from qat.config import QuantSpec
from qat.io import atomic_output_dir
from qat.nn import quant_linears, quantize_model


def _student(tmp_path, fmt_spec=None):
    model = tiny_model("llama")
    spec = QuantSpec.from_dict(fmt_spec or {"weight": {"bits": 3, "group_size": 32}})
    quantize_model(model, spec)
    with torch.no_grad():  # move quantizer params off their init so the round trip is meaningful
        for m in quant_linears(model).values():
            m.weight_quantizer.scale.mul_(1.05)
    out = save_student(model, None, spec, tmp_path / "s", meta={"history": [{"stage": "ptq", "ppl": 1.0}]})
    return model, out


def test_round_trip_gives_identical_logits_and_meta(tmp_path):
    model, out = _student(tmp_path)
    loaded, meta = load_student(out)
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert meta["history"][0]["stage"] == "ptq" and meta["bits_per_weight"] == pytest.approx(3.75)
    assert len(meta["quantized"]) == 21


def test_truncated_weights_are_a_clear_error(tmp_path):
    _, out = _student(tmp_path)
    w = out / STUDENT_WEIGHTS
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match="student.safetensors: truncated or corrupt safetensors file"):
        load_student(out)


def test_not_a_student_and_corrupt_meta(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a qat student checkpoint"):
        load_student(tmp_path)
    _, out = _student(tmp_path)
    (out / STUDENT_META).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt student metadata"):
        load_student(out)


def test_meta_that_does_not_match_the_architecture(tmp_path):
    _, out = _student(tmp_path)
    meta = json.loads((out / STUDENT_META).read_text())
    meta["quantized"] = meta["quantized"][:-1]
    (out / STUDENT_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not match the architecture"):
        load_student(out)


def test_atomic_dir_keeps_the_good_output_when_writing_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as d:
        (d / "config.json").write_text("good")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(target, overwrite=True) as d:
            (d / "config.json").write_text("half")
            raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or lock file left behind
    assert json.loads((target / ".qat-output.json").read_text()) == {"kind": "student"}
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        with atomic_output_dir(target):
            pass


def test_convert_gguf_missing_file_is_one_line(tmp_path, capsys):
    from qat.cli import main

    assert main(["convert-gguf", "--gguf", str(tmp_path / "x.gguf"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qat convert-gguf: error: GGUF file '{tmp_path / 'x.gguf'}' not found"]
    assert not (tmp_path / "o").exists()
