"""Reading tabular corpus files (CSV or JSON Lines, optionally gzipped) and per-clip feature tables.

Rows come with their line number so every error can name the exact row; a missing column is an
error about the whole file, whatever the bad-sample policy.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from emofuse.core.errors import DataError


def open_text(path: Path) -> io.TextIOBase:
    """A text handle on `path`, transparently gunzipping ``.gz`` files."""
    if not path.is_file():
        raise DataError(path, "no such file", hint="check the path in data.options")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def table_format(path: Path) -> str:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    raise DataError(path, "unknown table format", hint="use .csv, .tsv or .jsonl (optionally .gz)")


@dataclass
class Table:
    """A table's column names and its rows, each as ``(line number, {column: value})``."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, Any]]]
    #: The line naming the columns (CSV/TSV); None where columns come from the rows (JSON Lines).
    header_line: int | None = None

    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise DataError(
                self.path if self.header_line is None else self.where(self.header_line),
                f"missing column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)} "
                f"(has: {', '.join(self.columns[:12])}{', ...' if len(self.columns) > 12 else ''})",
                hint="rename the column in the file, or map it with data.options.columns",
            )

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"


def read_table(path: Path, *, multiline_fields: bool = False) -> Table:
    """Read a whole CSV/TSV/JSONL table; malformed lines raise `DataError` naming the line.

    One row per line: a quoted field that runs over a line break is refused (a stray quote closed by
    another rows later would otherwise swallow the rows between and mislabel the clips), unless
    `multiline_fields` says the file really holds fields with line breaks."""
    fmt = table_format(path)
    try:
        with open_text(path) as handle:
            if fmt == "jsonl":
                return _read_jsonl(path, handle)
            return _read_delimited(path, handle, "\t" if fmt == "tsv" else ",", multiline_fields)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, csv.Error, OSError) as exc:
        raise DataError(path, f"cannot be read as {fmt}: {exc}", hint="check the file is complete and UTF-8") from None


def _read_delimited(path: Path, handle: io.TextIOBase, delimiter: str, multiline_fields: bool = False) -> Table:
    """Strict CSV: a quote left open or stray, a row with a field count other than the header's, or (unless
    `multiline_fields`) a row spanning lines is an error naming the lines (lenient parsing let one open quote
    swallow every later row)."""
    reader = csv.reader(handle, delimiter=delimiter, strict=True)
    start = 1
    try:
        header = next(reader, None)
        columns = [c.strip() for c in (header or [])]
        if not columns:
            raise DataError(f"{path}:1", "table is empty (no header row)", hint="add a header row naming the columns")
        if reader.line_num != 1:
            _check_spanning_row(path, 1, reader.line_num, header or [], delimiter, len(columns), multiline_fields)
        rows = []
        start = reader.line_num + 1
        for fields in reader:
            if reader.line_num != start:
                _check_spanning_row(path, start, reader.line_num, fields, delimiter, len(columns), multiline_fields)
            if fields:  # blank lines are no rows
                if len(fields) != len(columns):
                    raise DataError(f"{path}:{start}", f"row has {len(fields)} fields, the header has {len(columns)}",
                                    hint="quote fields that contain commas or quotes, and close every quote")
                rows.append((start, dict(zip(columns, fields))))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{start}", f"malformed CSV row ({exc}); a quote left open runs into the rows after it",
                        hint="close the quote, or double a quote inside a quoted field (\"\")") from None
    return Table(path, columns, rows, header_line=1)


def _check_spanning_row(path: Path, start: int, end: int, fields: Sequence[str], delimiter: str, width: int,
                        allowed: bool) -> None:
    """A row over lines `start`..`end`: refused, unless `allowed`; even then a line inside a field that
    holds a whole row's delimiters is refused (a stray quote, not a transcript with line breaks)."""
    swallowed = [line for field in fields for line in field.splitlines()[1:] if line.count(delimiter) >= width - 1]
    if allowed and (width < 2 or not swallowed):
        return
    what = f"holds {len(swallowed)} line(s) with a whole row's delimiters" if swallowed else "would make one row"
    raise DataError(f"{path}:{start}", f"a quoted field runs from line {start} to line {end} and {what} "
                                       "(a quote left open swallows the rows after it)",
                    hint="close the quote on the line where it opens, or double a quote inside a quoted field (\"\")"
                         + ("" if allowed else "; set data.options.multiline_fields = true if fields really hold line breaks"))


