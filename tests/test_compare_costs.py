"""compare's cost columns: each row's own training time, nothing it shares with other rows (issue 34)."""
from __future__ import annotations

import pytest

from emofuse.core.apps.compare import TrainRunTrainer, compare
from emofuse.core.config import validate
from emofuse.core.data.cache import FeatureCache
from emofuse.core.registry import get_registry


def tiny_config(out_dir, data_dir):
    features = {"name": "features", "hidden_dims": [32]}
    train = {"epochs": 3, "batch_size": 32, "lr": 3e-3, "patience": 3, "device": "cpu", "precision": "fp32"}
    return validate({
        "name": "costs", "output_dir": str(out_dir),
        "data": {"dataset": "ravdess", "data_dir": str(data_dir), "split": "speaker", "limit": 240},
        "branches": {"faces": {**features, "features": ["au"]}, "voice": {**features, "features": ["mfcc"]}},
        "train": train, "fusion_train": {**train, "lr": 3e-2},
    })


class FusionWatcher(TrainRunTrainer):
    """The real trainer, noting which fusion (if any) is training at each moment."""

    training: str | None = None

    def train(self, config, *, data, branch_checkpoints):
        FusionWatcher.training = config.fusion.name
        try:
            return super().train(config, data=data, branch_checkpoints=branch_checkpoints)
        finally:
            FusionWatcher.training = None


def test_each_row_shows_its_own_training_time(tmp_path, shared_data, monkeypatch):
    stored_outputs: list[str | None] = []
    put_many = FeatureCache.put_many

    def spy(self, namespace, keys, values):
        if namespace.startswith("outputs-"):  # the frozen branches' outputs, which every fusion reads
            stored_outputs.append(FusionWatcher.training)
        return put_many(self, namespace, keys, values)

    monkeypatch.setattr(FeatureCache, "put_many", spy)
    result = compare(tiny_config(tmp_path / "runs", shared_data), fusions=["weighted-late", "enhanced-late"],
                     seeds=[0], robustness=False, bootstrap=0, trainer=FusionWatcher(get_registry()))

    # The first fusion is not charged for the outputs all fusions share: they are stored before any trains.
    assert stored_outputs and set(stored_outputs) == {None}
    assert result.stage_seconds[0]["fusion_inputs"] > 0
    rows = {r["key"]: r for r in result.per_seed}
    baselines = {k: r["train_seconds"] for k, r in rows.items() if r["kind"] == "baseline"}
    assert len(set(baselines.values())) == len(baselines)  # each its own, not one shared number
    assert baselines["baseline:majority"] < 0.01
    assert baselines["baseline:averaged"] == pytest.approx(baselines["baseline:faces"] + baselines["baseline:voice"],
                                                           abs=2e-3)
    assert any("baseline_inputs" in stage for stage in result.stage_seconds)  # the pooling, counted apart
    table = (result.out_dir / "comparison.md").read_text()
    assert "| Test n |" in table and "without what rows share" in table
