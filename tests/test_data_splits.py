"""Splits: speaker independence, class balance, determinism, the split file and its reuse."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from emofuse.core.engine.compose import build_reader, default_data_dir
from emofuse.core.config import DataConfig
from emofuse.core.data.pipeline import load_data
from emofuse.core.data.splits import balanced_split, given_split, speaker_split
from emofuse.core.errors import ConfigError, DataError

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the shared corpora (../shared/data) are not beside this checkout")


@pytest.fixture(scope="module")
def ravdess():
    return list(build_reader(DataConfig(dataset="ravdess", options={"feature_table": None})).samples())


@pytest.fixture(scope="module")
def meld():
    return list(build_reader(DataConfig(dataset="meld")).samples())


def speakers(samples, ids):
    by_id = {s.id: s.speaker for s in samples}
    return {by_id[i] for i in ids}


def test_speaker_split_keeps_each_actor_in_one_split_and_classes_balanced(ravdess):
    split = speaker_split(ravdess, val_fraction=0.15, test_fraction=0.15, seed=0)
    spk = {k: speakers(ravdess, v) for k, v in split.items()}
    assert not (spk["train"] & spk["val"]) and not (spk["train"] & spk["test"]) and not (spk["val"] & spk["test"])
    assert sum(len(v) for v in split.values()) == 720 and len(set().union(*split.values())) == 720
    assert [len(spk[k]) for k in ("train", "val", "test")] == [8, 2, 2]  # 12 actors: closest to 70/15/15
    labels = {s.id: s.label for s in ravdess}
    for k in ("val", "test"):
        counts = Counter(labels[i] for i in split[k])
        assert counts[0] == 8 and all(counts[c] == 16 for c in range(1, 8))  # every class, in its share


def test_speaker_split_is_seeded_and_deterministic(ravdess):
    a = speaker_split(ravdess, val_fraction=0.15, test_fraction=0.15, seed=0)
    b = speaker_split(list(reversed(ravdess)), val_fraction=0.15, test_fraction=0.15, seed=0)
    c = speaker_split(ravdess, val_fraction=0.15, test_fraction=0.15, seed=1)
    assert a == b
    assert speakers(ravdess, a["test"]) != speakers(ravdess, c["test"])


def test_balanced_split_is_stratified_70_15_15(ravdess):
    split = balanced_split(ravdess, val_fraction=0.15, test_fraction=0.15, seed=0)
    labels = {s.id: s.label for s in ravdess}
    for k, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        counts = Counter(labels[i] for i in split[k])
        assert counts[1] == pytest.approx(96 * share, abs=1)
        assert counts[0] == pytest.approx(48 * share, abs=1)
    assert balanced_split(ravdess, val_fraction=0.15, test_fraction=0.15, seed=0) == split


def test_meld_given_partition_keeps_dev_and_carves_test_by_dialogue(meld):
    split = given_split(meld, val_fraction=0.15, test_fraction=0.15, seed=0)
    part = {s.id: s.extra["partition"] for s in meld}
    assert {part[i] for i in split["val"]} == {"dev"} and len(split["val"]) == 1109
    assert {part[i] for i in split["test"]} == {"train"}
    assert len(split["test"]) == pytest.approx(0.15 * len(meld), rel=0.05)
    dialogue = {s.id: s.dialogue_id for s in meld}
    assert not ({dialogue[i] for i in split["train"]} & {dialogue[i] for i in split["test"]})


def test_split_file_is_written_reused_and_checked(tmp_path):
    config = DataConfig(dataset="ravdess", options={"feature_table": None})
    first = load_data(config, {"audio"}, split_dir=tmp_path)
    path = tmp_path / "split.json"
    saved = json.loads(path.read_text())
    assert saved["method"] == "speaker" and saved["seed"] == 0
    assert saved["splits"]["test"] == [s.id for s in first.splits["test"]]
    # A later run with another seed reuses the file instead of re-splitting.
    again = load_data(config, {"audio"}, split_dir=tmp_path, split_seed=7)
    assert [s.id for s in again.splits["test"]] == saved["splits"]["test"]
    # An explicit split_file works the same way.
    explicit = load_data(config.model_copy(update={"split_file": path}), {"audio"})
    assert [s.id for s in explicit.splits["val"]] == saved["splits"]["val"]
    with pytest.raises(ConfigError, match="made with method 'speaker'"):
        load_data(config.model_copy(update={"split": "balanced"}), {"audio"}, split_dir=tmp_path)
    saved["splits"]["test"].append("99-99-99-99-99-99")
    path.write_text(json.dumps(saved))
    with pytest.raises(DataError, match=r"split.json: names 1 clip id\(s\) that are not in the data"):
        load_data(config, {"audio"}, split_dir=tmp_path)


def test_speaker_split_needs_three_speakers():
    with pytest.raises(DataError, match="at least 3 speakers"):
        load_data(DataConfig(dataset="crema-d"), {"audio"})


def test_limit_keeps_split_shares_and_every_class(tmp_path):
    bundle = load_data(DataConfig(dataset="ravdess", limit=80), {"audio"}, split_dir=tmp_path)
    sizes = {k: len(v) for k, v in bundle.splits.items()}
    assert sum(sizes.values()) == pytest.approx(80, abs=2) and sizes["train"] > sizes["val"] > 0
    assert (bundle.class_counts("train") > 0).all()
