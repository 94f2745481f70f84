"""The plain fine-tuning control, small: MiniLM on a slice of MELD for two passes, scored on dev after
each, plain and after post-hoc logit adjustment (its schedule is the engine's linear decay, tested there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_plain_loop_scores_dev_after_every_pass(shared_data, tmp_path):
    out = tmp_path / "plain.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_meld_plain.py"), "--backbone", "minilm", "--epochs", "2",
         "--limit", "120", "--threads", "1", "--data", str(shared_data), "--json", str(out),
         "--markdown", str(tmp_path / "plain.md")],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (result,) = json.loads(out.read_text())["seeds"]
    assert len(result["history"]) == 2 and result["best_epoch"] in (1, 2)
    best = result["history"][result["best_epoch"] - 1]
    assert result["weighted_f1"] == best["weighted_f1"] == max(h["weighted_f1"] for h in result["history"])
    assert all(0.0 <= h["macro_f1"] <= 1.0 for h in result["history"]) and result["seconds"] > 0
    assert result["adjusted"] == best["adjusted"] and 0.0 <= result["adjusted"]["macro_f1"] <= 1.0
    table = (tmp_path / "plain.md").read_text()
    assert "| 0 | argmax |" in table and "| 0 | logits − 1·log prior |" in table
