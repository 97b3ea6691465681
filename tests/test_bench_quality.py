"""scripts/bench_quality.py --quick: the benchmark's every code path (PTQ row, distillation row, evaluation on both
domains, the report and its plot) on a tiny random model, as CI runs it."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.timeout(1000)  # 74 s on a loaded 2-core machine; the script itself is bounded by 900 s below
def test_quick_mode_runs_every_row_and_writes_the_report(tmp_path):
    p = subprocess.run([sys.executable, "scripts/bench_quality.py", "--quick", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=900, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert p.returncode == 0, p.stderr[-2000:]
    rows = {r.stem: json.loads(r.read_text()) for r in (tmp_path / "quality").glob("*.json")}
    assert set(rows) == {"fp", "gptq-w2g64", "ours-w2-tiny"}
    for r in rows.values():
        assert math.isfinite(r["wikitext2"]) and math.isfinite(r["code"]) and r["wikitext2"] > 1
    assert rows["fp"]["bits_per_weight"] is None and rows["gptq-w2g64"]["bits_per_weight"] == 2 + 24 / 64
    assert [h["stage"] for h in rows["ours-w2-tiny"]["history"]] == ["ptq", "blockwise0", "e2e1"]
    assert rows["ours-w2-tiny"]["tokens"] == {"blockwise_per_window": 2 * 2 * 32, "e2e": 2 * 2 * 32}
    report = (tmp_path / "RESULTS.md").read_text()
    for name in rows:
        assert f"| {name}: " in report
    assert (tmp_path / "quality" / "ppl_vs_bits.png").stat().st_size > 10_000
