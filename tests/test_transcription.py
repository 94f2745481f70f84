"""Transcripts for clips that come without one: `emofuse predict` with no text, the manifest reader's
``empty_text = "transcribe"``, and the cache that transcribes each clip once (real RAVDESS clips, offline)."""
from __future__ import annotations

import pytest
import torch

import emofuse.plugins.transcription as transcription
from emofuse.core.apps.predict import load
from emofuse.core.config import validate
from emofuse.core.engine.compose import build_model
from emofuse.core.engine.model_io import save_model
from emofuse.core.registry import get_registry
from emofuse.plugins.encoders.whisper import PACKAGED_SHA256

LABELS = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
KIDS = "Kids are talking by the door."
DOGS = "Dogs are sitting by the door."


@pytest.fixture(scope="module")
def clips(shared_data):
    folder = shared_data / "ravdess-speech" / "Actor_02"
    return folder / "03-01-01-01-01-01-02.ogg", folder / "03-01-01-01-02-01-02.ogg"  # statements 01 and 02


def no_more_transcribing(monkeypatch):
    def refuse(waveforms):
        raise AssertionError("transcribed a clip that the cache already holds")

    monkeypatch.setattr(transcription, "transcribe", refuse)


def test_manifest_rows_without_text_are_transcribed_once(tmp_path, clips, monkeypatch):
    kids, dogs = clips
    manifest = tmp_path / "clips.csv"
    manifest.write_text(f"id,audio,text\na,{kids},Given text\nb,{dogs},\n")
    cache = tmp_path / "transcripts.json"
    cls = get_registry().cls("dataset", "manifest")
    options = {"path": str(manifest), "labels": LABELS, "empty_text": "transcribe", "transcript_cache": str(cache)}
    reader = cls(cls.make_config(options, where="data.options"), data_dir=None)
    a, b = reader.samples()
    assert (a.text, "transcribed" in a.extra) == ("Given text", False)  # a given transcript is kept
    assert (b.text, b.extra["transcribed"]) == (DOGS, True)
    assert cache.is_file()
    no_more_transcribing(monkeypatch)
    assert [s.text for s in cls(cls.make_config(options, where="data.options"), data_dir=None).samples()] == [
        "Given text", DOGS]


def test_predict_transcribes_clips_given_without_text(tmp_path, clips, monkeypatch):
    torch.manual_seed(0)
    config = validate({"name": "speech", "branches": {"audio_text": {"name": "mm-lstm", "model_dim": 32,
                                                                      "lstm_hidden": 32, "attention_heads": 4}}})
    path = tmp_path / "model.safetensors"
    save_model(path, build_model(config, len(LABELS)), config, LABELS)
    kids, _ = clips
    (record,) = load(path, device="cpu").predict(kids)
    assert record["transcript"] == KIDS and record["transcribed"] and record["modalities"] == ["audio", "text"]
    (given,) = load(path, device="cpu").predict(kids, text="Another text")
    assert given["transcript"] == "Another text" and "transcribed" not in given  # the text used, as given
    (textless,) = load(path, device="cpu", transcribe=False).predict(kids)
    assert textless["modalities"] == ["audio"] and textless["transcript"] is None
    no_more_transcribing(monkeypatch)  # the default cache (the user's cache folder) already has it
    (again,) = load(path, device="cpu").predict(kids)
    assert again["probabilities"] == record["probabilities"]


def test_transcripts_are_kept_where_every_user_cache_is(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOFUSE_CACHE_DIR", str(tmp_path))
    path = transcription.default_transcript_cache()
    assert path.parent == tmp_path / "transcripts" and PACKAGED_SHA256[:12] in path.name
