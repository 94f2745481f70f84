"""Speech to text for clips that come without a transcript: greedy Whisper decoding, offline, safe to serve.

`transcribe` is the one entry point predict and the readers use (readers hold no model code); it runs
the packaged Whisper tiny.en through this project's PyTorch port (`emofuse.plugins.encoders.whisper`):
the clip is cut into Whisper's 30 s windows (each padded to 30 s: the decoder was trained on that), the
encoder runs once per window, then tokens are chosen greedily until end of text. It gives the same text
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

from emofuse.core import Sample, user_cache_dir
from emofuse.plugins.encoders.whisper import (
    CHUNK_SAMPLES,
    PACKAGED_SHA256,
    SAMPLE_RATE,
    WhisperLogMel,
    file_sha256,
    packaged_whisper,
)

#: Whisper's special tokens for English-only models (tiny.en): start of transcript, no timestamps, end of text,
#: and the token whose probability after start of transcript is the window's no-speech probability.
START_OF_TRANSCRIPT = 50257
NO_TIMESTAMPS = 50362
END_OF_TEXT = 50256
NO_SPEECH = 50361
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
    """One clip's text (None when no window held speech) and what was skipped or cut on the way."""

    text: str | None
    windows: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)


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
    """Greedy decoding with the packaged Whisper; suppresses the tokens its config lists (and every special
    token but end of text), and a blank or end-of-text first token, as the reference decoder does."""

    def __init__(self):
        from tokenizers import Tokenizer

        self.weights = packaged_whisper()
        self.mel = WhisperLogMel(self.weights.encoder.dims.n_mels)
        self.tokenizer = Tokenizer.from_file(str(self.weights.folder / "tokenizer.json"))
        vocab = self.weights.decoder.token_embedding.num_embeddings
        suppress = torch.zeros(vocab, dtype=torch.bool)
        suppress[list(self.weights.suppress_ids)] = True
        suppress[START_OF_TRANSCRIPT:] = True  # special and timestamp tokens
        self.suppress = suppress
        self.suppress_first = suppress.clone()
        self.suppress_first[list(self.weights.suppress_ids_begin)] = True
        self.has_voice = voice_detector()

    def __call__(self, waveform: np.ndarray | torch.Tensor, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """One 16 kHz mono clip -> its text, stripped ("" when it holds no speech)."""
        return self.transcribe(waveform, Limits(), max_new_tokens=max_new_tokens).text or ""

    def transcribe(self, waveform: np.ndarray | torch.Tensor, limits: Limits = Limits(), *,
                   cancel: threading.Event | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> Transcript:
        """One 16 kHz mono clip, window by window, with `limits`' checks; `cancel` set -> `TranscriptionCancelled`."""
        wav = torch.as_tensor(np.asarray(waveform, dtype=np.float32)).flatten()
        deadline = time.monotonic() + limits.budget_s if limits.budget_s is not None else None
        out = Transcript(text=None)
        texts: list[str] = []
        for start in range(0, wav.numel(), CHUNK_SAMPLES):
            if deadline is not None and time.monotonic() > deadline:
                out.warnings.append(f"transcription stopped at {start / SAMPLE_RATE:.0f} s, its {limits.budget_s:g} s "
                                    "time budget: the rest of the clip was not transcribed")
                break
            chunk = wav[start:start + CHUNK_SAMPLES]
            out.windows += 1
            text, why = self.window(chunk, limits, cancel=cancel, deadline=deadline,
                                    max_new_tokens=min(max_new_tokens, limits.max_tokens(chunk.numel())))
            if why == "skipped":
                out.skipped += 1
            elif why:
                out.warnings.append(f"transcription of {start / SAMPLE_RATE:.0f}-"
                                    f"{(start + chunk.numel()) / SAMPLE_RATE:.0f} s {why}")
            if text:
                texts.append(text)
        out.text = " ".join(texts) or None
        return out

    @torch.no_grad()
    def window(self, wav: torch.Tensor, limits: Limits = Limits(), *, cancel: threading.Event | None = None,
               deadline: float | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[str, str | None]:
        """Greedy decoding of at most 30 s of audio -> (text, None) or (text, why it was skipped or cut)."""
        if level_dbfs(wav) < limits.silence_dbfs:
            return "", "skipped"
        if limits.use_voice_detector and self.has_voice is not None and not self.has_voice(wav):
            return "", "skipped"
        audio = self.weights.encoder(self.mel(wav, pad_to_chunk=True)[None])[-1]
        audio_kv = self.weights.decoder.audio_keys_values(audio)
        first = self.weights.decoder.next_token_logits(torch.tensor([[START_OF_TRANSCRIPT]]), audio_kv)[0]
        if float(first.float().softmax(-1)[NO_SPEECH]) > limits.no_speech_threshold:
            return "", "skipped"
        tokens = [START_OF_TRANSCRIPT, NO_TIMESTAMPS]
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
            if token == END_OF_TEXT:
                break
            tokens.append(token)
            loop = loop_start(tokens[2:], limits.repeats, limits.loop_block)
            if loop is not None:
                del tokens[2 + loop:]
                why = "stopped where it began to repeat itself"
                break
        else:
            why = f"stopped at its cap of {max_new_tokens} tokens"
        return self.tokenizer.decode(tokens[2:], skip_special_tokens=True).strip(), why


_transcriber: WhisperTranscriber | None = None
_lock = threading.Lock()


def transcriber() -> WhisperTranscriber:
    """The process's one transcriber (the model loads once)."""
    global _transcriber
    with _lock:
        if _transcriber is None:
            _transcriber = WhisperTranscriber()
        return _transcriber


def transcribe(waveforms: Iterable[np.ndarray | torch.Tensor]) -> list[str]:
    """16 kHz mono waveforms -> one transcript each (greedy Whisper tiny.en, offline; "" where no speech)."""
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
    cache follows; one file per model and decoding rules so text made otherwise is never served."""
    return user_cache_dir("transcripts") / f"whisper-tiny.en-{PACKAGED_SHA256[:12]}-{decoding_rules()}.json"


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
