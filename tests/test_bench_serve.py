"""The load test of `benchmarks/bench_serve.py`, small: it starts the server itself on loopback, runs a
fixed number of uploads per level in both modes, stops by itself, and writes its Markdown table."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_load_test_runs_bounded_and_writes_its_table(speech_fusion_checkpoint, shared_data, tmp_path):
    table = tmp_path / "serve.md"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--checkpoint", str(speech_fusion_checkpoint),
         "--requests", "8", "--concurrency", "1,4", "--time-cap", "60", "--transcribe-every", "4",
         "--markdown", str(table)],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines() if line.startswith("| ")][2:]
    assert [(r[0].split(" (")[0].strip() + r[0].partition(":")[2].rstrip(), int(r[1])) for r in rows] == [
        ("batching", 1), ("batching", 4), ("no batching", 1), ("no batching", 4),
        ("mixed with transcript", 1), ("mixed transcribed", 1), ("mixed with transcript", 4), ("mixed transcribed", 4)]
    for mode, clients, ok, errors, rps, p50, p95, mean_batch in rows:
        assert int(errors) == 0 and float(rps) > 0 and 0 < float(p50) <= float(p95)
        # the mixed load: 2 of every 8 uploads (1 in 4) come without their transcript
        assert int(ok) == {"with transcript": 6, "transcribed": 2}.get(mode.partition(":")[2].strip(), 8)
        if "no batching" in mode:
            assert float(mean_batch) == 1.0
