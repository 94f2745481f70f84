"""``data.speaker_normalization = "per-speaker"`` (transductive): every input standardised by its speaker's
statistics over all that speaker's clips, for feature tables, cached backbone features and the baselines; a
distinct run identity; no prediction of lone clips."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from emofuse.core.config import DataConfig, validate
from emofuse.core.data.keys import sample_key
from emofuse.core.data.preprocess import PreprocessSpec
from emofuse.core.data.speaker_norm import SpeakerNormalizedFeatures, standardize_by_speaker
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import collate_extracted
from emofuse.core.types import AUDIO, FEATURES, Batch, Sample

# --- the wrapper over cached features, against numpy ---------------------------------------------------------


class _Encoder:
    """What the store reads of an encoder: a name, its modalities, a fingerprint, cacheable."""

    name = "fake-backbone"
    modalities = (AUDIO,)
    cacheable = True

    def fingerprint(self) -> str:
        return "fake-state"


class _DictStore:
    """A feature store over fixed per-clip entries (stored unpadded, as `FeatureCache` stores them)."""

    def __init__(self, entries: dict[str, dict[str, torch.Tensor]]):
        self.entries = entries
        self.reads = 0

    def get_many(self, namespace: str, keys: list[str]) -> list[dict[str, torch.Tensor] | None]:
        self.reads += 1
        return [self.entries.get(k) for k in keys]

    def extract(self, encoder, batch: Batch) -> dict[str, torch.Tensor]:
        return collate_extracted([self.entries[k] for k in batch.extra["keys"]])


def _small_corpus():
    rng = np.random.default_rng(0)
    samples = [Sample(id=f"c{i}", label=0, speaker="A" if i < 4 else "B", audio_path=f"/nowhere/c{i}.wav")
               for i in range(7)]
    splits = {"train": samples[:2] + samples[4:6], "val": [], "test": samples[2:4] + samples[6:]}
    bundle = SimpleNamespace(splits=splits, spec=PreprocessSpec(), normalizer=None)
    key = {s.id: sample_key(s, _Encoder.modalities, spec=bundle.spec, normalizer=None) for s in samples}
    entries = {}
    for i, s in enumerate(samples):
        frames = 2 + i % 4
        offset, scale = (0.0, 1.0) if s.speaker == "A" else (10.0, 5.0)  # speakers far apart
        entries[key[s.id]] = {
            "frames": torch.from_numpy(rng.normal(offset, scale, (frames, 3))).float(),
            "clip": torch.from_numpy(rng.normal(offset, scale, 3)).float(),
            "count": torch.tensor(float(frames)),
            "token_ids": torch.arange(frames),
        }
    return samples, bundle, key, entries


def test_cached_features_are_standardised_by_speaker_over_every_frame_padding_excluded():
    samples, bundle, key, entries = _small_corpus()
    store = _DictStore(entries)
    wrapped = SpeakerNormalizedFeatures(store, bundle)
    rows = [samples[0], samples[5], samples[2]]  # A (train), B (train), A (test)
    batch = Batch(ids=[s.id for s in rows], labels=torch.zeros(3, dtype=torch.long), present={},
                  speakers=[s.speaker for s in rows], extra={"keys": [key[s.id] for s in rows]})
    out = wrapped.extract(_Encoder(), batch)

    def by_speaker(name: str, speaker: str) -> np.ndarray:
        parts = [entries[key[s.id]][name].numpy().reshape(-1, 3) for s in samples if s.speaker == speaker]
        return np.concatenate(parts)

    for i, s in enumerate(rows):
        mine = entries[key[s.id]]
        frames = by_speaker("frames", s.speaker)
        expected = (mine["frames"].numpy() - frames.mean(0)) / frames.std(0)
        n = len(expected)
        np.testing.assert_allclose(out["frames"][i, :n].numpy(), expected, rtol=1e-5, atol=1e-5)
        assert torch.all(out["frames"][i, n:] == 0)  # padding stays padding
        clips = by_speaker("clip", s.speaker)
        np.testing.assert_allclose(out["clip"][i].numpy(), (mine["clip"].numpy() - clips.mean(0)) / clips.std(0),
                                   rtol=1e-5, atol=1e-5)
    raw = store.extract(_Encoder(), batch)
    for untouched in ("frames_lengths", "count", "token_ids"):  # lengths, scalars and integers pass as they are
        assert torch.equal(out[untouched], raw[untouched])
    reads = store.reads
    wrapped.extract(_Encoder(), batch)
    assert store.reads == reads  # statistics are computed once per (encoder, speaker)
    over_clips = SpeakerNormalizedFeatures.over(store, samples, spec=bundle.spec, normalizer=None)  # no bundle
    assert torch.equal(over_clips.extract(_Encoder(), batch)["frames"], out["frames"])


def test_a_speaker_with_uncached_clips_is_an_error_not_partial_statistics():
    _, bundle, key, entries = _small_corpus()
    del entries[key["c3"]]
    batch = Batch(ids=["c0"], labels=torch.zeros(1, dtype=torch.long), present={}, speakers=["A"],
                  extra={"keys": [key["c0"]]})
    with pytest.raises(RuntimeError, match=r"speaker 'A'.*c3"):
        SpeakerNormalizedFeatures(_DictStore(entries), bundle).extract(_Encoder(), batch)


# --- feature tables of real RAVDESS clips ------------------------------------------------------------------------
DATA = {"dataset": "ravdess", "limit": 240}


@pytest.fixture(scope="module")
def bundles(shared_data):
    from emofuse.core.data.pipeline import load_data

    return {mode: load_data(DataConfig(**DATA, data_dir=shared_data, speaker_normalization=mode), {FEATURES})
            for mode in ("none", "per-speaker")}


def _au_by_speaker(bundle) -> dict[str, np.ndarray]:
    groups: dict[str, list[np.ndarray]] = {}
    for part in bundle.splits.values():
        for s in part:
            if "au" in s.features:
                groups.setdefault(s.speaker, []).append(np.asarray(s.features["au"], dtype=np.float64))
    return {k: np.stack(v) for k, v in groups.items()}


def test_action_units_are_standardised_per_speaker_over_all_splits(bundles):
    scaled, raw = _au_by_speaker(bundles["per-speaker"]), _au_by_speaker(bundles["none"])
    assert len(scaled) >= 10 and scaled.keys() == raw.keys()
    assert {s.speaker for s in bundles["per-speaker"].splits["test"]}  # test speakers are standardised too
    for speaker, rows in scaled.items():
        np.testing.assert_allclose(rows.mean(0), 0, atol=1e-5)
        std = rows.std(0)
        assert np.all((np.abs(std - 1) < 1e-4) | (std < 1e-6)), speaker  # a column flat for a speaker stays 0
    assert max(np.abs(rows.mean(0)).max() for rows in raw.values()) > 0.1  # the raw tables were not
    # the train-fitted normaliser after it is about the identity, so batches carry the per-speaker values
    norm = bundles["per-speaker"].normalizer
    np.testing.assert_allclose(norm.feature_mean["au"].numpy(), 0, atol=1e-4)
    loader = bundles["per-speaker"].loader("test", batch_size=8, shuffle=False, seed=0, modalities={FEATURES})
    batch = next(iter(loader))
    first = bundles["per-speaker"].splits["test"][0]
    np.testing.assert_allclose(batch.features["au"][0].numpy(), first.features["au"], atol=0.05)


# --- baselines ------------------------------------------------------------------------------------------------------
class _TableEncoder:
    """A branch that reads the AU table and nothing cached, as `features` does."""

    name = "features"
    modalities = (FEATURES,)
    cacheable = False
    config = SimpleNamespace(features=["au"])

    def baseline_views(self, extracted):
        return {}


def test_baselines_standardise_pooled_inputs_per_speaker(bundles):
    from emofuse.core.apps.baselines import baselines_over_branches, fit_baselines, pooled_views

    raw = bundles["none"]
    flagged = dataclasses.replace(raw, speaker_normalization="per-speaker")  # raw tables: the baseline itself scales
    plain = baselines_over_branches({"video": _TableEncoder()}, raw, None)
    per_speaker = baselines_over_branches({"video": _TableEncoder()}, flagged, None)
    pooled = pooled_views(_TableEncoder(), raw, None, ("train", "val", "test"))[""]
    speaker_of = {s.id: s.speaker for part in raw.splits.values() for s in part}
    by_hand = fit_baselines({"video": standardize_by_speaker(pooled, speaker_of)}, {"video": FEATURES}, raw.splits,
                            len(raw.label_names))
    key = "baseline:video"
    mine = next(f for f in per_speaker if f.key == key)
    assert np.allclose(mine.probabilities, next(f for f in by_hand if f.key == key).probabilities)
    assert not np.allclose(mine.probabilities, next(f for f in plain if f.key == key).probabilities)


# --- identity, prediction ------------------------------------------------------------------------------------------
def _config(tmp: Path, mode: str, name: str = "run", data_dir: Path | None = None):
    return validate({"name": name, "output_dir": str(tmp),
                     "data": {**DATA, "data_dir": str(data_dir), "speaker_normalization": mode},
                     "branches": {"video": {"name": "features", "features": ["au"], "hidden_dims": [16]}},
                     "train": {"epochs": 1, "batch_size": 32, "lr": 3e-3, "device": "cpu", "precision": "fp32"}})


def test_the_option_is_part_of_every_run_identity(tmp_path):
    from emofuse.core.engine.branch_stage import branch_run_config
    from emofuse.core.engine.run_files import branch_fingerprint, fusion_fingerprint

    plain, scaled = _config(tmp_path, "none"), _config(tmp_path, "per-speaker")
    assert branch_fingerprint(plain) != branch_fingerprint(scaled)
    assert branch_run_config(plain, "video").name != branch_run_config(scaled, "video").name  # no shared branch folder
    bundle = SimpleNamespace(splits={"train": [], "val": [], "test": []})
    fused = {"fusion": validate({"branches": {"a": {"name": "features"}}, "fusion": {"name": "weighted-late"}}).fusion}
    assert (fusion_fingerprint(plain.model_copy(update=fused), {}, bundle)
            != fusion_fingerprint(scaled.model_copy(update=fused), {}, bundle))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bundles, shared_data):
    from emofuse.core.engine.training import train_run

    out = tmp_path_factory.mktemp("speaker-norm-runs")
    plain = train_run(_config(out, "none", data_dir=shared_data), data=bundles["none"], progress=False)
    return out, plain


def test_a_run_with_and_without_the_option_do_not_reuse_each_other(trained, bundles, shared_data):
    from emofuse.core.engine.training import train_run

    out, plain = trained
    with pytest.raises(ConfigError, match=r"speaker_normalization.*--overwrite"):  # not taken for the finished run
        train_run(_config(out, "per-speaker", data_dir=shared_data), data=bundles["per-speaker"], progress=False)
    scaled = train_run(_config(out, "per-speaker", "scaled", data_dir=shared_data), data=bundles["per-speaker"],
                       progress=False)
    assert scaled.history != plain.history
    with pytest.raises(ConfigError, match="data was read with 'none'"):  # a bundle that does not match the config
        train_run(_config(out, "per-speaker", "mismatch", data_dir=shared_data), data=bundles["none"], progress=False)


def test_prediction_refuses_a_per_speaker_model_and_evaluation_scores_it(trained, bundles, shared_data):
    import emofuse
    from emofuse.core.engine.training import train_run

    out, _ = trained
    result = train_run(_config(out, "per-speaker", "scaled", data_dir=shared_data), data=bundles["per-speaker"],
                       progress=False)
    with pytest.raises(ConfigError, match=r"speaker_normalization = 'per-speaker'.*emofuse evaluate"):
        emofuse.load(result.checkpoint)

    from typer.testing import CliRunner

    from emofuse.cli.app import app

    cli = CliRunner().invoke(app, ["predict", str(result.checkpoint), str(shared_data)])
    assert cli.exit_code != 0 and "transductive" in cli.output and "Traceback" not in cli.output

    from emofuse.core.apps.predict import Predictor
    from emofuse.core.engine.model_io import load_model

    with pytest.raises(ConfigError, match="speaker_normalization"):  # nor built by hand, for a service
        Predictor(load_model(result.checkpoint), device="cpu")

    scored = emofuse.evaluate(result.checkpoint, bootstrap=0, out=out / "eval")  # the run's folder of clips
    assert scored.report.metrics["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"], abs=1e-6)


def test_a_fused_run_trains_its_cached_branch_on_per_speaker_features(tmp_path, shared_data, monkeypatch):
    """Stage 1 (mm-lstm over cached log-mel frames and MiniLM tokens) and stage 2 (the fusion over the frozen
    branches' outputs) both read the backbone features through the per-speaker store."""
    from emofuse.core.data.speaker_norm import SpeakerNormalizedFeatures
    from emofuse.core.engine.training import train_run

    speakers: set[str] = set()
    stores: set[int] = set()
    original = SpeakerNormalizedFeatures.statistics

    def spy(self, encoder, namespace, speaker, clip=""):
        if encoder.name == "mm-lstm":
            speakers.add(str(speaker))
            stores.add(id(self))
        return original(self, encoder, namespace, speaker, clip)

    monkeypatch.setattr(SpeakerNormalizedFeatures, "statistics", spy)
    small = {"name": "mm-lstm", "audio_backbone": "log-mel", "model_dim": 32, "lstm_hidden": 32, "attention_heads": 4}
    config = validate({
        "name": "fused", "output_dir": str(tmp_path),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "limit": 48,
                 "speaker_normalization": "per-speaker"},
        "branches": {"speech": small, "video": {"name": "features", "features": ["au"], "hidden_dims": [16]}},
        "fusion": {"name": "weighted-late"},
        "train": {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu", "precision": "fp32"},
    })
    from emofuse.core.data.pipeline import load_data

    result = train_run(config, progress=False, resume=False)
    clips = load_data(config.data, {FEATURES}).splits
    assert speakers == {c.speaker for part in clips.values() for c in part}  # the test speakers' clips too
    assert len(stores) == 2  # one store for the branch's training, one for the fusion's frozen outputs
    assert result.fusion_report and 0 <= result.metrics["test"]["accuracy"] <= 1

    # Scoring through the one route with `feature_store` gives training's numbers, from the run's cache or from a
    # new one that the route fills first (raw features in, standardised out); the plain store does not.
    from emofuse.core.apps.evaluation import checkpoint_bundle, evaluate_samples
    from emofuse.core.data.cache import FeatureCache
    from emofuse.core.engine.loaders import feature_store, open_cache
    from emofuse.core.engine.model_io import load_model

    loaded = load_model(result.checkpoint)
    bundle = checkpoint_bundle(loaded, checkpoint=result.checkpoint)

    def accuracy(store) -> float:
        scored = evaluate_samples(loaded, bundle.splits["test"], store=store, bootstrap=0, device="cpu")
        return scored.report.metrics["accuracy"]

    trained = result.metrics["test"]["accuracy"]
    assert accuracy(feature_store(loaded.config, bundle, existing=True)) == pytest.approx(trained, abs=1e-6)
    new_cache = SpeakerNormalizedFeatures(FeatureCache(tmp_path / "new"), bundle)
    assert accuracy(new_cache) == pytest.approx(trained, abs=1e-6)
    plain = evaluate_samples(loaded, bundle.splits["test"], store=open_cache(loaded.config), bootstrap=0, device="cpu")
    wrapped = evaluate_samples(loaded, bundle.splits["test"], store=feature_store(loaded.config, bundle), bootstrap=0,
                               device="cpu")
    assert not torch.allclose(plain.outputs.branch_logits["speech"], wrapped.outputs.branch_logits["speech"])


def test_cross_corpus_scoring_standardises_by_the_other_corpus_speakers(tmp_path, shared_data, monkeypatch):
    """A per-speaker RAVDESS model scored on EmoDB clips: the EmoDB speakers' own statistics (their tables and
    their stored backbone features), never RAVDESS's; the baselines beside it likewise."""
    import shutil

    from emofuse.core.apps.cross_corpus import evaluate_cross_corpus
    from emofuse.core.engine.training import train_run

    config = validate({
        "name": "speech", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "limit": 48,
                 "speaker_normalization": "per-speaker"},
        "branches": {"speech": {"name": "mm-lstm", "audio_backbone": "log-mel", "model_dim": 32, "lstm_hidden": 32,
                                "attention_heads": 4}},
        "train": {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu", "precision": "fp32"},
    })
    checkpoint = train_run(config, progress=False, resume=False).checkpoint
    emodb = tmp_path / "emodb"
    emodb.mkdir()
    for name in ("03a01Fa", "03a01Nc", "03a01Wa", "03a02Ta", "08a02Fe", "08a02Na", "08a02Wc", "08a02Ab"):
        shutil.copy(shared_data / "emodb" / "wav" / f"{name}.ogg", emodb / f"{name}.ogg")
    speakers: set[str] = set()
    original = SpeakerNormalizedFeatures.statistics

    def spy(self, encoder, namespace, speaker, clip=""):
        speakers.add(str(speaker))
        return original(self, encoder, namespace, speaker, clip)

    monkeypatch.setattr(SpeakerNormalizedFeatures, "statistics", spy)
    result = evaluate_cross_corpus(checkpoint, "emodb", data_dir=shared_data, options={"root": str(emodb)},
                                   bootstrap=0, baseline=True)
    assert speakers and speakers <= {"03", "08"}  # EmoDB's speakers, not one RAVDESS actor
    assert result.report.num_samples == 8 and {r["key"] for r in result.baselines} >= {"baseline:speech"}


def test_a_comparison_second_corpus_tables_are_standardised_by_its_own_speakers(shared_data):
    from emofuse.core.apps.cross_corpus import cross_target

    labels = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
    target = cross_target("ravdess", labels, [FEATURES], data_dir=shared_data, speaker_normalization="per-speaker")
    by_speaker: dict[str, list[np.ndarray]] = {}
    for s in target.clips:
        if "au" in s.features:
            by_speaker.setdefault(s.speaker, []).append(s.features["au"])
    assert len(by_speaker) > 10
    for rows in by_speaker.values():
        np.testing.assert_allclose(np.mean(rows, axis=0), 0, atol=1e-5)
