"""The terminal's tables: the apps' rows and `Column` descriptions drawn with rich (the same
descriptions the apps' Markdown and CSV files use, so they always agree)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from rich.table import Table

from emofuse.core.apps.report import PER_CLASS_COLUMNS, Column, per_class_rows, summary_columns, summary_rows
from emofuse.core.engine.metrics import MetricReport


def rich_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], *, title: str | None = None) -> Table:
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col.title, justify="left" if i == 0 else col.justify, overflow="fold")
    for row in rows:
        table.add_row(*[col.cell(row) for col in columns])
    return table


def evaluation_tables(report: MetricReport, *, title: str = "Evaluation") -> tuple[Table, Table]:
    """(headline metrics with CIs, per-class metrics) as rich tables."""
    summary = rich_table(summary_rows(report), summary_columns(report), title=f"{title} ({report.num_samples} clips)")
    per_class = rich_table(per_class_rows(report), PER_CLASS_COLUMNS, title="Per class")
    return summary, per_class
