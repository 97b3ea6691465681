"""`qat ptq` and recipes take the same quant keys from one parser definition (qat/args.py); the short ptq flags are
aliases of those keys; dicts become dataclasses through one helper (qat.config.from_dict)."""
from __future__ import annotations

import re

import pytest

from qat.cli import main as qat_main
from qat.config import QuantConfigError, QuantSpec


def _help(capsys, command: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        qat_main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _quant_options(help_text: str) -> dict[str, str]:
    """{--quant.* option: its help text, whitespace-normalised} from a --help page."""
    out, key = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (--quant\.[\w.]+)(?: \S+)?(?:,.*?)?(?:\s{2,}(.*))?$", line)
        if m:
            key = m.group(1)
            out[key] = m.group(2) or ""
        elif key and line.startswith(" " * 10) and line.strip():
            out[key] = f"{out[key]} {line.strip()}".strip()
        else:
            key = None
    return out


def test_ptq_and_distill_help_list_the_same_quant_keys_with_the_same_docs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    ptq, distill = _quant_options(_help(capsys, "ptq")), _quant_options(_help(capsys, "distill"))
    keys = {"--quant.weight.format", "--quant.weight.bits", "--quant.weight.group_size", "--quant.weight.sym",
            "--quant.weight.lwc", "--quant.weight.float_zero", "--quant.weight.vq_dim", "--quant.weight.hadamard_block",
            "--quant.act.bits", "--quant.act.mode", "--quant.act.sym", "--quant.act.hadamard", "--quant.skip"}
    assert keys <= set(ptq)
    assert ptq == distill
    assert "vq only: vector length (the codebook is the affine image of {0..3}^vq_dim) (default: 4)" in \
        ptq["--quant.weight.vq_dim"]
    assert "symmetric per-token grid" in ptq["--quant.act.sym"]


def _ptq_spec(*words: str) -> QuantSpec:
    from qat.ptq.command import parse_args

    return parse_args(["--model", "m", "--output", "o", *words])[1]


def test_ptq_quant_keys_and_their_short_aliases_give_the_same_spec():
    assert _ptq_spec("--quant.weight.bits", "3", "--quant.weight.group_size", "32", "--quant.weight.sym", "true",
                     "--quant.act.bits", "4", "--quant.act.mode", "knee", "--quant.act.hadamard", "true") == \
        _ptq_spec("--bits", "3", "--group-size", "32", "--sym", "--act-bits", "4", "--act-mode", "knee",
                  "--act-hadamard")
    vq = _ptq_spec("--format", "vq", "--quant.weight.vq_dim", "2", "--quant.weight.hadamard_block", "64")
    assert (vq.weight.format, vq.weight.bits, vq.weight.vq_dim, vq.weight.hadamard_block) == ("vq", 2, 2, 64)
    assert _ptq_spec("--quant.act.bits", "8", "--quant.act.sym", "true").act.sym is True  # no short flag for it
    assert _ptq_spec("--quant.weight.format", "binary11").weight.bits == 2  # the format's default, not uniform's 4
    assert _ptq_spec().describe() == "W4g128"
    with pytest.raises(QuantConfigError, match="--bits 2 contradicts --quant.weight.bits 3"):
        _ptq_spec("--bits", "2", "--quant.weight.bits", "3")


def test_recipe_and_ptq_build_the_same_spec_from_the_same_keys(tmp_path):
    from qat.distill.recipe_cli import parse_args

    words = ["--quant.weight.format", "vq", "--quant.weight.vq_dim", "2", "--quant.act.bits", "8",
             "--quant.act.sym", "true"]
    base = ["--output", "o", "--data.train_file", "t.txt", "--stages", '[{"kind": "e2e", "steps": 1}]']
    recipe, _ = parse_args(["--model", "m", *base, *words])
    assert recipe.quant == _ptq_spec(*words)
    no_quant, _ = parse_args(["--student", "s", *base])
    assert no_quant.quant is None  # no quant key given: the spec comes from the student


def test_one_dict_to_dataclass_helper_names_the_path_of_an_unknown_key():
    from qat.distill.recipe import RecipeError, StageSpec
    from qat.distill.recipe_cli import recipe_from_dict

    r = recipe_from_dict({"quant": {"weight": {"bits": 2}}, "ptq": {"method": "rtn"}, "data": {"train_file": "t"},
                          "stages": [{"kind": "e2e", "steps": 1, "loss": {"kind": "ce"}}]})
    assert isinstance(r.stages[0], StageSpec) and r.stages[0].loss.kind == "ce" and r.ptq.method == "rtn"
    assert r.quant.weight.bits == 2
    with pytest.raises(RecipeError, match=r"recipe\.stages\.0\.loss: unknown key\(s\) \['knd'\]"):
        recipe_from_dict({"quant": {}, "stages": [{"kind": "e2e", "steps": 1, "loss": {"knd": "ce"}}]})
    with pytest.raises(QuantConfigError, match=r"recipe\.quant\.act: unknown key\(s\) \['bitz'\]"):
        recipe_from_dict({"quant": {"act": {"bitz": 4}}, "stages": [{"kind": "e2e", "steps": 1}]})
