"""Transcripts for clips that come without one: `emofuse predict` with no text, the manifest reader's
``empty_text = "transcribe"``, and the cache that transcribes each clip once (real RAVDESS clips, offline)."""
from __future__ import annotations

import stat
import threading
import time

import numpy as np
import pytest
import torch

import emofuse.plugins.transcription as transcription
from emofuse.core.apps.predict import load
from emofuse.core.config import validate
from emofuse.core.engine.compose import build_model
from emofuse.core.engine.model_io import save_model
from emofuse.core.registry import get_registry
from emofuse.core.types import Sample
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


# --- decoding that is safe to serve --------------------------------------------------------------------------
RATE = 16_000


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def test_silence_and_noise_give_no_text_and_cost_little():
    model = transcription.transcriber()
    started = time.perf_counter()
    quiet = model.transcribe(np.zeros(59 * RATE, np.float32))
    assert quiet.text is None and (quiet.windows, quiet.skipped) == (2, 2)
    assert time.perf_counter() - started < 0.5  # the energy gate: no encoder run at all
    # noise passes the energy gate; Whisper's own no-speech probability skips it (greedy decoding says "You")
    noise = model.transcribe(np.random.default_rng(0).standard_normal(5 * RATE).astype(np.float32) * 0.01)
    assert noise.text is None and noise.skipped == 1
    assert model(np.zeros(RATE, np.float32)) == ""


def test_a_loop_is_stopped_and_tokens_are_capped_by_length():
    model = transcription.transcriber()
    started = time.perf_counter()
    whisper_alone = transcription.Limits(use_voice_detector=False)  # (the voice detector skips a tone: below)
    looped = model.transcribe(tone(5.0), whisper_alone)  # greedy decoding ran to its 224-token cap before
    assert any("repeat itself" in w or "cap of" in w for w in looped.warnings), looped
    assert len(looped.text or "") < 60 and time.perf_counter() - started < 10
    capped = model.transcribe(tone(5.0), transcription.Limits(repeats=1000, tokens_per_second=0.4, base_tokens=1,
                                                                      use_voice_detector=False))
    assert "cap of 3 tokens" in capped.warnings[0]
    assert transcription.Limits().max_tokens(30 * RATE) == 224 and transcription.Limits().max_tokens(RATE) == 16
    assert transcription.loop_start([5, 1, 2, 1, 2, 1, 2, 1, 2], repeats=4, max_block=8) == 3
    assert transcription.loop_start([1, 2, 3, 4], repeats=4, max_block=8) is None


def test_the_voice_detector_skips_a_tone_and_keeps_speech(clips):
    """Silero VAD (the `serve` extra's `silero-vad`, offline): a 5 s tone holds no voice."""
    import os

    from emofuse.core.data.decode import decode_audio

    model = transcription.transcriber()
    if model.has_voice is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("silero-vad is not installed: scripts/setup.sh installs the serve extra")
        pytest.skip("silero-vad is not installed (pip install 'emofuse[serve]')")
    hum = model.transcribe(tone(5.0))
    assert hum.text is None and hum.skipped == 1 and hum.warnings == []
    assert model.transcribe(decode_audio(clips[1])).text == DOGS
    assert transcription.default_transcript_cache().name.endswith("-silero.json")


def test_the_time_budget_and_the_cancel_flag_stop_a_transcription(clips):
    from emofuse.core.data.decode import decode_audio

    model = transcription.transcriber()
    wav = decode_audio(clips[0])
    spent = model.transcribe(np.concatenate([wav] * 12), transcription.Limits(budget_s=0.0))
    assert spent.text is None and "time budget" in spent.warnings[0]
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(transcription.TranscriptionCancelled):
        model.transcribe(wav, cancel=cancel)
    assert model.transcribe(wav).text == KIDS


def test_the_transcript_cache_file_is_the_users_alone(tmp_path, clips, monkeypatch):
    cache = tmp_path / "fresh" / "transcripts.json"
    monkeypatch.setattr(transcription, "transcribe", lambda waveforms: ["some words" for _ in waveforms])
    transcription.TranscriptCache(cache).transcripts([clips[0]])
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600 and cache.read_text().count("some words") == 1
    assert stat.S_IMODE(cache.parent.stat().st_mode) & 0o077 == 0  # the folder it makes: the user's alone too


def test_a_silent_clip_gets_no_transcript_in_predict(tmp_path):
    import soundfile as sf

    clip = tmp_path / "quiet.flac"
    sf.write(clip, np.zeros(3 * RATE, np.float32), RATE)
    (filled,) = transcription.fill_missing_transcripts([Sample(id="q", audio_path=str(clip))], cache=tmp_path / "t.json")
    assert filled.text is None and filled.extra["transcribed"]


def test_the_user_cache_folder_is_the_users_alone(tmp_path, monkeypatch):
    """Every user cache (transcripts, face crops, models, the plugin listing) lives under one 0700 folder."""
    from emofuse.core.data.user_cache import user_cache_dir

    monkeypatch.delenv("EMOFUSE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir("face-crops") == tmp_path / "emofuse" / "face-crops"
    assert stat.S_IMODE((tmp_path / "emofuse").stat().st_mode) == 0o700
    (tmp_path / "emofuse").chmod(0o755)  # as an older emofuse left it
    user_cache_dir("transcripts")
    assert stat.S_IMODE((tmp_path / "emofuse").stat().st_mode) == 0o700
    monkeypatch.setenv("EMOFUSE_CACHE_DIR", str(tmp_path / "chosen"))
    assert user_cache_dir("models") == tmp_path / "chosen" / "models"
    assert stat.S_IMODE((tmp_path / "chosen").stat().st_mode) == 0o700
