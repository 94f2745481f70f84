"""Turning metrics into things people read: Markdown/CSV/JSON files and PNG plots (confusion matrix,
comparison bar chart); the terminal's tables are drawn by the CLI (`emofuse.cli.tables`).

Tables are described once as a list of `Column`s over plain dict rows, and every writer uses that
description, so the terminal, the Markdown file and the CSV always agree. Plots draw on a
`matplotlib.figure.Figure` (Agg canvas), never through pyplot's global state, so nothing here
changes the backend of a caller's session.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from emofuse.core.checkpoint import atomic_write_bytes
from emofuse.core.engine.metrics import HEADLINE_METRICS, METRIC_TITLES, MetricReport


@dataclass(frozen=True)
class Column:
    """One table column: the row key it shows, its title, and how a value reads.

    `fmt` is a format spec (``".4f"``, ``","``) or a callable; `std_key` names a row key holding a
    standard deviation shown as ``mean ± std`` when present; `pct` shows fractions as percentages.
    """

    key: str
    title: str
    fmt: str | Callable[[Any], str] = ""
    std_key: str | None = None
    pct: bool = False
    justify: str = "right"

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        text = self._one(value)
        std = row.get(self.std_key) if self.std_key else None
        if std is not None and not (isinstance(std, float) and math.isnan(std)):
            text += " ± " + self._one(std)
        return text

    def _one(self, value: Any) -> str:
        if callable(self.fmt):
            return self.fmt(value)
        if self.pct and isinstance(value, (int, float)):
            return format(100.0 * value, self.fmt or ".1f")
        if self.fmt and isinstance(value, (int, float)):
            return format(value, self.fmt)
        return str(value)


def human_bytes(n: Any) -> str:
    """``1536`` -> ``"1.5 KiB"``: checkpoint sizes readable at a glance."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def human_count(n: Any) -> str:
    """``1234567`` -> ``"1,234,567"``."""
    return f"{int(n):,}"


