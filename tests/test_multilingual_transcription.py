"""Transcription with the packaged multilingual Whisper base: the language detected or given, special tokens read
from each model's own tokenizer, chosen by ``--transcriber``/``EMOFUSE_TRANSCRIBER`` and cached per model and
language (real RAVDESS and EmoDB clips, offline, checked against the ctranslate2 runtime)."""
from __future__ import annotations

import os

import jiwer
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emofuse.cli.app import app
from emofuse.core import ConfigError, decode_audio
from emofuse.core.config import validate
from emofuse.core.engine.compose import build_model
from emofuse.core.engine.model_io import save_model
from emofuse.core.types import Sample
from emofuse.plugins import transcription
from emofuse.plugins.encoders.whisper import PACKAGED_SHA256, WhisperLogMel, packaged_whisper_folder
from emofuse.plugins.transcription import LANGUAGE_VARIABLE, MODEL_VARIABLE, SpecialTokens, WhisperTranscriber

from conftest import needs_whisper_base

KIDS = "Kids are talking by the door."
LAPPEN = "Der Lappen liegt auf dem Eisschrank."  # EmoDB sentence a01
RATE = 16_000


@pytest.fixture(scope="module")
def kids_path(shared_data):
    return shared_data / "ravdess-speech" / "Actor_01" / "03-01-01-01-01-01-01.ogg"


@pytest.fixture(scope="module")
def lappen_path(shared_data):
    return shared_data / "emodb" / "wav" / "03a01Fa.ogg"


@pytest.fixture(scope="module")
def base():
    return WhisperTranscriber("whisper-base")


@pytest.fixture
def chosen(monkeypatch):
    """Set the model/language variables for one test (restored after it, also when the CLI overwrites them)."""
    for variable in (MODEL_VARIABLE, LANGUAGE_VARIABLE):
        monkeypatch.setenv(variable, "")  # empty: the default; and recorded, so that the test's value is undone

    def choose(model: str | None = None, language: str | None = None) -> None:
        for variable, value in ((MODEL_VARIABLE, model), (LANGUAGE_VARIABLE, language)):
            monkeypatch.setenv(variable, value or "")

    return choose


def word_error_rate(reference: str, hypothesis: str) -> float:
    normalise = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                               jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    return jiwer.wer(reference, hypothesis, reference_transform=normalise, hypothesis_transform=normalise)


