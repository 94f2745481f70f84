"""The reference-table benchmark is a thin call of `emofuse.compare` over speaker folds: it fixes the
protocol (preset, folds, seeds) and writes the comparison's Markdown under the command that made it."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import reference_table as rt  # noqa: E402
from emofuse.core.apps.compare import ComparisonResult  # noqa: E402


def test_the_benchmark_runs_compare_over_speaker_folds_and_writes_its_table(tmp_path, monkeypatch, shared_data):
    calls = {}

    def fake_compare(config, **kwargs):
        calls.update(kwargs, config=config)
        row = {"key": "baseline:concatenated", "model": "baseline: all branches' inputs concatenated, logistic regression",
               "kind": "baseline", "accuracy": 0.7, "rank": 1, "folds": 4, "modalities": "audio+features"}
        return ComparisonResult(tmp_path, [row], [], [], [], [0], ["a"], folds=4, baseline_key=row["key"],
                                split_sizes={"test": 720})

    monkeypatch.setattr(rt.emofuse, "compare", fake_compare)  # the public API call the benchmark makes
    md = tmp_path / "table.md"
    argv = ["--preset", "ravdess-egemaps", "--data", str(shared_data), "--folds", "4", "--seeds", "0,1",
            "--set", "train.refit=true", "--out", str(tmp_path / "runs"), "--markdown", str(md)]
    assert rt.main(argv) == 0
    assert calls["folds"] == 4 and calls["seeds"] == [0, 1] and calls["config"].train.refit
    assert calls["config"].preset == "ravdess-egemaps" or calls["config"].name == "ravdess-egemaps"
    text = md.read_text()
    assert rt.command_line(argv) in text and "cross-validation over 4 speaker folds" in text
    assert md.with_suffix(".json").is_file()
