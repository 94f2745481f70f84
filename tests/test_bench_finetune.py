"""The fine-tuning speed benchmark, small: MiniLM fine-tuned on MELD for a few steps in its four variants
(random or length-grouped batches, AdamW's default loop or its fused kernel), side by side."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_finetune_benchmark_times_four_variants(shared_data, tmp_path):
    out = tmp_path / "speed.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_finetune.py"), "--preset", "meld-finetune", "--steps", "3",
         "--repeats", "1", "--threads", "1", "--data", str(shared_data), "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batches"], r["adamw"]) for r in rows] == [
        ("random", "default"), ("random", "fused"), ("length-grouped", "default"), ("length-grouped", "fused")]
    assert all(r["seconds_per_step"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    random_pad, grouped_pad = rows[0]["padded_tokens_per_utterance"], rows[2]["padded_tokens_per_utterance"]
    assert grouped_pad < random_pad  # what grouping is for: less padding per utterance
