"""Out-of-fold branch outputs for the fusion: no clip is scored by a branch copy that saw its speaker."""
from __future__ import annotations

import pytest
import torch

from emofuse.core.config import validate
from emofuse.core.engine.cross_fitting import out_of_fold_outputs, speaker_folds
from emofuse.core.errors import ConfigError
from emofuse.core.engine.branch_outputs import BranchOutputs
from emofuse.core.types import Sample


def _samples(speakers: int, per_speaker: int) -> list[Sample]:
    return [Sample(id=f"s{s}-{i}", label=(s + i) % 3, speaker=f"spk{s}") for s in range(speakers) for i in range(per_speaker)]


def test_speaker_folds_cover_every_clip_once_and_never_split_a_speaker():
    samples = _samples(7, 5)
    folds = speaker_folds(samples, 3)
    assert sorted(i for fold in folds for i in fold) == list(range(len(samples)))
    owner = {samples[i].speaker: k for k, fold in enumerate(folds) for i in fold}
    assert all(owner[samples[i].speaker] == k for k, fold in enumerate(folds) for i in fold)
    with pytest.raises(ConfigError, match="fusion_folds: 8 folds need at least 8 training speakers"):
        speaker_folds(samples, 8)


def test_each_training_clip_is_scored_by_copies_trained_without_its_speaker():
    from emofuse.core.data.pipeline import DataBundle, Normalizer

    train, val = _samples(6, 4), _samples(1, 3)
    bundle = DataBundle(label_names=["a", "b", "c"], splits={"train": train, "val": val, "test": []},
                        normalizer=Normalizer())
    config = validate({"branches": {"video": {"name": "features"}, "audio": {"name": "features"}},
                       "fusion": {"name": "weighted-late"}, "fusion_inputs": "out-of-fold", "fusion_folds": 3})
    fitted: dict[str, set[str]] = {}  # checkpoint name -> speakers it was trained on

    def train_copy(bcfg, data):
        assert data.splits["val"] == val and not data.splits["test"]
        fitted[bcfg.name] = {s.speaker for s in data.splits["train"]}
        return bcfg.name

    def outputs_of(checkpoints, data):
        clips = data.splits["train"]
        for ckpt in checkpoints.values():
            assert not fitted[ckpt] & {s.speaker for s in clips}, "a copy scored a speaker it was trained on"
        n = len(clips)
        return BranchOutputs(ids=[s.id for s in clips], labels=torch.tensor([s.label for s in clips]),
                             logits={b: torch.full((n, 3), float(len(fitted))) for b in checkpoints},
                             embedding={b: None for b in checkpoints},
                             present={b: torch.ones(n, dtype=torch.bool) for b in checkpoints})

    out = out_of_fold_outputs(config, bundle, train_branch_copy=train_copy, outputs_of=outputs_of)
    assert len(fitted) == 6 and all(name.endswith(("fold1of3", "fold2of3", "fold3of3")) for name in fitted)
    assert out.ids == [s.id for s in train]  # aligned with the training split, as the fusion expects
    assert out.labels.tolist() == [s.label for s in train]
    assert set(out.logits) == {"video", "audio"} and out.logits["video"].shape == (len(train), 3)


def test_a_fused_run_on_out_of_fold_outputs_trains_and_reuses_its_fold_branches(tmp_path, shared_data):
    from emofuse.core.engine.training import train_run

    features = {"name": "features", "hidden_dims": [32]}
    config = validate({
        "name": "oof", "output_dir": str(tmp_path),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "split": "speaker", "limit": 240},
        "branches": {"video": {**features, "features": ["au"]}, "audio": {**features, "features": ["mfcc"]}},
        "fusion": {"name": "enhanced-late"}, "fusion_inputs": "out-of-fold", "fusion_folds": 2,
        "train": {"epochs": 3, "batch_size": 32, "lr": 3e-3, "device": "cpu", "precision": "fp32"},
        "fusion_train": {"epochs": 4, "batch_size": 16, "lr": 1e-2, "device": "cpu", "precision": "fp32"},
    })
    result = train_run(config, progress=False)
    folds = sorted(p.name.rsplit("-", 1)[-1] for p in (tmp_path / "branches").iterdir() if "fold" in p.name)
    assert folds == ["fold1of2", "fold1of2", "fold2of2", "fold2of2"]
    assert all((p / "model.safetensors").is_file() for p in (tmp_path / "branches").iterdir())
    assert 0 < result.metrics["test"]["accuracy"] <= 1
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "branches").glob("*/model.safetensors")}
    other = train_run(config.model_copy(update={"name": "other", "fusion": validate(
        {"fusion": {"name": "weighted-late"}, "branches": {"x": {"name": "features"}}}).fusion}), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "branches").glob("*/model.safetensors")} == stamps
    assert other.checkpoint.is_file() and other.checkpoint != result.checkpoint  # a second fusion, same folds
    in_sample = train_run(config.model_copy(update={"fusion_inputs": "in-sample", "name": "in-sample"}),
                          progress=False)
    # the fusion saw other training inputs, so it learned something else from the same branches
    assert result.fusion_report != in_sample.fusion_report
    assert set(result.branch_results) == {"video", "audio"}
