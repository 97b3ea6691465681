"""Every recipe in configs/ loads through the `qat distill` parser and validates (stage kinds, losses, budgets,
parameter classes, the quant spec), and its stage list is what the file says."""
from __future__ import annotations

import pytest
import yaml
from conftest import REPO

RECIPES = sorted((REPO / "configs").rglob("*.yaml"))
DEFAULT_MODEL = ["w2g64", "w3g64", "w4g64", "lcqat-vq2", "lbllm-w1p1", "lbllm-w1p1a4", "efficientqat-w2g64", "acbq-w4a4",
                 "cbq-w2g64"]


def test_default_model_has_every_method_recipe():
    have = {p.stem for p in (REPO / "configs" / "smollm2-135m").glob("*.yaml")}
    assert set(DEFAULT_MODEL) <= have


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO / "configs")) for p in RECIPES])
def test_recipe_loads_and_validates(path):
    from qat.distill.recipe_cli import load_recipe
    from qat.distill.stage import stage_kinds

    raw = yaml.safe_load(path.read_text())
    r = load_recipe(path, ["--output", "unused"])
    assert [s.kind for s in r.stages] == [s["kind"] for s in raw["stages"]]
    assert all(s.kind in stage_kinds() and s.loss.kind and (s.train or s.rounding.enabled) for s in r.stages)
    spec = r.quant_spec()
    if raw.get("student"):  # a recipe that continues a student takes its spec from it
        assert spec is None and "quant" not in raw
    else:
        assert spec is not None and spec.to_dict()["weight"]["format"] == raw["quant"]["weight"]["format"]
    if raw.get("model"):  # recipes for a real model name a relative path (no machine paths in the repo)
        assert not raw["model"].startswith("/") and not str(raw["data"].get("train_file", "")).startswith("/")
