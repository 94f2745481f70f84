"""Hostile and unlucky input on real RAVDESS clips: what skip mode leaves out is left out everywhere, and
error mode refuses samples that carry no input instead of training on them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from emofuse.core.config import validate
from emofuse.core.data.pipeline import load_data
from emofuse.core.engine.training import train_run
from emofuse.core.errors import DataError

from conftest import SHARED_DATA

SPEECH = SHARED_DATA / "ravdess-speech"
pytestmark = pytest.mark.skipif(not SPEECH.is_dir(), reason="the shared corpora (../shared/data) are absent")


def small_ravdess(tmp: Path, actors: int = 5, per_actor: int = 6) -> Path:
    """A RAVDESS speech folder of real clips: `per_actor` clips of each of the first `actors` actors."""
    root = tmp / "ravdess-speech"
    for a in range(1, actors + 1):
        folder = root / f"Actor_{a:02d}"
        folder.mkdir(parents=True)
        for clip in sorted((SPEECH / f"Actor_{a:02d}").glob("*.ogg"))[::60 // per_actor][:per_actor]:
            shutil.copy(clip, folder / clip.name)
    return root


def test_skip_mode_leaves_an_undecodable_clip_out_of_a_cached_branch_run(tmp_path):
    root = small_ravdess(tmp_path, per_actor=12)  # validation and test hold at least one clip per class
    broken = sorted((root / "Actor_03").glob("*.ogg"))[0]
    broken.write_bytes(b"not an ogg file at all" * 10)
    config = validate({
        "name": "mm", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "ravdess", "options": {"root": str(root)},
                 "on_bad_sample": "skip"},
        "branches": {"audio_text": {"name": "mm-lstm", "model_dim": 16, "lstm_hidden": 8, "attention_heads": 2}},
        "train": {"epochs": 1, "batch_size": 8, "seed": 0},
    })
    bundle = load_data(config.data, {"audio", "text", "metadata"})
    assert sum(map(len, bundle.splits.values())) == 59  # its header is read before the split: left out of every split
    result = train_run(config, data=bundle, progress=False)
    assert [where for where, _ in result.skipped] == [str(broken)]
    assert sum(map(len, bundle.splits.values())) == 59


def _with_empty_clips(tmp: Path) -> tuple[Path, list[str]]:
    """Real clips of 5 actors plus zero-byte files with valid RAVDESS names (actors 13-14: no feature row)."""
    root = small_ravdess(tmp)
    names = []
    for actor in (13, 14):
        folder = root / f"Actor_{actor:02d}"
        folder.mkdir()
        for emotion in range(1, 9):
            name = f"03-01-{emotion:02d}-01-01-01-{actor:02d}.ogg"
            (folder / name).write_bytes(b"")
            names.append(name)
    return root, names


def _features_config(tmp: Path, root: Path, on_bad_sample: str):
    return validate({
        "name": f"au-{on_bad_sample}", "output_dir": str(tmp / "runs"),
        "data": {"dataset": "ravdess", "options": {"root": str(root)}, "on_bad_sample": on_bad_sample},
        "branches": {"video": {"name": "features", "features": ["au"], "hidden_dims": [8]}},
        "train": {"epochs": 1, "batch_size": 16},
    })


def test_clips_without_the_input_a_run_reads_are_refused_or_skipped_and_listed(tmp_path):
    root, empty = _with_empty_clips(tmp_path)
    with pytest.raises(DataError, match=r"16 clip\(s\) have no features.*Actor_1[34]"):
        train_run(_features_config(tmp_path, root, "error"), progress=False)
    config = _features_config(tmp_path, root, "skip")
    bundle = load_data(config.data, {"features", "metadata"})
    result = train_run(config, data=bundle, progress=False)
    assert sorted(Path(where).name for where, _ in result.skipped) == sorted(empty)
    assert all("no features" in reason for _, reason in result.skipped)
    assert sum(map(len, bundle.splits.values())) == 30


def test_train_lists_the_rows_a_reader_skipped(tmp_path):
    from typer.testing import CliRunner

    from emofuse.cli.app import app

    clips = sorted((SPEECH / "Actor_01").glob("*.ogg"))[:4] + sorted((SPEECH / "Actor_02").glob("*.ogg"))[:4] \
        + sorted((SPEECH / "Actor_03").glob("*.ogg"))[:4] + sorted((SPEECH / "Actor_04").glob("*.ogg"))[:4]
    rows = ["id,label,speaker,text,audio"] + [f"c{i},{'happy' if i % 2 else 'sad'},s{i // 4},hello,{c}"
                                              for i, c in enumerate(clips)]
    rows.append(f"bad,joyful,s0,hello,{clips[0]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "run.toml"
    config.write_text(f'[data]\ndataset = "manifest"\nsplit = "balanced"\n[data.options]\npath = "{tmp_path / "m.csv"}"\n'
                      'labels = ["happy", "sad"]\n[branches.text]\nname = "text-classifier"\n'
                      'model_dim = 16\nlstm_hidden = 8\nattention_heads = 2\n')
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--output", str(tmp_path / "runs"), "--epochs", "1",
                                      "--on-bad-sample", "skip"])
    assert result.exit_code == 0, result.output
    assert "1 sample(s) skipped as bad input" in result.output and "m.csv:18" in result.output
    assert "'joyful' is not in the label set" in result.output


def test_symlinked_actor_folders_are_read(tmp_path):
    from emofuse.core.engine.compose import build_reader
    from emofuse.core.config import DataConfig

    root = tmp_path / "linked"
    root.mkdir()
    for actor in ("Actor_01", "Actor_02"):
        (root / actor).symlink_to(SPEECH / actor, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle is walked once, not forever
    reader = build_reader(DataConfig(dataset="ravdess", options={"root": str(root), "feature_table": None}))
    assert len(list(reader.samples())) == 120


def test_evaluate_has_the_skip_option_its_hint_names(tmp_path):
    from emofuse.core.apps.evaluation import evaluate_checkpoint

    root = small_ravdess(tmp_path)
    config = validate({
        "name": "mm", "output_dir": str(tmp_path / "runs"), "data": {"dataset": "ravdess", "options": {"root": str(root)}},
        "branches": {"audio_text": {"name": "mm-lstm", "model_dim": 16, "lstm_hidden": 8, "attention_heads": 2}},
        "train": {"epochs": 1, "batch_size": 8},
    })
    bundle = load_data(config.data, {"audio", "text", "metadata"}, split_dir=tmp_path / "runs" / "mm")
    result = train_run(config, data=bundle, progress=False)
    broken = Path(bundle.splits["test"][0].audio_path)
    broken.write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match="--on-bad-sample skip") as info:
        evaluate_checkpoint(result.checkpoint, bootstrap=0)
    from typer.testing import CliRunner

    from emofuse.cli.app import app

    assert "--on-bad-sample" in CliRunner().invoke(app, ["evaluate", "--help"]).output
    refused = CliRunner().invoke(app, ["evaluate", str(result.checkpoint), "--on-bad-sample", "ignore"])
    assert refused.exit_code == 2 and "--on-bad-sample 'ignore': Input should be 'error' or 'skip'" in refused.output
    scored = evaluate_checkpoint(result.checkpoint, bootstrap=0, on_bad_sample="skip")
    assert len(scored.outputs.ids) == len(bundle.splits["test"]) - 1
    assert [where for where, _ in scored.skipped] == [str(broken)]
    assert str(broken) in str(info.value)
