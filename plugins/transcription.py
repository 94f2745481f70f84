"""Speech to text for clips that come without a transcript: greedy Whisper decoding, offline.

`transcribe` is the one entry point predict and the readers use (readers hold no model code); it runs
the packaged Whisper tiny.en through this project's PyTorch port (`emofuse.plugins.encoders.whisper`):
the clip is padded to Whisper's 30 s window (the decoder was trained on that), the encoder runs once,
then tokens are chosen greedily until end of text. It gives the same text as the ctranslate2 runtime,
which is about twice as fast on CPU (`benchmarks/bench_whisper.py`); the port is used anyway so that
no second runtime is a dependency, and each clip is transcribed once (cached).
`TranscriptCache` keeps each clip's text on disk
by the clip's content hash, so a corpus is transcribed once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from emofuse.core import Sample, user_cache_dir
from emofuse.plugins.encoders.whisper import (
    CHUNK_SAMPLES,
    PACKAGED_SHA256,
    WhisperLogMel,
    file_sha256,
    packaged_whisper,
)

#: Whisper's special tokens for English-only models (tiny.en): start of transcript, no timestamps, end of text.
START_OF_TRANSCRIPT = 50257
NO_TIMESTAMPS = 50362
END_OF_TEXT = 50256
#: openai-whisper's default cap on generated tokens (half the decoder's 448 positions).
MAX_NEW_TOKENS = 224


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

    def __call__(self, waveform: np.ndarray | torch.Tensor, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """One 16 kHz mono clip -> its text, stripped; a clip longer than 30 s is transcribed window by window."""
        wav = torch.as_tensor(np.asarray(waveform, dtype=np.float32)).flatten()
        texts = [self.window(chunk, max_new_tokens) for chunk in wav.split(CHUNK_SAMPLES)]
        return " ".join(t for t in texts if t)

    @torch.no_grad()
    def window(self, wav: torch.Tensor, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
        """Greedy decoding of at most 30 s of audio."""
        audio = self.weights.encoder(self.mel(wav, pad_to_chunk=True)[None])[-1]
        audio_kv = self.weights.decoder.audio_keys_values(audio)
        tokens = [START_OF_TRANSCRIPT, NO_TIMESTAMPS]
        for step in range(max_new_tokens):
            logits = self.weights.decoder.next_token_logits(torch.tensor([tokens]), audio_kv)[0]
            logits[self.suppress_first if step == 0 else self.suppress] = -torch.inf
            token = int(logits.argmax())
            if token == END_OF_TEXT:
                break
            tokens.append(token)
        return self.tokenizer.decode(tokens[2:], skip_special_tokens=True).strip()


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
    """16 kHz mono waveforms -> one transcript each (greedy Whisper tiny.en, offline)."""
    model = transcriber()
    return [model(w) for w in waveforms]


class TranscriptCache:
    """One JSON file of ``{clip content hash: transcript}``; written atomically after each batch of new clips."""

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self._texts, indent=0, sort_keys=True))
        os.replace(tmp, self.path)


def default_transcript_cache() -> Path:
    """``$EMOFUSE_CACHE_DIR/transcripts`` (else ``$XDG_CACHE_HOME/emofuse/transcripts``), the rule every user
    cache follows; one file per model so another model's text is never served."""
    return user_cache_dir("transcripts") / f"whisper-tiny.en-{PACKAGED_SHA256[:12]}.json"


def fill_missing_transcripts(samples: Sequence[Sample], cache: Path | str | None = None) -> list[Sample]:
    """`samples` with every missing transcript filled from the clip's speech (its audio, else its video's
    sound track); each new text is marked ``extra["transcribed"] = True``. Samples with text, or without
    any media, are returned as they are. Clips are transcribed once: the text is kept in `cache`
    (default `default_transcript_cache`)."""
    todo = [i for i, s in enumerate(samples) if not (s.text and s.text.strip()) and (s.audio_path or s.video_path)]
    if not todo:
        return list(samples)
    store = TranscriptCache(cache if cache is not None else default_transcript_cache())
    texts = store.transcripts([Path(samples[i].audio_path or samples[i].video_path) for i in todo])
    out = list(samples)
    for i, text in zip(todo, texts):
        out[i] = dataclasses.replace(samples[i], text=text or None, extra={**samples[i].extra, "transcribed": True})
    return out