def ctranslate2_transcript(model: WhisperTranscriber, wav: np.ndarray, language: str | None) -> tuple[str, str]:
    """(language, text) from the ctranslate2 runtime's own language detection and greedy decoding."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    runtime = ctranslate2.models.Whisper(str(packaged_whisper_folder("whisper-base")), device="cpu",
                                         compute_type="float32", intra_threads=1)
    mel = ctranslate2.StorageView.from_array(WhisperLogMel()(torch.from_numpy(wav), pad_to_chunk=True)[None].numpy())
    language = language or runtime.detect_language(mel)[0][0][0][2:-2]
    prompt = ["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]
    ids = runtime.generate(mel, [prompt], beam_size=1)[0].sequences_ids[0]
    return language, model.tokenizer.decode(ids, skip_special_tokens=True).strip()


# --- special tokens from each model's tokenizer ------------------------------------------------------------------
def test_tiny_en_reads_the_token_ids_it_always_used():
    from tokenizers import Tokenizer

    tokens = SpecialTokens.of(Tokenizer.from_file(str(packaged_whisper_folder() / "tokenizer.json")))
    assert (tokens.end_of_text, tokens.start_of_transcript, tokens.no_timestamps, tokens.no_speech) == (
        50256, 50257, 50362, 50361)  # tiny.en's ids, hard-coded before
    assert tokens.languages == {} and tokens.prompt(None) == [50257, 50362]


@needs_whisper_base
def test_whisper_base_reads_its_own_ids_and_languages(base):
    tokens = base.special
    assert (tokens.end_of_text, tokens.start_of_transcript, tokens.transcribe, tokens.no_timestamps,
            tokens.no_speech) == (50257, 50258, 50359, 50363, 50362)
    assert len(tokens.languages) == 99 and tokens.languages["en"] == 50259 and tokens.languages["de"] == 50261
    assert tokens.prompt("de") == [50258, 50261, 50359, 50363]


# --- multilingual decoding ----------------------------------------------------------------------------------------
@needs_whisper_base
def test_whisper_base_detects_english_and_german(base, kids_path, lappen_path):
    kids = base.transcribe(decode_audio(kids_path))
    assert (kids.text, kids.language) == (KIDS, "en")
    lappen_wav = decode_audio(lappen_path)
    lappen = base.transcribe(lappen_wav)
    assert lappen.language == "de"
    assert word_error_rate(LAPPEN, lappen.text) <= 0.4  # measured 1/6: "Lacken" for "Lappen"
    assert ctranslate2_transcript(base, lappen_wav, None) == ("de", lappen.text)  # the same as the runtime


@needs_whisper_base
def test_a_given_language_is_used_as_given(lappen_path):
    wav = decode_audio(lappen_path)
    english = WhisperTranscriber("whisper-base", "EN").transcribe(wav)
    assert english.language == "en" and word_error_rate(LAPPEN, english.text) > 0.8  # German heard as English
    assert ctranslate2_transcript(WhisperTranscriber("whisper-base", "en"), wav, "en") == ("en", english.text)
    with pytest.raises(ConfigError, match="'xx' is not one Whisper base knows"):
        WhisperTranscriber("whisper-base", "xx")
    with pytest.raises(ConfigError, match="Whisper tiny.en transcribes English only"):
        WhisperTranscriber("whisper", "de")


@needs_whisper_base
def test_whisper_base_keeps_the_safety_limits(base, kids_path):
    quiet = base.transcribe(np.zeros(59 * RATE, np.float32))
    assert (quiet.text, quiet.windows, quiet.skipped, quiet.language) == (None, 2, 2, None)
    noise = np.random.default_rng(0).standard_normal(5 * RATE).astype(np.float32) * 0.01
    unheard = base.transcribe(noise, transcription.Limits(use_voice_detector=False))  # its no-speech probability
    assert unheard.text is None and unheard.skipped == 1
    capped = base.transcribe(decode_audio(kids_path), transcription.Limits(base_tokens=0, tokens_per_second=1.0))
    assert capped.text == "Kids are talking by" and "cap of 4 tokens" in capped.warnings[0]  # a 3.3 s clip: 4 tokens


# --- choosing the transcriber ---------------------------------------------------------------------------------------
def test_the_default_stays_tiny_en_and_its_cache_file(chosen, tmp_path, monkeypatch):
    monkeypatch.setenv("EMOFUSE_CACHE_DIR", str(tmp_path))
    assert transcription.chosen_model() == ("whisper", "en")
    assert transcription.default_transcript_cache().name.startswith(f"whisper-tiny.en-{PACKAGED_SHA256[:12]}-gated1")
    chosen("whisper", "de")
    with pytest.raises(ConfigError, match="EMOFUSE_TRANSCRIBE_LANGUAGE=de: Whisper tiny.en transcribes English only"):
        transcription.chosen_model()
    chosen("whisper-large")
    with pytest.raises(ConfigError, match="'whisper-large' is not a packaged Whisper model"):
        transcription.chosen_model()


def test_the_cache_file_names_the_model_and_language(chosen, tmp_path, monkeypatch):
    monkeypatch.setenv("EMOFUSE_CACHE_DIR", str(tmp_path))
    tiny = transcription.default_transcript_cache()
    chosen("Whisper-Base")
    detected = transcription.default_transcript_cache()
    chosen("whisper-base", "de")
    german = transcription.default_transcript_cache()
    assert detected.name.startswith("whisper-base-d01c3014881c-detected-") and "-de-" in german.name
    assert len({tiny, detected, german}) == 3 and german.parent == tiny.parent == tmp_path / "transcripts"


@needs_whisper_base
def test_manifests_and_predict_follow_the_chosen_transcriber(chosen, tmp_path, lappen_path):
    chosen("whisper-base", "de")
    (filled,) = transcription.fill_missing_transcripts([Sample(id="a01", audio_path=str(lappen_path))],
                                                       cache=tmp_path / "t.json")
    assert filled.extra["transcribed"] and word_error_rate(LAPPEN, filled.text) <= 0.4
    assert transcription.transcriber().language == "de"
    from emofuse.core.apps.predict import load

    torch.manual_seed(0)
    config = validate({"name": "speech", "branches": {"audio_text": {"name": "mm-lstm", "model_dim": 32,
                                                                      "lstm_hidden": 32, "attention_heads": 4}}})
    path = tmp_path / "model.safetensors"
    save_model(path, build_model(config, 7), config, ["anger", "boredom", "disgust", "fear", "happy", "neutral", "sad"])
    (record,) = load(path, device="cpu").predict(lappen_path)
    assert record["transcribed"] and record["transcript"] == filled.text


def test_the_cli_options_set_the_transcriber_and_refuse_what_tiny_en_cannot_do(chosen, tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "none.safetensors"), "--language", "de"])
    assert result.exit_code == 2 and "Whisper tiny.en transcribes English only" in result.output
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "none.safetensors"), "--transcriber", "whisper-large"])
    assert result.exit_code == 2 and "'whisper-large' is not a packaged Whisper model" in result.output
    CliRunner().invoke(app, ["predict", str(tmp_path / "none.safetensors"), "--transcriber", "whisper-base",
                             "--language", "de"])
    assert (os.environ[MODEL_VARIABLE], os.environ[LANGUAGE_VARIABLE]) == ("whisper-base", "de")
