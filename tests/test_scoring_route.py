"""One route from a batch to encoder outputs (`emofuse.core.engine.encode`): training, scoring, evaluation,
cross-corpus scoring and prediction read frozen features from a store, so a backbone runs once per clip;
ablations read the same features with the modality marked absent (issue 35, part 1)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from emofuse.core.apps.compare import compare
from emofuse.core.apps.evaluation import evaluate_checkpoint, run_model, scoring_batches
from emofuse.core.config import validate
from emofuse.core.data.feature_store import MemoryFeatureStore, encoder_namespace
from emofuse.core.engine.model_io import load_model
from emofuse.core.types import AUDIO, TEXT
from emofuse.plugins.encoders.mm_lstm import MultimodalLSTMEncoder

TRAIN = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "patience": 2, "device": "cpu", "precision": "fp32"}


def speech_config(out_dir, data_dir):
    speech = {"name": "mm-lstm", "audio_backbone": "log-mel", "model_dim": 32, "lstm_hidden": 16, "metadata": False}
    return validate({
        "name": "route", "output_dir": str(out_dir),
        "data": {"dataset": "ravdess", "data_dir": str(data_dir), "split": "speaker", "limit": 96},
        "branches": {"faces": {"name": "features", "hidden_dims": [16], "features": ["au"]}, "speech": speech},
        "train": TRAIN, "fusion_train": {**TRAIN, "lr": 3e-2},
    })


class ExtractCounter:
    """Counts the clips each `MultimodalLSTMEncoder.extract` call is given, and the calls that carry audio."""

    def __init__(self, monkeypatch):
        self.clips: Counter[str] = Counter()
        original = MultimodalLSTMEncoder.extract

        def spy(encoder, batch):
            self.clips.update(batch.ids)
            return original(encoder, batch)

        monkeypatch.setattr(MultimodalLSTMEncoder, "extract", spy)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, shared_data):
    """A comparison with ablations, its backbone calls counted."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        counter = ExtractCounter(monkeypatch)
        out = tmp_path_factory.mktemp("route")
        result = compare(speech_config(out / "runs", shared_data), fusions=["weighted-late"], seeds=[0],
                         robustness=True, bootstrap=0, cross_dataset="emodb", cross_data_dir=shared_data)
    return result, counter, out


def test_a_comparison_runs_each_clips_backbone_once_ablations_baselines_and_second_corpus_included(compared):
    result, counter, _ = compared
    assert {"audio", "text"} <= set(result.ablations)
    assert counter.clips and max(counter.clips.values()) == 1, counter.clips.most_common(3)
    # every clip once: training filled the cache; scoring, ablations and baselines read it
    assert len(counter.clips) == sum(result.split_sizes.values()) + result.cross["clips"]


def test_every_row_and_baseline_is_also_scored_on_a_second_corpus(compared):
    result, _, out = compared
    cross = result.cross
    assert cross["dataset"] == "emodb" and cross["corpus_only_clips"] == {"bored": 81}
    assert set(cross["shared_classes"]) == {"neutral", "happy", "sad", "angry", "fearful", "disgust"}
    rows = {r["key"]: r for r in result.rows}
    for key, row in rows.items():
        if key in ("branch:faces", "baseline:faces", "baseline:concatenated", "baseline:averaged"):
            assert "cross_accuracy" not in row  # EmoDB has no facial action units: not scored there
        else:
            assert 0 <= row["cross_accuracy"] <= 1 and 0 <= row["cross_uar"] <= 1, key
    # RAVDESS's majority class, mapped onto EmoDB's shared classes, scores what its share of the clips is
    majority = rows["baseline:majority"]["cross_accuracy"]
    assert majority < 0.35
    table = (result.out_dir / "comparison.md").read_text()
    assert "emodb WA %" in table and "bored (81 clips)" in table
    fused = next(r for r in result.per_seed if r["kind"] != "branch" and r["kind"] != "baseline")
    assert all(0 <= fused[f"accuracy_without_{m}"] <= 1 for m in result.ablations)


def test_an_ablation_from_cached_features_equals_scoring_without_the_modality_from_scratch(compared, shared_data):
    _, _, out = compared
    path = next(p for p in (out / "runs").rglob("model.safetensors") if "weighted-late" in str(p))
    loaded = load_model(path)
    samples = [s for s in _test_clips(loaded, path)]
    for drop in ([AUDIO], [TEXT]):
        fresh = run_model(loaded.model, scoring_batches(loaded, samples), drop=drop)  # extracted without it
        store = MemoryFeatureStore(max_entries=10_000)
        cached = run_model(loaded.model, scoring_batches(loaded, samples), drop=drop, store=store)
        torch.testing.assert_close(cached.logits, fresh.logits, rtol=1e-4, atol=1e-5)
        assert len(store) == len(samples)  # features stored once per clip, with the modality present


def _test_clips(loaded, path):
    from emofuse.core.apps.evaluation import split_samples

    return split_samples(loaded, "test", checkpoint=path)


def test_evaluate_reads_the_runs_feature_cache_and_decodes_no_audio(compared, monkeypatch):
    _, _, out = compared
    path = next(p for p in (out / "runs").rglob("model.safetensors") if "weighted-late" in str(p))
    counter = ExtractCounter(monkeypatch)
    decoded: list[bool] = []
    import emofuse.core.apps.evaluation as evaluation

    batches_of = evaluation.batches_of

    def watching(samples, modalities, *args, **kwargs):
        for batch in batches_of(samples, modalities, *args, **kwargs):
            decoded.append(batch.audio is not None)
            yield batch

    monkeypatch.setattr(evaluation, "batches_of", watching)
    result = evaluate_checkpoint(path, bootstrap=0, drop=[TEXT])
    assert result.report.metrics["accuracy"] >= 0 and not counter.clips
    assert decoded and not any(decoded)  # the speech branch's frozen features came from the run's cache


def test_prediction_keeps_features_in_memory_only_and_a_service_keeps_none(compared, shared_data):
    from emofuse.core.apps.predict import load
    from emofuse.core.apps.serve import SERVICE_FEATURE_MEMORY

    _, _, out = compared
    path = next(p for p in (out / "runs").rglob("model.safetensors") if "weighted-late" in str(p))
    predictor = load(path, device="cpu", feature_memory=4)
    clips = sorted((shared_data / "ravdess-speech").rglob("*.ogg"))[:6]
    before = {p for p in out.rglob("*") if p.is_file()}
    records = predictor.predict([str(c) for c in clips], text="Kids are talking by the door")
    assert len(records) == 6 and len(predictor.store) == 4  # bounded: the clips scored last
    speech = predictor.model.branches["speech"]
    namespace = encoder_namespace(speech)
    assert all(ns == namespace for ns, _ in predictor.store._entries)
    assert {p for p in out.rglob("*") if p.is_file()} == before  # nothing written
    again = predictor.predict([str(clips[-1])], text="Kids are talking by the door")
    assert predictor.store.stats.hits >= 1 and again[0]["probabilities"] == records[-1]["probabilities"]
    assert SERVICE_FEATURE_MEMORY == 0 and load(path, device="cpu", feature_memory=0).store is None
