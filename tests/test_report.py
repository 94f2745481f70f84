"""Report files are written, readable and agree with the metrics they show."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from matplotlib.image import imread
from rich.console import Console

from emofuse.core.engine.metrics import metric_report
from emofuse.cli.tables import evaluation_tables, rich_table
from emofuse.core.apps.report import (
    Column,
    csv_text,
    human_bytes,
    markdown_table,
    plot_comparison_bars,
    write_evaluation_report,
)

LABELS = ["neutral", "happy", "sad", "angry"]


@pytest.fixture(scope="module")
def report():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (60,), generator=g)
    logits = torch.randn(60, 4, generator=g)
    logits[torch.arange(60), labels] += 1.5
    return metric_report(labels, logits, LABELS, bootstrap=100, seed=0)


def test_evaluation_files_are_written_and_readable(tmp_path, report):
    paths = write_evaluation_report(report, tmp_path, title="test split")
    data = json.loads(paths["json"].read_text())
    assert data["metrics"]["accuracy"] == pytest.approx(report.metrics["accuracy"])
    assert data["confusion_matrix"] == report.confusion
    assert set(data["per_class"]) == set(LABELS)
    lo, hi = data["intervals"]["macro_f1"]
    assert lo <= data["metrics"]["macro_f1"] <= hi

    md = paths["markdown"].read_text()
    assert f"{report.metrics['accuracy']:.4f}" in md and "Per class" in md and "angry" in md

    with paths["per_class_csv"].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == LABELS
    assert sum(int(r["support"]) for r in rows) == 60

    with paths["confusion_csv"].open() as fh:
        cm = [[int(r[n]) for n in LABELS] for r in csv.DictReader(fh)]
    assert cm == report.confusion

    image = imread(paths["confusion_png"])  # a real PNG that decodes
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0.01  # not a blank canvas


def test_rich_tables_render(report):
    console = Console(record=True, width=120)
    summary, per_class = evaluation_tables(report, title="test")
    console.print(summary)
    console.print(per_class)
    text = console.export_text()
    assert "Macro F1" in text and "95% CI low" in text and "neutral" in text


def test_mean_std_columns_and_markdown():
    rows = [{"model": "late|fusion", "accuracy": 0.71234, "accuracy_std": 0.0123, "size": 2048},
            {"model": "branch", "accuracy": None, "size": 100}]
    cols = [Column("model", "Model", justify="left"), Column("accuracy", "Acc (%)", ".1f", std_key="accuracy_std", pct=True),
            Column("size", "Size", human_bytes)]
    md = markdown_table(rows, cols)
    lines = md.strip().splitlines()
    assert lines[0] == "| Model | Acc (%) | Size |"
    assert "| late\\|fusion | 71.2 ± 1.2 | 2.0 KiB |" in lines
    assert "| branch | – | 100 B |" in lines
    console = Console(record=True, width=100)
    console.print(rich_table(rows, cols, title="t"))
    assert "71.2 ± 1.2" in console.export_text()
    text = csv_text(rows)
    parsed = list(csv.DictReader(text.splitlines()))
    assert parsed[0]["accuracy"] == "0.71234" and parsed[1]["accuracy"] == ""


def test_bar_chart_png(tmp_path):
    rows = [{"model": "a", "accuracy": 0.5, "accuracy_std": 0.05, "macro_f1": 0.4},
            {"model": "b", "accuracy": 0.7, "macro_f1": 0.65, "macro_f1_std": 0.02}]
    path = plot_comparison_bars(rows, tmp_path / "bars.png", metrics=("accuracy", "macro_f1"))
    image = imread(path)
    assert image.ndim == 3 and image.std() > 0.01
