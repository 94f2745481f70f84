"""Speech to text for clips that come without a transcript: greedy Whisper decoding, offline, safe to serve.

`transcribe` is the one entry point predict and the readers use (readers hold no model code); it runs
the packaged Whisper tiny.en (or, with ``EMOFUSE_TRANSCRIBER=whisper-base``, the multilingual Whisper base,
its language given by ``EMOFUSE_TRANSCRIBE_LANGUAGE`` or detected per clip) through this project's PyTorch
port (`emofuse.plugins.encoders.whisper`): the clip is cut into Whisper's 30 s windows (each padded to 30 s:
the decoder was trained on that), the encoder runs once per window, then tokens are chosen greedily until end
of text. It gives the same text
as the ctranslate2 runtime, which is about twice as fast on CPU (`benchmarks/bench_whisper.py`); the port
is used anyway so that no second runtime is a dependency.

Greedy Whisper invents text where there is no speech ("you", ". . .", "Aaaa..." over a tone) and can loop
until its token cap, so every window goes through the checks openai-whisper applies, in order of cost:
an energy gate (a window quieter than `Limits.silence_dbfs` is skipped before the encoder runs), the Silero
voice-activity detector when the `silero-vad` package is installed (its small model ships inside it, so it
runs offline; a window where it hears no voice is skipped: a tone or hum, which Whisper hears as "Aaaa"), Whisper's
own no-speech probability (the ``<|nocaptions|>`` token's probability right after start of transcript;
over `Limits.no_speech_threshold` the window is skipped before any token is decoded), a token cap by the
window's length, a stop at the first loop (a block of tokens repeated `Limits.repeats` times), and a
time budget and cancellation flag checked between tokens. A clip with no speech gets no text (None), never
filler: silence is not fed to a text model as a transcript.

`TranscriptCache` keeps each clip's text on disk by the clip's content hash, so a corpus is transcribed
once (the CLI and the readers); its file is the user's alone (0600). The prediction service uses no file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from emofuse.core import ConfigError, Sample, user_cache_dir
from emofuse.plugins.encoders.whisper import (
    CHUNK_SAMPLES,
    SAMPLE_RATE,
    WhisperLogMel,
    file_sha256,
    packaged_model,
    packaged_whisper,
)

#: The environment variables that choose the transcribing model (a packaged Whisper name) and its language.
MODEL_VARIABLE = "EMOFUSE_TRANSCRIBER"
LANGUAGE_VARIABLE = "EMOFUSE_TRANSCRIBE_LANGUAGE"
#: openai-whisper's default cap on generated tokens (half the decoder's 448 positions).
MAX_NEW_TOKENS = 224
#: Names the decoding rules in the cache file's name: text cached under other rules is not reused.
DECODING = "gated1"


def voice_detector() -> Callable[[torch.Tensor], bool] | None:
    """Silero VAD (the `silero-vad` package, MIT, its model shipped in the package) as ``wav -> any voice?``,
    or None when the package is not installed (Whisper's no-speech probability then decides alone)."""
    try:
        from silero_vad import get_speech_timestamps, load_silero_vad
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its loader's torch.jit.load and importlib notices
        warnings.simplefilter("ignore", DeprecationWarning)
        model = load_silero_vad()

    def has_voice(wav: torch.Tensor) -> bool:
        return bool(get_speech_timestamps(wav.float(), model, sampling_rate=SAMPLE_RATE))

    return has_voice


def decoding_rules() -> str:
    """`DECODING`, with ``-silero`` when the voice detector takes part (it can change what is transcribed)."""
    try:
        import silero_vad  # noqa: F401
    except ImportError:
        return DECODING
    return f"{DECODING}-silero"


@dataclass(frozen=True)
class Limits:
    """When a window is skipped or its decoding stopped; the defaults are openai-whisper's where it has one."""

    #: A window whose RMS level is below this (dB relative to full scale) is silence: skipped unheard.
    silence_dbfs: float = -60.0
    #: Skip a window where the voice detector (when installed) hears no voice.
    use_voice_detector: bool = True
    #: A window whose no-speech probability is above this is skipped (openai-whisper's threshold).
    no_speech_threshold: float = 0.6
    #: Tokens allowed per second of audio, plus `base_tokens`: fast English speech is about 4 tokens/s.
    tokens_per_second: float = 8.0
    base_tokens: int = 8
    #: A block of up to `loop_block` tokens seen this many times in a row ends the window (a loop).
    repeats: int = 4
    loop_block: int = 8
    #: Seconds of transcription allowed per clip (None: no limit); what was heard until then is kept.
    budget_s: float | None = None

    def max_tokens(self, samples: int) -> int:
        return min(MAX_NEW_TOKENS, self.base_tokens + math.ceil(samples / SAMPLE_RATE * self.tokens_per_second))


@dataclass
class Transcript:
    """One clip's text (None when no window held speech), its language (None when nothing was decoded) and
    what was skipped or cut on the way."""

    text: str | None
    windows: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    language: str | None = None


@dataclass(frozen=True)
class SpecialTokens:
    """A Whisper model's special token ids, read from its own tokenizer; `languages` maps a language code
    (``"de"``) to its token for a multilingual model and is empty for an English-only one."""

    end_of_text: int
    start_of_transcript: int
    no_timestamps: int
    no_speech: int
    transcribe: int | None
    languages: dict[str, int]

    @classmethod
    def of(cls, tokenizer, language_ids: Sequence[int] = ()) -> SpecialTokens:
        def token(*names: str) -> int:
            for name in names:
                if (found := tokenizer.token_to_id(name)) is not None:
                    return found
            raise ConfigError(f"the Whisper tokenizer has no {names[0]} token", hint="use a packaged Whisper model")

        languages = {tokenizer.id_to_token(i)[2:-2]: i for i in language_ids}
        return cls(token("<|endoftext|>"), token("<|startoftranscript|>"), token("<|notimestamps|>"),
                   token("<|nospeech|>", "<|nocaptions|>"), token("<|transcribe|>") if languages else None, languages)

    def prompt(self, language: str | None) -> list[int]:
        """The decoder's prompt: start of transcript, the language and the task (multilingual), no timestamps."""
        if not self.languages:
            return [self.start_of_transcript, self.no_timestamps]
        return [self.start_of_transcript, self.languages[language], self.transcribe, self.no_timestamps]


class TranscriptionCancelled(Exception):
    """The caller no longer wants the text (its client left)."""


def level_dbfs(wav: torch.Tensor) -> float:
    rms = float(wav.float().pow(2).mean().sqrt()) if wav.numel() else 0.0
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def loop_start(tokens: Sequence[int], repeats: int, max_block: int) -> int | None:
    """Where a run of one block of tokens repeated `repeats` times in a row at the end of `tokens` begins
    (after its first copy, which is kept), or None."""
    for block in range(1, max_block + 1):
        span = block * repeats
        if len(tokens) < span:
            break
        tail = tokens[-span:]
        if all(tail[i] == tail[i % block] for i in range(span)):
            return len(tokens) - span + block
    return None


class WhisperTranscriber:
    """Greedy decoding with a packaged Whisper (`model`: ``whisper`` is tiny.en, ``whisper-base`` the
    multilingual base); suppresses the tokens its config lists (and every special token but end of text), and
    a blank or end-of-text first token, as the reference decoder does. A multilingual model transcribes in
    `language` (a code such as ``"de"``), or in the language it detects in each clip: its most probable
    language token right after start of transcript, as openai-whisper detects it."""

    def __init__(self, model: str = "whisper", language: str | None = None):
        from tokenizers import Tokenizer

        self.model = packaged_model(model)
        self.weights = packaged_whisper(model)
        self.mel = WhisperLogMel(self.weights.encoder.dims.n_mels)
        self.tokenizer = Tokenizer.from_file(str(self.weights.folder / "tokenizer.json"))
        config = json.loads((self.weights.folder / "config.json").read_text())
        self.special = SpecialTokens.of(self.tokenizer, config.get("lang_ids", ()) if self.model.multilingual else ())
        self.language = self.checked_language(language)
        vocab = self.weights.decoder.token_embedding.num_embeddings
        suppress = torch.zeros(vocab, dtype=torch.bool)
        suppress[list(self.weights.suppress_ids)] = True
        suppress[self.special.start_of_transcript:] = True  # special and timestamp tokens
        self.suppress = suppress
        self.suppress_first = suppress.clone()
        self.suppress_first[list(self.weights.suppress_ids_begin)] = True
        self.has_voice = voice_detector()

    def checked_language(self, language: str | None) -> str | None:
        """`language` as a code the model knows (None: detect it; always English for an English-only model)."""
        code = (language or "").strip().lower() or None
        if not self.special.languages:
            if code not in (None, "en"):
                raise ConfigError(f"language {language!r}: {self.model.name} transcribes English only",
                                  hint=f"set {MODEL_VARIABLE}=whisper-base for other languages")
            return "en"
        if code is not None and code not in self.special.languages:
            raise ConfigError(f"language {language!r} is not one {self.model.name} knows",
                              hint=f"use one of {', '.join(sorted(self.special.languages))}, or none to detect it")
        return code

    def __call__(self, waveform: np.ndarray | torch.Tensor, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """One 16 kHz mono clip -> its text, stripped ("" when it holds no speech)."""
        return self.transcribe(waveform, Limits(), max_new_tokens=max_new_tokens).text or ""

    def transcribe(self, waveform: np.ndarray | torch.Tensor, limits: Limits = Limits(), *,
                   cancel: threading.Event | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> Transcript:
        """One 16 kHz mono clip, window by window, with `limits`' checks; `cancel` set -> `TranscriptionCancelled`."""
        wav = torch.as_tensor(np.asarray(waveform, dtype=np.float32)).flatten()
        deadline = time.monotonic() + limits.budget_s if limits.budget_s is not None else None
        out = Transcript(text=None)
        language = self.language
        texts: list[str] = []
        for start in range(0, wav.numel(), CHUNK_SAMPLES):
            if deadline is not None and time.monotonic() > deadline:
                out.warnings.append(f"transcription stopped at {start / SAMPLE_RATE:.0f} s, its {limits.budget_s:g} s "
                                    "time budget: the rest of the clip was not transcribed")
                break
            chunk = wav[start:start + CHUNK_SAMPLES]
            out.windows += 1
            text, why, heard = self.decode_window(chunk, limits, language, cancel=cancel, deadline=deadline,
                                                  max_new_tokens=min(max_new_tokens, limits.max_tokens(chunk.numel())))
            if heard is not None and out.language is None:
                out.language = language = heard  # detected once, in the first window with speech
            if why == "skipped":
                out.skipped += 1
            elif why:
                out.warnings.append(f"transcription of {start / SAMPLE_RATE:.0f}-"
                                    f"{(start + chunk.numel()) / SAMPLE_RATE:.0f} s {why}")
            if text:
                texts.append(text)
        out.text = " ".join(texts) or None
        return out

    def window(self, wav: torch.Tensor, limits: Limits = Limits(), *, cancel: threading.Event | None = None,
               deadline: float | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, str | None]:
        """Greedy decoding of at most 30 s of audio -> (text, None) or (text, why it was skipped or cut)."""
        text, why, _ = self.decode_window(wav, limits, self.language, cancel=cancel, deadline=deadline,
                                          max_new_tokens=max_new_tokens)
        return text, why

    @torch.no_grad()
    def decode_window(self, wav: torch.Tensor, limits: Limits, language: str | None, *,
                      cancel: threading.Event | None = None, deadline: float | None = None,
                      max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, str | None, str | None]:
        """`window`, in `language` (None: detected here) -> (text, why, the language decoded; None if skipped)."""
        if level_dbfs(wav) < limits.silence_dbfs:
            return "", "skipped", None
        if limits.use_voice_detector and self.has_voice is not None and not self.has_voice(wav):
            return "", "skipped", None
        special = self.special
        audio = self.weights.encoder(self.mel(wav, pad_to_chunk=True)[None])[-1]
        audio_kv = self.weights.decoder.audio_keys_values(audio)
        first = self.weights.decoder.next_token_logits(torch.tensor([[special.start_of_transcript]]), audio_kv)[0]
        if float(first.float().softmax(-1)[special.no_speech]) > limits.no_speech_threshold:
            return "", "skipped", None
        if language is None:  # multilingual, not given: the most probable language token
            codes = list(special.languages)
            language = codes[int(first[[special.languages[c] for c in codes]].argmax())]
        tokens = special.prompt(language)
        prompt = len(tokens)
        why = None
        for step in range(max_new_tokens):
            if cancel is not None and cancel.is_set():
                raise TranscriptionCancelled
            if deadline is not None and time.monotonic() > deadline:
                why = f"stopped by the {limits.budget_s:g} s time budget"
                break
            logits = self.weights.decoder.next_token_logits(torch.tensor([tokens]), audio_kv)[0]
            logits[self.suppress_first if step == 0 else self.suppress] = -torch.inf
            token = int(logits.argmax())
            if token == special.end_of_text:
                break
            tokens.append(token)
            loop = loop_start(tokens[prompt:], limits.repeats, limits.loop_block)
            if loop is not None:
                del tokens[prompt + loop:]
                why = "stopped where it began to repeat itself"
                break
        else:
            why = f"stopped at its cap of {max_new_tokens} tokens"
        return self.tokenizer.decode(tokens[prompt:], skip_special_tokens=True).strip(), why, language


_transcribers: dict[tuple[str, str | None], WhisperTranscriber] = {}
_lock = threading.Lock()


def chosen_model() -> tuple[str, str | None]:
    """The transcribing model and language the user chose: ``$EMOFUSE_TRANSCRIBER`` (a packaged Whisper,
    default ``whisper``, tiny.en) and ``$EMOFUSE_TRANSCRIBE_LANGUAGE`` (a code; unset: detected)."""
    name = os.environ.get(MODEL_VARIABLE, "").strip() or "whisper"
    model = packaged_model(name)  # an unknown name is refused here, naming the choices
    language = os.environ.get(LANGUAGE_VARIABLE, "").strip().lower() or None
    if not model.multilingual:
        if language not in (None, "en"):
            raise ConfigError(f"{LANGUAGE_VARIABLE}={language}: {model.name} transcribes English only",
                              hint=f"set {MODEL_VARIABLE}=whisper-base (--transcriber whisper-base) for other "
                                   "languages")
        return "whisper", "en"
    return "whisper-base", language


def transcriber() -> WhisperTranscriber:
    """The process's transcriber for the chosen model and language (`chosen_model`; each loads once)."""
    key = chosen_model()
    with _lock:
        if key not in _transcribers:
            _transcribers[key] = WhisperTranscriber(*key)
        return _transcribers[key]


def transcribe(waveforms: Iterable[np.ndarray | torch.Tensor]) -> list[str]:
    """16 kHz mono waveforms -> one transcript each (greedy Whisper, the chosen model, offline; "" where no
    speech)."""
    model = transcriber()
    return [model(w) for w in waveforms]


class TranscriptCache:
    """One JSON file of ``{clip content hash: transcript}``, readable by its owner only (0600); written
    atomically after each batch of new clips."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self._texts: dict[str, str] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            self._texts = {}  # unreadable cache: transcribe again rather than fail

    def transcripts(self, paths: Sequence[Path]) -> list[str]:
        """The transcript of each audio file, transcribing (and storing) only the ones not seen before."""
        from emofuse.core import decode_audio

        keys = [file_sha256(Path(p)) for p in paths]  # the same recording anywhere: one entry
        missing = [i for i, k in enumerate(keys) if k not in self._texts]
        if missing:
            texts = transcribe(decode_audio(paths[i]) for i in missing)
            self._texts.update({keys[i]: t for i, t in zip(missing, texts)})
            self._save()
        return [self._texts[k] for k in keys]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)  # a leftover temporary file keeps its old mode otherwise
            out.write(json.dumps(self._texts, indent=0, sort_keys=True))
        os.replace(tmp, self.path)


def default_transcript_cache() -> Path:
    """``$EMOFUSE_CACHE_DIR/transcripts`` (else ``$XDG_CACHE_HOME/emofuse/transcripts``), the rule every user
    cache follows; one file per model, language and decoding rules so text made otherwise is never served."""
    name, language = chosen_model()
    model = packaged_model(name)
    if not model.multilingual:
        return user_cache_dir("transcripts") / f"whisper-tiny.en-{model.sha256[:12]}-{decoding_rules()}.json"
    return user_cache_dir("transcripts") / (f"{name}-{model.sha256[:12]}-{language or 'detected'}-"
                                             f"{decoding_rules()}.json")


def fill_missing_transcripts(samples: Sequence[Sample], cache: Path | str | None = None) -> list[Sample]:
    """`samples` with every missing transcript filled from the clip's speech (its audio, else its video's
    sound track); each new text is marked ``extra["transcribed"] = True``. Samples with text, or without
    any media, are returned as they are; a clip without speech keeps no text. Clips are transcribed once:
    the text is kept in `cache` (default `default_transcript_cache`)."""
    todo = [i for i, s in enumerate(samples) if not (s.text and s.text.strip()) and (s.audio_path or s.video_path)]
    if not todo:
        return list(samples)
    store = TranscriptCache(cache if cache is not None else default_transcript_cache())
    texts = store.transcripts([Path(samples[i].audio_path or samples[i].video_path) for i in todo])
    out = list(samples)
    for i, text in zip(todo, texts):
        out[i] = dataclasses.replace(samples[i], text=text or None, extra={**samples[i].extra, "transcribed": True})
    return out