def _read_jsonl(path: Path, handle: io.TextIOBase) -> Table:
    rows, columns, seen = [], [], set()
    for line_no, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}", f"not valid JSON: {exc.msg}", hint="one JSON object per line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_no}", "a JSON Lines row must be an object", hint="one JSON object per line")
        for key in obj:
            if key not in seen:
                seen.add(key)
                columns.append(key)
        rows.append((line_no, obj))
    return Table(path, columns, rows)


def is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value)
    )


def feature_columns(table: Table, feature_sets: Mapping[str, str]) -> dict[str, list[str]]:
    """Feature set name -> its columns, chosen by prefix (or one column holding a list, in JSONL)."""
    out: dict[str, list[str]] = {}
    for name, prefix in feature_sets.items():
        # A column named exactly `prefix` (a JSON list) wins; else every column starting with it.
        cols = [prefix] if prefix in table.columns else [c for c in table.columns if c.startswith(prefix)]
        if not cols:
            raise DataError(
                table.path,
                f"no column for feature set {name!r} (none named or starting with {prefix!r})",
                hint="fix data.options.feature_sets",
            )
        out[name] = cols
    return out


def row_features(
    table: Table, line: int, row: Mapping[str, Any], columns: Mapping[str, Sequence[str]]
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The feature vectors of one row, or (None, reason) when a value is missing or not a number."""
    out: dict[str, np.ndarray] = {}
    for name, cols in columns.items():
        if len(cols) == 1 and isinstance(row.get(cols[0]), list):
            values = row[cols[0]]
        else:
            values = [row.get(c) for c in cols]
        try:
            vec = np.asarray([float(v) if not is_blank(v) else math.nan for v in values], dtype=np.float32)
        except (TypeError, ValueError):
            return None, f"feature set {name!r} holds a value that is not a number"
        if not np.isfinite(vec).all():
            bad = [c for c, v in zip(cols, vec.tolist()) if not math.isfinite(v)] if len(cols) == len(vec) else []
            return None, f"feature set {name!r} has missing or non-finite values{' in ' + ', '.join(bad[:3]) if bad else ''}"
        out[name] = vec
    return out, None


def load_feature_table(
    path: Path,
    *,
    id_column: str,
    feature_sets: Mapping[str, str],
    key_pattern: str | None = None,
    on_bad_row: Callable[[str, str], None],
) -> dict[str, dict[str, np.ndarray]]:
    """Per-clip feature vectors by join key: the id column, or its first `key_pattern` group.

    Rows with missing or non-numeric values, ids that do not match `key_pattern`, or duplicate
    keys are passed to `on_bad_row(where, reason)`, which raises or records them.
    """
    table = read_table(path)
    table.require(id_column)
    columns = feature_columns(table, feature_sets)
    regex = re.compile(key_pattern) if key_pattern else None
    out: dict[str, dict[str, np.ndarray]] = {}
    dims: dict[str, int] = {}
    for line, row in table.rows:
        where = table.where(line)
        raw_id = str(row.get(id_column) or "").strip()
        if not raw_id:
            on_bad_row(where, f"empty {id_column!r}")
            continue
        key = raw_id
        if regex is not None:
            m = regex.search(raw_id)
            if not m:
                on_bad_row(where, f"id {raw_id!r} does not match key_pattern {key_pattern!r}")
                continue
            key = m.group(1) if m.groups() else m.group(0)
        feats, reason = row_features(table, line, row, columns)
        if feats is None:
            on_bad_row(where, reason or "bad features")
            continue
        for name, vec in feats.items():
            if dims.setdefault(name, vec.shape[0]) != vec.shape[0]:
                on_bad_row(where, f"feature set {name!r} has {vec.shape[0]} values, earlier rows {dims[name]}")
                feats = None
                break
        if feats is None:
            continue
        if key in out:
            on_bad_row(where, f"clip {key!r} appears twice in the table")
            continue
        out[key] = feats
    return out
