"""`make demo` (scripts/demo.py) end to end on the tiny model: the W4g64 recipe cut to one step per stage, the packed
export reloaded, and generation beside the FP model. The real-model run is what the README quotes; this keeps the
script working when the APIs it strings together change."""
from __future__ import annotations

import json
import math
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import demo  # noqa: E402


def test_demo_runs_the_story_on_the_tiny_model(tiny_dir, tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(REPO)  # the recipe's corpus paths are repo-relative, as for `make demo`
    cut = demo.demo_overrides  # the tiny model's positions stop at 128: shorter windows, same code path
    monkeypatch.setattr(demo, "demo_overrides", lambda a: [*cut(a), "--data.seq_len", "64", "--eval.seq_len", "64",
                                                           "--ptq.seq_len", "64", "--data.train_file",
                                                           str(tiny_dir / "train.txt")])
    out = tmp_path / "demo"
    rc = demo.main(["--model", str(tiny_dir / "model"), "--out", str(out), "--eval-tokens", "512", "--samples", "4",
                    "--block-steps", "1", "--e2e-steps", "1", "--new-tokens", "3", "--prompt", "The cat"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [name for name, _ in res["stages"]] == ["ptq", "signround", "e2e-qp"]  # every step of the story measured
    assert all(math.isfinite(p) and p > 1 for _, p in res["stages"]) and math.isfinite(res["fp_perplexity"])
    assert 0 < res["export_bytes"] < res["fp16_bytes"]
    (gen,) = res["generations"]
    assert gen["prompt"] == "The cat" and set(gen) == {"prompt", "FP", "W4g64"}
    # the printed table is the measured perplexities and their ratio to the FP teacher's, row for row
    table = (out / "results.md").read_text().splitlines()[2:]
    fp = res["fp_perplexity"]
    assert len(table) == 1 + len(res["stages"])
    for line, p in zip(table, [fp] + [p for _, p in res["stages"]]):
        ppl, ratio = (float(c.replace(",", "")) for c in line.strip("| ").split(" | ")[1:])
        assert ppl == round(p, 2) and ratio == round(p / fp, 2), (line, p, fp)
    assert (out / "export" / "config.json").is_file()
    assert "make demo:" in capsys.readouterr().out