# --- generic table writers ---------------------------------------------------------------------------
def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""

    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(esc(c.title) for c in columns) + " |"
    rule = "|" + "|".join(":---" if i == 0 else "---:" if c.justify == "right" else ":---" for i, c in enumerate(columns)) + "|"
    body = ["| " + " | ".join(esc(c.cell(r)) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def csv_text(rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> str:
    """Raw values (no formatting) under their keys, so spreadsheets and pandas get numbers."""
    keys = list(keys) if keys is not None else _all_keys(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in keys})
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else v


def _all_keys(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return keys


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values from dataclasses' dicts, numpy scalars/arrays, tensors, paths and tuples."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist") and hasattr(obj, "detach"):  # torch tensors, without importing torch here
        return obj.detach().cpu().tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(Path(path), text.encode("utf-8"))
    return Path(path)


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> Path:
    return write_text(path, csv_text(rows, keys))


# --- plots ---------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]],
    label_names: Sequence[str],
    path: Path,
    *,
    title: str = "Confusion matrix",
    normalize: bool = False,
) -> Path:
    """A confusion-matrix PNG (rows = true class) drawn by scikit-learn's `ConfusionMatrixDisplay`.

    With `normalize`, each row is divided by its support, so cells read as recall.
    """
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(confusion, dtype=float)
    if normalize:
        support = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, support, out=np.zeros_like(matrix), where=support > 0)
    size = max(4.5, 0.6 * len(label_names) + 2.5)
    fig = _figure(size + 0.8, size)
    ax = fig.add_subplot()
    display = ConfusionMatrixDisplay(matrix if normalize else matrix.astype(int), display_labels=list(label_names))
    display.plot(ax=ax, cmap="Blues", values_format=".2f" if normalize else "d", colorbar=True, xticks_rotation=45)
    ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_comparison_bars(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    metrics: Sequence[str] = ("accuracy", "macro_f1", "weighted_f1"),
    name_key: str = "model",
    title: str = "Model comparison",
) -> Path:
    """Grouped horizontal bars, one group per model, one bar per metric; ``<metric>_std`` as error bars."""
    names = [str(r[name_key]) for r in rows]
    fig = _figure(8.0, max(3.0, 0.45 * len(rows) * max(1, len(metrics)) ** 0.5 + 1.5))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(metrics))
    y = np.arange(len(rows))
    for i, metric in enumerate(metrics):
        values = [_num(r.get(metric)) for r in rows]
        errors = [_num(r.get(f"{metric}_std"), 0.0) for r in rows]
        bars = ax.barh(y + (i - (len(metrics) - 1) / 2) * height, values, height,
                       xerr=errors if any(e > 0 for e in errors) else None,
                       label=METRIC_TITLES.get(metric, metric), capsize=2)
        ax.bar_label(bars, labels=[f"{v:.3f}" if not math.isnan(v) else "" for v in values], padding=3, fontsize=7)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("score (test split)")
    ax.set_title(title)
    fig.legend(loc="outside lower center", ncols=len(metrics), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _num(v: Any, default: float = float("nan")) -> float:
    try:
        return float(v) if v is not None else default
    except (TypeError, ValueError):
        return default


# --- one evaluation ------------------------------------------------------------------------------------
def summary_rows(report: MetricReport) -> list[dict[str, Any]]:
    """One row per headline metric: value and its bootstrap interval."""
    rows = []
    for key in (*HEADLINE_METRICS, "macro_precision", "macro_recall"):
        if key not in report.metrics:
            continue
        lo, hi = report.intervals.get(key, (None, None))
        rows.append({"metric": METRIC_TITLES.get(key, key), "key": key, "value": report.metrics[key],
                     "ci_low": lo, "ci_high": hi})
    return rows


def per_class_rows(report: MetricReport) -> list[dict[str, Any]]:
    return [
        {"class": name, **{k: report.per_class[k][i] for k in ("precision", "recall", "f1", "support")}}
        for i, name in enumerate(report.label_names)
    ]


def summary_columns(report: MetricReport) -> list[Column]:
    level = f"{round(report.confidence * 100)}% CI"
    cols = [Column("metric", "metric", justify="left"), Column("value", "value", ".4f")]
    if report.intervals:
        cols += [Column("ci_low", f"{level} low", ".4f"), Column("ci_high", f"{level} high", ".4f")]
    return cols


PER_CLASS_COLUMNS = [
    Column("class", "class", justify="left"),
    Column("precision", "precision", ".3f"),
    Column("recall", "recall", ".3f"),
    Column("f1", "F1", ".3f"),
    Column("support", "support", "d"),
]


def confusion_markdown(report: MetricReport) -> str:
    cols = [Column("true", "true \\ predicted", justify="left")] + [
        Column(name, name, "d") for name in report.label_names
    ]
    rows = [{"true": name, **dict(zip(report.label_names, row))} for name, row in zip(report.label_names, report.confusion)]
    return markdown_table(rows, cols)


def evaluation_markdown(report: MetricReport, *, title: str = "Evaluation") -> str:
    parts = [f"# {title}\n", f"{report.num_samples} labelled clips.\n"]
    parts.append(markdown_table(summary_rows(report), summary_columns(report)))
    parts.append("\n## Per class\n")
    parts.append(markdown_table(per_class_rows(report), PER_CLASS_COLUMNS))
    parts.append("\n## Confusion matrix (rows: true class, columns: predicted)\n")
    parts.append(confusion_markdown(report))
    return "\n".join(parts)


def write_evaluation_report(
    report: MetricReport, out_dir: Path, *, title: str = "Evaluation", stem: str = ""
) -> dict[str, Path]:
    """Write ``metrics.json``, ``report.md``, ``per_class.csv``, ``confusion_matrix.csv`` and
    ``confusion_matrix.png`` (counts) into `out_dir`; `stem` prefixes every name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = (stem + "_") if stem else ""
    confusion_rows = [{"true": name, **dict(zip(report.label_names, row))}
                      for name, row in zip(report.label_names, report.confusion)]
    return {
        "json": write_json(out_dir / f"{p}metrics.json", report.to_dict()),
        "markdown": write_text(out_dir / f"{p}report.md", evaluation_markdown(report, title=title)),
        "per_class_csv": write_csv(out_dir / f"{p}per_class.csv", per_class_rows(report)),
        "confusion_csv": write_csv(out_dir / f"{p}confusion_matrix.csv", confusion_rows),
        "confusion_png": plot_confusion_matrix(report.confusion, report.label_names,
                                               out_dir / f"{p}confusion_matrix.png", title=title),
    }


__all__ = [
    "Column",
    "csv_text",
    "evaluation_markdown",
    "PER_CLASS_COLUMNS",
    "human_bytes",
    "human_count",
    "markdown_table",
    "per_class_rows",
    "plot_comparison_bars",
    "plot_confusion_matrix",
    "summary_columns",
    "summary_rows",
    "to_jsonable",
    "write_csv",
    "write_evaluation_report",
    "write_json",
    "write_text",
]
