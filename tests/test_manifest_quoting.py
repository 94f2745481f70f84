"""Manifests with stray quotes, delimiters and line breaks: every row is read exactly as written, or the
file is refused with a line number; never a silent change in the row count or the labels."""
from __future__ import annotations

import csv
import io
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from emofuse.core.config import DataConfig
from emofuse.core.data.tables import read_table
from emofuse.core.engine.compose import build_reader
from emofuse.core.errors import DataError

LABELS = ["neutral", "calm", "happy", "sad", "angry", "fearful"]


def read_manifest(folder: Path, name: str, **options):
    config = DataConfig(dataset="manifest", data_dir=folder, options={"path": name, "labels": LABELS, **options})
    return list(build_reader(config).samples())


@pytest.fixture
def clips(tmp_path, shared_data) -> list[str]:
    """Four real RAVDESS clips copied beside the manifests."""
    names = []
    for source in sorted((shared_data / "ravdess-speech" / "Actor_01").glob("*.ogg"))[:4]:
        shutil.copy(source, tmp_path / source.name)
        names.append(source.name)
    return names


def test_a_stray_quote_closed_rows_later_is_refused_with_its_lines(tmp_path, clips):
    """The outside check's manifest: 48 clips, ``"oops opened`` in one row's text and ``closed here"``
    15 rows later; read as CSV that is one row swallowing 15 (33 rows, clips mislabelled)."""
    lines = ["id,audio,label,text"]
    for i in range(48):
        text = {10: '"oops opened', 25: 'closed here"'}.get(i, f"row {i}")
        lines.append(f"c{i},{clips[i % 4]},{LABELS[i % 6]},{text}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"m\.csv:12: a quoted field runs from line 12 to line 27") as info:
        read_manifest(tmp_path, "m.csv")
    assert "\n" not in str(info.value)
    # Even where line breaks in fields are allowed, lines holding whole rows are not a transcript.
    with pytest.raises(DataError, match=r"m\.csv:12: .* holds 15 line\(s\) with a whole row's delimiters"):
        read_manifest(tmp_path, "m.csv", multiline_fields=True)


def test_line_breaks_in_a_transcript_are_read_only_when_asked_for(tmp_path, clips):
    text = "I said\nno, not today"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows([["id", "audio", "label", "text"], ["a", clips[0], "sad", text], ["b", clips[1], "calm", "fine"]])
    (tmp_path / "m.csv").write_text(buffer.getvalue())
    with pytest.raises(DataError, match=r"m\.csv:2: a quoted field runs from line 2 to line 3 .*multiline_fields"):
        read_manifest(tmp_path, "m.csv")
    samples = read_manifest(tmp_path, "m.csv", multiline_fields=True)
    assert [(s.id, s.label_name, s.text) for s in samples] == [("a", "sad", text), ("b", "calm", "fine")]


# --- the property: exact or refused with a line number --------------------------------------------------
TEXT = st.text(alphabet=st.sampled_from(list("ab ,;\t\"'\n\r|x")), max_size=12)
ROW = st.tuples(st.sampled_from(LABELS), TEXT, TEXT)
LINE_NUMBER = re.compile(r"m\.(csv|tsv):\d+: ")


def _write(rows: list[tuple[str, str, str, str]], delimiter: str, style: str) -> str:
    """The manifest text: through the csv module (any quoting), or joined by hand as a careless
    export script would (no quoting at all: text holding a delimiter or a quote breaks the row)."""
    header = ("id", "label", "speaker", "text")
    if style == "joined":
        return "".join(delimiter.join(r) + "\n" for r in [header, *rows])
    quoting = {"minimal": csv.QUOTE_MINIMAL, "all": csv.QUOTE_ALL, "nonnumeric": csv.QUOTE_NONNUMERIC}[style]
    buffer = io.StringIO()  # the csv module's own line ending: with "\n" alone it would not quote a bare "\r"
    csv.writer(buffer, delimiter=delimiter, quoting=quoting).writerows([header, *rows])
    return buffer.getvalue()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=1, max_size=8), delimiter=st.sampled_from([",", "\t"]),
       style=st.sampled_from(["minimal", "all", "nonnumeric", "joined"]), multiline=st.booleans())
def test_every_row_is_read_as_written_or_the_file_is_refused_with_a_line(rows, delimiter, style, multiline):
    written = [(f"clip{i}", label, speaker, text) for i, (label, speaker, text) in enumerate(rows)]
    suffix = ".tsv" if delimiter == "\t" else ".csv"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / f"m{suffix}").write_text(_write(written, delimiter, style), newline="")
        try:
            table = read_table(folder / f"m{suffix}", multiline_fields=multiline)
        except DataError as exc:
            assert LINE_NUMBER.search(str(exc)), str(exc)
            return
        try:
            samples = read_manifest(folder, f"m{suffix}", empty_text="absent", multiline_fields=multiline)
        except DataError as exc:  # a row read, but not usable (say, an empty cell): named by its line too
            assert LINE_NUMBER.search(str(exc)), str(exc)
            return
    assert len(table.rows) == len(written)
    assert [(s.id, s.label_name) for s in samples] == [(w[0], w[1]) for w in written]
    if style != "joined":  # what the csv module wrote comes back field for field
        assert [tuple(row[c] for c in ("id", "label", "speaker", "text")) for _, row in table.rows] == written
