"""The baselines a comparison must beat: pooled frozen inputs, C chosen on validation only, paired
differences; and the speaker folds they are measured on."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from emofuse.core.apps import baselines as bl
from emofuse.core.data.splits import speaker_folds
from emofuse.core.errors import ConfigError
from emofuse.core.types import Sample


def test_pooling_keeps_vectors_and_summarises_sequences_by_mean_and_std():
    assert bl.pool(torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0]
    seq = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
    assert bl.pool(seq).tolist() == [2.0, 10.0, 1.0, 0.0]
    assert bl.pool(torch.tensor([[5.0, 6.0]])).tolist() == [5.0, 6.0, 0.0, 0.0]  # one frame: no spread


def _samples(n_per_class: int, split: str, classes: int = 3) -> list[Sample]:
    return [Sample(id=f"{split}-{c}-{i}", label=c, speaker=f"{split}-spk{i % 2}")
            for c in range(classes) for i in range(n_per_class)]


def test_regression_picks_C_on_validation_and_never_reads_test_labels():
    rng = np.random.default_rng(0)
    splits = {s: _samples(20, s) for s in ("train", "val", "test")}
    signal = {s.id: np.eye(3)[s.label] * 2 + rng.normal(size=3) for part in splits.values() for s in part}
    noise = {s.id: rng.normal(size=5) for part in splits.values() for s in part}
    fits = {f.key: f for f in bl.fit_baselines({"a": signal, "b": noise}, {"a": "features", "b": "audio"}, splits, 3)}
    assert set(fits) == {"baseline:a", "baseline:b", "baseline:concatenated", "baseline:averaged", "baseline:majority"}
    assert fits["baseline:a"].C in bl.C_GRID and fits["baseline:a"].val_accuracy > 0.6
    assert fits["baseline:concatenated"].inputs == 8 and fits["baseline:concatenated"].modalities == "audio+features"
    test_labels = np.array([s.label for s in splits["test"]])
    accuracy = {k: float((f.probabilities.argmax(1) == test_labels).mean()) for k, f in fits.items()}
    assert accuracy["baseline:a"] > 0.6 and accuracy["baseline:b"] < 0.6
    # the same fit with the test labels scrambled: identical predictions (nothing is chosen on test)
    scrambled = {**splits, "test": [Sample(id=s.id, label=(s.label + 1) % 3, speaker=s.speaker) for s in splits["test"]]}
    again = {f.key: f for f in bl.fit_baselines({"a": signal, "b": noise}, {"a": "features", "b": "audio"}, scrambled, 3)}
    assert all(np.allclose(again[k].probabilities, fits[k].probabilities) for k in fits)


def test_named_views_get_a_regression_each_and_the_branch_regressions_are_averaged():
    rng = np.random.default_rng(2)
    splits = {s: _samples(20, s) for s in ("train", "val", "test")}
    every = {s.id: np.concatenate([np.eye(3)[s.label] * 2, rng.normal(size=4)]) for part in splits.values() for s in part}
    last = {i: v[3:] for i, v in every.items()}  # the view keeps only the noise
    other = {s.id: rng.normal(size=2) for part in splits.values() for s in part}
    fits = {f.key: f for f in bl.fit_baselines({"a": every, "b": other}, {"a": "audio", "b": "features"}, splits, 3,
                                               views={"a": {"last layer": last, "partial": {"x": np.ones(2)}}})}
    assert "baseline:a:partial" not in fits  # a view some clips lack is left out
    view = fits["baseline:a:last layer"]
    assert view.title == "baseline: a last layer, logistic regression" and view.inputs == 4 and view.modalities == "audio"
    test_labels = np.array([s.label for s in splits["test"]])
    acc = {k: float((f.probabilities.argmax(1) == test_labels).mean()) for k, f in fits.items()}
    assert acc["baseline:a"] > 0.9 and acc["baseline:a:last layer"] < 0.6
    averaged = fits["baseline:averaged"]
    assert np.allclose(averaged.probabilities, (fits["baseline:a"].probabilities + fits["baseline:b"].probabilities) / 2)
    assert averaged.component == "averaged-regressions" and averaged.inputs == 9
    assert fits["baseline:majority"].component == "majority"


def test_mm_lstm_offers_the_last_layer_of_a_layered_backbone_as_a_view():
    from emofuse.core.config import ComponentRef
    from emofuse.core.engine.compose import build_encoder

    encoder = build_encoder(ComponentRef(name="mm-lstm", audio_backbone="log-mel"), 4, where="x")
    assert encoder.baseline_views({"audio_frames": torch.randn(7, encoder.audio_backbone.dim)}) == {}  # one layer
    encoder.audio_backbone.num_layers, encoder.audio_backbone.dim = 3, 10  # as a layered backbone
    frames = torch.randn(7, 30)
    (name, chosen), = encoder.baseline_views({"audio_frames": frames, "text_tokens": torch.ones(2, 5)}).items()
    assert name == "audio last layer" and list(chosen) == ["audio_frames"]
    assert torch.equal(chosen["audio_frames"], frames[:, 20:])


def test_majority_class_answers_the_most_frequent_fitting_class():
    p = bl.majority_class(np.array([2, 2, 1, 0, 2]), 4, 3)
    assert p.shape == (4, 3) and p.argmax(1).tolist() == [2, 2, 2, 2]


def test_paired_difference_is_tighter_than_the_accuracies_apart():
    rng = np.random.default_rng(1)
    hard = rng.random(300) < 0.5  # clips the baseline gets wrong
    base = (~hard).astype(float)
    model = np.maximum(base, (hard & (rng.random(300) < 0.2)).astype(float))  # the baseline's hits and some more
    diff, lo, hi = bl.paired_difference(model, base, resamples=500, seed=0)
    assert diff == pytest.approx(model.mean() - base.mean()) and 0 < lo <= diff <= hi
    a_lo, a_hi = bl.accuracy_interval(model, resamples=500, seed=0)
    assert hi - lo < a_hi - a_lo
    with pytest.raises(ValueError):
        bl.paired_difference(np.ones(3), np.ones(4))


def test_pooled_inputs_of_a_feature_branch_are_its_feature_vectors(shared_data, tmp_path):
    from emofuse.core.config import validate
    from emofuse.core.data.cache import FeatureCache
    from emofuse.core.data.pipeline import load_data
    from emofuse.core.engine.compose import build_model

    config = validate({"data": {"dataset": "ravdess", "data_dir": str(shared_data), "limit": 48},
                       "branches": {"faces": {"name": "features", "features": ["au"]}}})
    bundle = load_data(config.data, ["features"], split_dir=None)
    encoder = build_model(config, len(bundle.label_names)).branches["faces"]
    views = bl.pooled_views(encoder, bundle, FeatureCache(tmp_path / "cache"), ["train", "test"])
    assert list(views) == [bl.ALL_INPUTS]  # a feature branch names no narrower view
    pooled = views[bl.ALL_INPUTS]
    clips = bundle.splits["train"] + bundle.splits["test"]
    assert set(pooled) == {s.id for s in clips}
    widths = {v.shape for v in pooled.values()}
    assert widths == {(35,)}  # the 35 action units, nothing else


def _corpus(speakers: int, per: int) -> list[Sample]:
    return [Sample(id=f"a{s:02d}-{i}", label=i % 4, speaker=f"Actor_{s:02d}") for s in range(1, speakers + 1)
            for i in range(per)]


def test_speaker_folds_test_every_speaker_once_and_keep_parts_apart():
    samples = _corpus(12, 5)
    by_id = {s.id: s for s in samples}
    folds = speaker_folds(samples, 4)
    tested = Counter()
    for split in folds:
        who = {part: {by_id[i].speaker for i in ids} for part, ids in split.items()}
        assert (len(who["test"]), len(who["val"]), len(who["train"])) == (3, 2, 7)
        assert not who["test"] & who["val"] and not who["train"] & (who["test"] | who["val"])
        assert sum(len(v) for v in split.values()) == len(samples)
        tested.update(who["test"])
    assert set(tested.values()) == {1} and len(tested) == 12
    with pytest.raises(ConfigError, match="--folds 1"):
        speaker_folds(samples, 1)
    assert len(speaker_folds(samples, 12)) == 12  # one test speaker, two validating, nine training
    with pytest.raises(ConfigError, match="--folds 13"):
        speaker_folds(samples, 13)
