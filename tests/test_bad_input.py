"""Hostile and unlucky input on real RAVDESS clips: what skip mode leaves out is left out everywhere, and
error mode refuses samples that carry no input instead of training on them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from emofuse.core.config import validate
from emofuse.core.data.pipeline import load_data
from emofuse.core.engine.training import train_run

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
    root = small_ravdess(tmp_path)
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
    assert sum(map(len, bundle.splits.values())) == 30  # the reader sees a well-named file; decoding fails later
    result = train_run(config, data=bundle, progress=False)
    assert [where for where, _ in result.skipped] == [str(broken)]
    assert sum(map(len, bundle.splits.values())) == 29  # left out of every split, not only out of the cache
