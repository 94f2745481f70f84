"""Unreadable clips are found before the split (issue 34, items 4 and 5): all of them named in one error,
or (skip mode) left out before the speakers are split, with every split's count checked and shown."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from emofuse.core.config import DataConfig
from emofuse.core.data.pipeline import load_data
from emofuse.core.errors import DataError

LABELS = ["neutral", "calm"]


def manifest(folder: Path, shared_data: Path, clips_per_speaker: dict[str, int], bad: dict[str, int]) -> Path:
    """A manifest of real RAVDESS clips (copied into `folder`), `bad[speaker]` of each speaker's clips
    replaced by zero-byte files."""
    sources = sorted((shared_data / "ravdess-speech" / "Actor_01").glob("03-01-0[12]-*.ogg"))
    rows = ["id,label,speaker,audio"]
    for s, (speaker, n) in enumerate(clips_per_speaker.items()):
        for i in range(n):
            source = sources[(s * 7 + i) % len(sources)]
            target = folder / f"{speaker}-{i}.ogg"
            if i < bad.get(speaker, 0):
                target.write_bytes(b"")
            else:
                shutil.copy(source, target)
            label = "neutral" if source.name.split("-")[2] == "01" else "calm"
            rows.append(f"{speaker}-{i},{label},{speaker},{target.name}")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    return folder / "m.csv"


def config(folder: Path, **kw) -> DataConfig:
    return DataConfig(dataset="manifest", data_dir=folder, options={"path": "m.csv", "labels": LABELS}, **kw)


def test_every_unreadable_clip_is_named_in_one_error(tmp_path, shared_data):
    manifest(tmp_path, shared_data, {f"s{i}": 5 for i in range(6)}, bad={"s1": 2, "s3": 3})
    with pytest.raises(DataError) as info:
        load_data(config(tmp_path), {"audio"}, split_dir=tmp_path / "run")
    message = str(info.value)
    assert message.startswith("manifest: 5 of 30 clips cannot be read: ") and "\n" not in message
    for name in ("s1-0", "s1-1", "s3-0", "s3-1", "s3-2"):
        assert message.count(f"{tmp_path / name}.ogg (file is empty)") == 1
    assert "--on-bad-sample skip" in message and not (tmp_path / "run" / "split.json").exists()


def test_skip_mode_leaves_unreadable_clips_out_before_the_speaker_split(tmp_path, shared_data):
    manifest(tmp_path, shared_data, {f"s{i}": 5 for i in range(8)}, bad={"s0": 4})
    bundle = load_data(config(tmp_path, on_bad_sample="skip"), {"audio"}, split_dir=tmp_path / "run")
    used = {s.id for split in bundle.splits.values() for s in split}
    assert len(used) == 36 and not {f"s0-{i}" for i in range(4)} & used
    assert sorted(Path(w).name for w, _ in bundle.skipped) == [f"s0-{i}.ogg" for i in range(4)]
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert saved["counts"] == {k: len(v) for k, v in bundle.splits.items()}  # the split file counts what is used
    # A later run that reuses the split file while a clip has gone bad leaves that clip out, listed.
    (tmp_path / "s5-4.ogg").write_bytes(b"")
    again = load_data(config(tmp_path, on_bad_sample="skip"), {"audio"}, split_dir=tmp_path / "run")
    assert sum(len(v) for v in again.splits.values()) == 35 and "s5-4.ogg" in again.skipped_report()


def test_a_split_left_with_too_few_clips_is_refused_with_the_counts(tmp_path, shared_data):
    manifest(tmp_path, shared_data, {f"s{i}": 5 for i in range(6)}, bad={f"s{i}": 4 for i in range(6)})
    with pytest.raises(DataError, match=r"fewer clips than the 2 classes \(train \d+, val \d+, test \d+, after 24 "
                                        r"clip\(s\) were left out as bad input\)"):
        load_data(config(tmp_path, on_bad_sample="skip"), {"audio"}, split_dir=tmp_path / "run")


def test_the_speaker_split_hint_is_a_fix_that_works(tmp_path, shared_data):
    manifest(tmp_path, shared_data, {"s0": 6, "s1": 6}, bad={})
    with pytest.raises(DataError, match="needs at least 3 speakers") as info:
        load_data(config(tmp_path), {"audio"}, split_dir=tmp_path / "a")
    assert "--set data.split=balanced" in str(info.value) and "--split balanced" not in str(info.value)
    bundle = load_data(config(tmp_path, split="balanced"), {"audio"}, split_dir=tmp_path / "b")
    assert sum(len(v) for v in bundle.splits.values()) == 12


def test_the_train_table_shows_n_and_the_skip_summary_no_markup(monkeypatch):
    from typer.testing import CliRunner

    from emofuse.cli.app import app
    from emofuse.core.engine import training
    from emofuse.core.engine.run_files import RunResult

    metrics = {split: {"accuracy": 0.5, "loss": 1.0, "n": n} for split, n in (("train", 38), ("val", 6), ("test", 4))}
    result = RunResult(Path("runs/x"), Path("runs/x/model.safetensors"), metrics, [],
                       skipped=[("a/[b].ogg", "file is empty"), ("c.ogg", "no such file")])
    monkeypatch.setattr(training, "train_run", lambda *a, **k: result)
    out = CliRunner().invoke(app, ["train", "--preset", "au-features", "--output", "/tmp/unused"])
    assert out.exit_code == 0, out.output
    assert "[yellow]" not in out.output and "[/]" not in out.output
    assert "2 sample(s) skipped as bad input" in out.output and "a/[b].ogg: file is empty" in out.output
    header = next(line for line in out.output.splitlines() if "accuracy" in line)
    assert header.split()[:5] == ["┃", "split", "┃", "n", "┃"]  # the count first, printed as a count
    rows = {line.split()[1]: line.split()[3] for line in out.output.splitlines() if line.startswith("│")}
    assert rows == {"train": "38", "val": "6", "test": "4"}
