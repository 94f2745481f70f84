"""The prediction service behind `emofuse serve`: an HTTP API and a page over one loaded checkpoint.

FastAPI + uvicorn: the Python ecosystem's standard pair for a typed JSON API, with an OpenAPI schema
generated from the same type hints that validate each request (its `/docs` page is served from the
`fastapi-offline` package, so it works without a network). The model loads once per worker process;
uploads go through the same `Predictor.decode`/`Predictor.score` route as `emofuse predict`, so a clip gets
the same probabilities either way. Requests that arrive within a few milliseconds of each other are
scored as one batch on one model thread (`BatchingQueue`).

Speech is transcribed (for a model that reads text, when no transcript comes with the clip) on a thread
of its own (`TranscriptionService`), never on the model thread: a request that brings its transcript, or
needs none, never waits behind a transcription. Transcription skips silence and windows Whisper itself
finds speechless, stops at loops and at a token cap by length, has a time budget, and stops when its
client leaves. Its results are kept in memory only (a bounded table), never in a file.

Overload is refused, not queued without end: at most `max_queue` requests are admitted at once (more get
503 with Retry-After), a body must arrive within `body_timeout_s`, a request is answered within
`request_timeout_s`. `/healthz` says the process lives; `/readyz` says whether it takes work and how deep
its queues are. Requests must name an allowed host (DNS rebinding), may need an API key (``X-API-Key``),
and get CORS headers only for the origins allowed.

An upload is stored, under a neutral name, in a temporary folder of its own that is removed when its
request ends; what it is (audio or video, how long) is found by opening it with PyAV, never from its
name; nothing a request sends names a file on the server; face crops of uploads are not cached.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import ipaddress
import itertools
import json
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, Literal, Sequence, TypeVar

from emofuse.core.errors import DataError, EmofuseError, MissingDependencyError

try:
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi_offline import FastAPIOffline
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
except ImportError as exc:  # pragma: no cover - the `serve` extra is not installed
    raise MissingDependencyError(f"emofuse serve needs FastAPI ({exc.name} is not installed)",
                                 hint="pip install 'emofuse[serve]'") from None

from emofuse import __version__
from emofuse.core.apps.predict import Predictor, load, sample_from_media
from emofuse.core.apps.serve_guards import (API_KEY_HEADER, Admission, BodyLimits, RequireKey, json_refusal,
                                            strict_form_route)
from emofuse.core.data.decode import media_duration, probe
from emofuse.core.types import AUDIO, FEATURES, METADATA, TEXT, VIDEO, Sample

#: Where `app_from_environment` finds the checkpoint and settings in each uvicorn worker process.
SETTINGS_ENV = "EMOFUSE_SERVE_SETTINGS"
#: Host names a service answers by default: loopback only (a page on another site cannot rebind a name to it).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
#: What an upload can give the model: its media, the transcript field (or its speech), age and gender.
UPLOAD_MODALITIES = frozenset({AUDIO, VIDEO, TEXT, METADATA})
#: Room for the multipart framing and the form fields around the uploaded file.
_FORM_OVERHEAD_BYTES = 64 * 1024
_COPY_CHUNK = 1 << 20
_PREDICT_PATH = "/v1/predict"


@dataclass(frozen=True)
class ServeSettings:
    """What one service accepts, how it batches and whom it answers; every field is a `emofuse serve` option."""

    #: Largest upload accepted, in megabytes (10^6 bytes).
    max_upload_mb: float = 20.0
    #: Longest clip accepted, in seconds, measured from the file's packets; also where the model's audio
    #: and the transcription stop (one setting: what is accepted is what is read).
    max_seconds: float = 60.0
    #: Longest transcript accepted, in characters.
    max_transcript_chars: int = 2000
    #: Requests arriving within this many milliseconds of the first are scored together.
    batch_window_ms: float = 5.0
    #: Most clips in one batch; 1 scores each request alone (no batching).
    max_batch: int = 8
    #: Most prediction requests in the service at once (uploading, transcribing, queued, scored); more: 503.
    max_queue: int = 32
    #: Most requests waiting for or in transcription at once; more of those that need it: 503.
    max_transcribing: int = 4
    #: Seconds of transcription per clip; what was heard until then is used (with a warning).
    transcribe_budget_s: float = 20.0
    #: Seconds within which a request's whole body must arrive; a slower client is cut off (408).
    body_timeout_s: float = 30.0
    #: Seconds within which an admitted upload must be answered (after its body arrived); else 503.
    request_timeout_s: float = 120.0
    #: Transcripts of recent clips kept in memory (by content hash), never on disk.
    transcript_memory: int = 256
    #: When set, /v1/ requests must carry it in the ``X-API-Key`` header.
    api_key: str | None = None
    #: Origins whose pages may call the API from a browser (CORS); none by default.
    cors_origins: tuple[str, ...] = ()
    #: Host header values answered (``*.example.com`` patterns allowed); loopback names by default.
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    #: Parent of the per-request upload folders (default: the system's temporary folder).
    temp_dir: str | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


class UploadError(EmofuseError):
    """An upload the service refuses; `status` is the HTTP status it answers with (with `headers`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        self.status = status
        self.headers = headers
        super().__init__(message)


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


# --- the batching queue ----------------------------------------------------------------------------
Item = TypeVar("Item")
Result = TypeVar("Result")


class BatchingQueue(Generic[Item, Result]):
    """Groups items submitted within `window_s` of the first (at most `max_batch`) into one
    `run_batch` call, run on a single worker thread.

    One thread keeps PyTorch from fighting itself for cores, and a batch of clips costs far less than
    the same clips one by one. Items that queued while a batch ran join the next one at once.
    """

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], *, max_batch: int, window_s: float):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.window_s = max(0.0, window_s)
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future]] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Items waiting for a batch (not counting the batch being scored)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emofuse-model")
        self._task = asyncio.create_task(self._serve())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = self._queue = None

    async def submit(self, item: Item) -> Result:
        """Wait for `item`'s result; an exception of its batch is raised here."""
        if self._queue is None:
            raise RuntimeError("BatchingQueue.start() was not awaited")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _serve(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._queue.get()]
            deadline = loop.time() + self.window_s
            while len(pending) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    pending.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                    break
            while len(pending) < self.max_batch and not self._queue.empty():
                pending.append(self._queue.get_nowait())
            live = [(item, future) for item, future in pending if not future.done()]  # a caller may have left
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [item for item, _ in live])
            except Exception as exc:  # noqa: BLE001 - the batch's callers get the error, the queue goes on
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(live, results):
                if not future.done():
                    future.set_result(result)


# --- transcription, off the model thread --------------------------------------------------------------
#: (stored clip, seconds to read, cancel flag) -> its transcript; the default reads the clip's sound track
#: and runs the packaged Whisper (`emofuse.plugins.transcription`); tests pass another.
TranscribeClip = Callable[[Path, float, threading.Event], Any]


def whisper_clip_transcriber(budget_s: float) -> TranscribeClip:
    """Decode at most `max_seconds` of the clip's sound and transcribe it with `budget_s` seconds at most."""
    def transcribe_clip(path: Path, max_seconds: float, cancel: threading.Event):
        from emofuse.core.data.decode import decode_audio
        from emofuse.plugins.transcription import Limits, transcriber

        wav = decode_audio(path, max_seconds=max_seconds)
        return transcriber().transcribe(wav, Limits(budget_s=budget_s), cancel=cancel)

    return transcribe_clip


class TranscriptionService:
    """Transcriptions on one thread of their own, at most `max_waiting` at once, each cancelled when its
    caller stops waiting; recent clips' transcripts kept in memory (at most `memory` of them), by content."""

    def __init__(self, transcribe_clip: TranscribeClip, *, max_waiting: int, memory: int):
        self.transcribe_clip = transcribe_clip
        self.max_waiting = max_waiting
        self.memory = memory
        self._known: OrderedDict[str, Any] = OrderedDict()
        self._known_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self.depth = 0

    def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emofuse-transcribe")

    def stop(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None

    @property
    def full(self) -> bool:
        return self.depth >= self.max_waiting

    async def transcribe(self, path: Path, max_seconds: float) -> Any:
        """The clip's transcript; raises `UploadError` 503 when `max_waiting` are already waiting. Cancelling
        the caller sets the job's cancel flag: a job not started is dropped, a running one stops at its next token."""
        if self._executor is None:
            raise RuntimeError("TranscriptionService.start() was not called")
        if self.full:
            raise UploadError(503, "the transcriber is busy: retry later, or send the clip's transcript "
                                   "(a request with one is not delayed)", headers={"Retry-After": "5"})
        cancel = threading.Event()
        self.depth += 1
        job = self._executor.submit(self._run, path, max_seconds, cancel)
        try:
            return await asyncio.wrap_future(job)
        finally:
            self.depth -= 1
            if not job.done():
                cancel.set()
                job.cancel()

    def _run(self, path: Path, max_seconds: float, cancel: threading.Event) -> Any:
        from emofuse.plugins.transcription import TranscriptionCancelled

        if cancel.is_set():  # its caller left while it waited
            raise TranscriptionCancelled
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_COPY_CHUNK):
                digest.update(chunk)
        key = f"{digest.hexdigest()}|{max_seconds}"
        with self._known_lock:
            if key in self._known:
                self._known.move_to_end(key)
                return self._known[key]
        heard = self.transcribe_clip(path, max_seconds, cancel)
        if self.memory > 0 and not heard.warnings:  # a clip cut by the time budget may be heard whole later
            with self._known_lock:
                self._known[key] = heard
                while len(self._known) > self.memory:
                    self._known.popitem(last=False)
        return heard


async def unless_client_leaves(request: Request, work: Awaitable[Any], poll_s: float = 0.2) -> Any:
    """`work`'s result; cancels it (and raises `ClientGone`) as soon as the request's client disconnects."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --- uploads -----------------------------------------------------------------------------------------
@dataclass
class Upload:
    """A stored upload, checked: the sample to score and what its content turned out to be."""

    sample: Sample
    name: str
    kind: Literal["audio", "video"]
    seconds: float
    #: The clip comes without a transcript to a model that reads text: its speech is to be transcribed.
    needs_transcript: bool = False


def display_name(filename: str | None) -> str:
    """The client's file name, only for echoing back: the last path part, printable, at most 100 characters."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:100]
    return name or "upload"


async def store_upload(upload: UploadFile, folder: Path, settings: ServeSettings) -> Path:
    """Copy the uploaded file into `folder` under a neutral name, refusing empty and oversized ones."""
    stored = folder / "clip"
    size = 0
    with stored.open("wb") as out:
        while chunk := await upload.read(_COPY_CHUNK):
            size += len(chunk)
            if size > settings.max_upload_bytes:
                raise UploadError(413, f"upload is over this service's {settings.max_upload_mb:g} MB limit")
            out.write(chunk)
    if size == 0:
        raise UploadError(400, "upload is empty: choose an audio or video file")
    return stored


def inspect_upload(stored: Path, name: str, sample_id: str, predictor: Predictor, settings: ServeSettings, *,
                   transcript: str | None, age: float | None, gender: str | None) -> Upload:
    """Open the stored file with PyAV: refuse what is not media, is too long, or has nothing the model reads.

    The length is measured from the packets and the measuring stops at the limit: a clip far over it is
    refused after reading only that much."""
    try:
        seconds = media_duration(stored, stop_after=settings.max_seconds)
    except DataError as exc:
        raise UploadError(415, f"{name}: {_scrub(exc.message, stored, name)} (upload an audio or video file)") from None
    if seconds > settings.max_seconds:
        raise UploadError(413, f"{name}: the clip lasts more than {settings.max_seconds:g} s; this service takes "
                               f"at most {settings.max_seconds:g} s")
    try:
        sample = sample_from_media(stored, text=transcript, modalities=predictor.media_modalities(transcript),
                                   sample_id=sample_id, by_content=True)
    except DataError as exc:
        raise UploadError(422, f"{name}: {_scrub(exc.message, stored, name)}") from None
    sample.age = age
    sample.gender = gender
    needs = predictor.transcribe and transcript is None and sample.audio_path is not None
    return Upload(sample, name, "video" if probe(stored).has_video else "audio", seconds, needs_transcript=needs)


def with_transcript(sample: Sample, text: str | None, model_modalities: Sequence[str]) -> Sample:
    """`sample` with the text heard in it (None: no speech), marked as transcribed; its sound track dropped
    again where the model reads no audio (it was kept only to be transcribed)."""
    audio = sample.audio_path if AUDIO in model_modalities else None
    return dataclasses.replace(sample, text=text, audio_path=audio, extra={**sample.extra, "transcribed": True})


def _scrub(message: str, stored: Path, name: str) -> str:
    """An error's one line with the server's temporary path taken out."""
    text = message.replace(f"{stored}: ", "").replace(str(stored), name).replace(str(stored.parent), "")
    return " ".join(text.split())


# --- responses ---------------------------------------------------------------------------------------
class Timings(BaseModel):
    """Milliseconds spent on each step of one request."""

    upload_ms: float = Field(description="receiving, storing and inspecting the upload")
    transcribe_ms: float | None = Field(None, description="waiting for and running the transcriber (on its own "
                                                          "thread); null when the clip needed no transcription")
    queue_ms: float = Field(description="waiting for the model thread and for the batch to fill")
    decode_ms: float = Field(description="decoding the batch this clip was scored in (no transcription)")
    model_ms: float = Field(description="running the model on that batch")
    total_ms: float = Field(description="the whole request, as the service saw it")
    batch_size: int = Field(description="clips scored together with this one (itself included)")


class Prediction(BaseModel):
    """What `POST /v1/predict` answers: the same numbers `emofuse predict` gives for the file."""

    id: str = Field(description="the uploaded file's name, echoed for display")
    label: str
    probabilities: dict[str, float] = Field(description="class -> probability, fused over the branches")
    branches: dict[str, dict[str, float] | None] = Field(
        description="branch -> its own class probabilities; null for a branch whose modalities the clip lacks")
    modalities: list[str] = Field(description="what the model read from this clip")
    transcript: str | None = Field(description="the transcript the model read: the one given, or the clip's "
                                               "speech transcribed (Whisper tiny.en) when none was; null if none "
                                               "(a clip without speech gets none)")
    transcribed: bool = Field(False, description="true when the clip's speech was transcribed (none was given)")
    explanation: str | None = Field(None, description="an image explaining a video prediction, as a data: URL, "
                                                      "when the predictor provides one; null otherwise")
    media: Literal["audio", "video"] = Field(description="what the upload's content turned out to be")
    seconds: float = Field(description="the clip's length, measured from its packets")
    warnings: list[str] = Field(default_factory=list, description="what was cut or left out of this clip "
                                                                  "(audio past the limit, transcription stopped)")
    timings: Timings


class ErrorDetail(BaseModel):
    detail: str = Field(description="one line: what was wrong with the request")


class Limits(BaseModel):
    max_upload_mb: float
    max_seconds: float
    max_transcript_chars: int


class BranchCard(BaseModel):
    encoder: str
    modalities: list[str]
    title: str = Field(description="what the branch reads, in plain words")
    accuracy: dict[str, float | None] = Field(description="split -> this branch's own accuracy in training")
    uploads_feed_it: bool = Field(description="false when an upload can never give this branch its input")
    note: str | None = Field(description="why uploads cannot feed it; null when they can")


class ModelCard(BaseModel):
    """What `GET /v1/model` answers: enough to know what the model reads and where it came from."""

    name: str
    classes: list[str] = Field(description="the class names, in the order of every probability table")
    modalities: list[str] = Field(description="what the model reads from a clip and the form")
    branches: dict[str, BranchCard]
    fusion: str | None
    accuracy: dict[str, float | None] = Field(description="split -> the fused model's accuracy in training "
                                                          "(with every branch fed)")
    upload_warnings: list[str] = Field(description="what uploads cannot give this model, in one line each")
    components: list[dict[str, str]] = Field(
        description="each part of the model with the plugin distribution and version that made it")
    metrics: dict[str, Any] = Field(description="the training run's metrics, per split (null where undefined)")
    fusion_report: dict[str, Any] | None
    emofuse_version: str | None = Field(description="the emofuse that trained the checkpoint")
    served_by: str = Field(description="the emofuse serving it")
    limits: Limits


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    max_batch: int
    api_key_required: bool = Field(description="whether /v1/ requests need the X-API-Key header")


class Readiness(BaseModel):
    status: Literal["ready", "full"]
    in_flight: int = Field(description="prediction requests in the service now")
    max_queue: int
    queue_depth: int = Field(description="clips waiting for the model thread")
    transcribing: int = Field(description="requests waiting for or in transcription")
    max_transcribing: int


MODALITY_WORDS = {AUDIO: "the voice", VIDEO: "the face", TEXT: "the words", METADATA: "the speaker's age and gender",
                  FEATURES: "precomputed features from a table"}


def branch_title(modalities: Sequence[str]) -> str:
    """A branch in plain words: ``["audio", "text"]`` -> "the voice and the words"."""
    words = [MODALITY_WORDS.get(m, m) for m in sorted(modalities, key=lambda m: list(MODALITY_WORDS).index(m)
                                                       if m in MODALITY_WORDS else 99) if m != METADATA]
    words = words or [MODALITY_WORDS[METADATA]]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _accuracy(metrics: Any) -> dict[str, float | None]:
    if not isinstance(metrics, dict):
        return {}
    return {split: m.get("accuracy") for split, m in metrics.items() if isinstance(m, dict) and "accuracy" in m}


def model_card(predictor: Predictor, settings: ServeSettings) -> dict[str, Any]:
    """Classes, branches (each with its own accuracy and whether uploads can feed it), the components with
    the plugin versions that made them, and training metrics."""
    meta = predictor.loaded.meta
    config = predictor.loaded.config
    metrics = meta.get("metrics", {}) or {}
    branch_metrics = metrics.get("branches", {}) if isinstance(metrics.get("branches"), dict) else {}
    single = len(config.branches) == 1
    branches, warnings = {}, []
    for name, ref in config.branches.items():
        modalities = sorted(predictor.model.branches[name].modalities)
        unfed = [m for m in modalities if m not in UPLOAD_MODALITIES]
        note = None
        if unfed:
            note = (f"reads {', '.join(MODALITY_WORDS.get(m, m) for m in unfed)}, which an upload cannot give: "
                    "it is left out of every prediction")
            warnings.append(f"branch {name!r} ({ref.name}) {note}")
        branches[name] = {"encoder": ref.name, "modalities": modalities, "title": branch_title(modalities),
                          "accuracy": _accuracy(metrics if single else branch_metrics.get(name)),
                          "uploads_feed_it": not unfed, "note": note}
    if warnings and len(warnings) < len(branches):
        warnings.append("the fused accuracy was measured with every branch fed; uploads are predicted without "
                        "the branches above, so expect that of the branches they feed")
    return _finite({
        "name": config.name,
        "classes": list(predictor.label_names),
        "modalities": list(predictor.modalities),
        "branches": branches,
        "fusion": config.fusion.name if config.fusion is not None else None,
        "accuracy": _accuracy({k: v for k, v in metrics.items() if k != "branches"}),
        "upload_warnings": warnings,
        "components": meta.get("components", []),
        "metrics": metrics,
        "fusion_report": meta.get("fusion_report"),
        "emofuse_version": meta.get("emofuse_version"),
        "served_by": __version__,
        "limits": {"max_upload_mb": settings.max_upload_mb, "max_seconds": settings.max_seconds,
                   "max_transcript_chars": settings.max_transcript_chars},
    })


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: a metric that could not be computed becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def startup_warnings(card: dict[str, Any], settings: ServeSettings, host: str) -> list[str]:
    """What `emofuse serve` says before it listens: branches uploads cannot feed, and an exposed bind."""
    lines = list(card["upload_warnings"])
    if not is_loopback(host):
        if settings.api_key is None:
            lines.append(f"listening on {host}, beyond this machine, without an API key: anyone who reaches the "
                         "port can use the service (set EMOFUSE_API_KEY or --api-key-env)")
        if tuple(settings.allowed_hosts) == LOOPBACK_HOSTS:
            lines.append(f"only the Host names {', '.join(LOOPBACK_HOSTS)} are answered: add the name clients use "
                         "with --allowed-host")
    return lines


def page_html() -> str:
    """The one page served at ``/`` (shipped as package data)."""
    return resources.files("emofuse.core.apps").joinpath("static", "index.html").read_text(encoding="utf-8")


# --- the app -----------------------------------------------------------------------------------------
def create_app(predictor: Predictor, settings: ServeSettings | None = None, *,
               transcribe_clip: TranscribeClip | None = None) -> FastAPI:
    """The service over an already loaded `predictor` (tests and `emofuse serve` build it the same way).

    `transcribe_clip` replaces the packaged Whisper (tests)."""
    settings = settings or ServeSettings()
    ids = itertools.count()
    predictor = copy.copy(predictor)  # this service's decoding settings, not the caller's
    # one length setting: what is accepted is what the model reads; no face crops of uploads are kept on disk
    predictor.spec = dataclasses.replace(predictor.spec, max_audio_seconds=settings.max_seconds, crop_cache=None)

    def run_batch(samples: list[Sample]) -> list[tuple[dict[str, Any], dict[str, float]]]:
        start = time.perf_counter()
        clips = predictor.decode(samples)  # transcripts were filled before: decoding only
        decoded = time.perf_counter()
        records = predictor.score(clips)
        scored = time.perf_counter()
        timing = {"decode_ms": (decoded - start) * 1e3, "model_ms": (scored - decoded) * 1e3,
                  "batch_size": len(samples), "started": start}
        return [(record, timing) for record in records]

    queue: BatchingQueue[Sample, tuple[dict[str, Any], dict[str, float]]] = BatchingQueue(
        run_batch, max_batch=settings.max_batch, window_s=settings.batch_window_ms / 1e3)
    transcription = TranscriptionService(transcribe_clip or whisper_clip_transcriber(settings.transcribe_budget_s),
                                         max_waiting=settings.max_transcribing, memory=settings.transcript_memory)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await queue.start()
        transcription.start()
        try:
            yield
        finally:
            transcription.stop()
            await queue.stop()

    app = FastAPIOffline(title="emofuse", version=__version__, lifespan=lifespan,
                         description="Emotion recognition from an audio or video clip, with an optional transcript "
                                     "and speaker metadata, by one trained emofuse checkpoint.")
    app.router.route_class = strict_form_route(settings.max_transcript_chars)
    card = model_card(predictor, settings)
    page = page_html()
    app.add_middleware(BodyLimits, max_bytes=settings.max_upload_bytes + _FORM_OVERHEAD_BYTES
                       + 4 * settings.max_transcript_chars,
                       detail=f"upload is over this service's {settings.max_upload_mb:g} MB limit",
                       timeout_s=settings.body_timeout_s)
    app.add_middleware(Admission, limit=settings.max_queue, path=_PREDICT_PATH)
    if settings.api_key:
        app.add_middleware(RequireKey, key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=[API_KEY_HEADER], max_age=600)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts), www_redirect=False)
    admission: list[Admission] = []  # found once the middleware stack is built (for /readyz)

    def in_flight() -> int:
        if not admission:
            layer = app.middleware_stack
            while layer is not None and not isinstance(layer, Admission):
                layer = getattr(layer, "app", None)
            if layer is not None:
                admission.append(layer)
        return admission[0].in_flight if admission else 0

    @app.exception_handler(UploadError)
    async def _refused(_, exc: UploadError) -> JSONResponse:
        return json_refusal(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors()]
        return json_refusal(422, "; ".join(parts))

    refusals = {code: {"model": ErrorDetail, "description": why} for code, why in (
        (400, "empty upload, more than one file, or a malformed form"), (401, "missing or wrong API key"),
        (408, "the body did not arrive in time"), (413, "upload too large or clip too long"),
        (415, "not a multipart form, or not an audio or video file PyAV can read"),
        (422, "missing or invalid field, no stream the model reads, or a clip that fails to decode"),
        (503, "the service or its transcriber is full, or the request took too long: retry after Retry-After"))}

    @app.post(_PREDICT_PATH, response_model=Prediction, responses=refusals)
    async def predict(
        request: Request,
        file: UploadFile = File(description="an audio or video clip in any container PyAV reads"),
        transcript: str | None = Form(None, max_length=settings.max_transcript_chars,
                                      description="what is said in the clip; used by models that read text"),
        age: float | None = Form(None, ge=0, le=130, description="the speaker's age in years"),
        gender: Literal["male", "female", "unknown"] | None = Form(None, description="the speaker's gender"),
    ) -> Prediction | Response:
        received = time.perf_counter()
        name = display_name(file.filename)
        files = (await request.form()).getlist("file")
        if len(files) > 1:
            raise UploadError(400, f"the form has {len(files)} `file` parts: send one clip per request")
        with tempfile.TemporaryDirectory(prefix="emofuse-upload-", dir=settings.temp_dir) as folder:
            stored = await store_upload(file, Path(folder), settings)
            upload = await run_in_threadpool(
                inspect_upload, stored, name, f"upload-{next(ids)}", predictor, settings,
                transcript=(transcript or None), age=age, gender=gender)
            inspected = time.perf_counter()
            try:
                record, timing, heard, transcribed_at = await asyncio.wait_for(
                    unless_client_leaves(request, answer(upload, stored)), settings.request_timeout_s)
            except ClientGone:
                return Response(status_code=499)  # nobody reads it: the client has gone
            except asyncio.TimeoutError:
                raise UploadError(503, f"{name}: not answered within this service's {settings.request_timeout_s:g} s",
                                  headers={"Retry-After": "10"}) from None
            if "error" in record:
                raise UploadError(422, f"{name}: {_scrub(record['error'], stored, name)}")
        done = time.perf_counter()
        warnings = [*(heard.warnings if heard is not None else []),
                    *([record["warning"].replace("--max-audio-seconds", "--max-seconds")] if "warning" in record else [])]
        return Prediction(
            id=name, label=record["label"], probabilities=record["probabilities"], branches=record["branches"],
            modalities=record["modalities"], transcript=record.get("transcript"),
            transcribed=bool(record.get("transcribed")),
            explanation=record.get("explanation"), media=upload.kind, seconds=round(upload.seconds, 3),
            warnings=warnings,
            timings=Timings(upload_ms=(inspected - received) * 1e3,
                            transcribe_ms=(transcribed_at - inspected) * 1e3 if heard is not None else None,
                            queue_ms=(timing["started"] - transcribed_at) * 1e3,
                            decode_ms=timing["decode_ms"], model_ms=timing["model_ms"],
                            total_ms=(done - received) * 1e3,
                            batch_size=timing["batch_size"]))

    async def answer(upload: Upload, stored: Path) -> tuple[dict[str, Any], dict[str, Any], Any, float]:
        """Transcribe (when needed, on the transcription thread), then score on the model thread."""
        sample, heard = upload.sample, None
        if upload.needs_transcript:
            try:
                heard = await transcription.transcribe(stored, settings.max_seconds)
            except DataError as exc:  # its sound track cannot be read
                raise UploadError(422, f"{upload.name}: {_scrub(exc.message, stored, upload.name)}") from None
            sample = with_transcript(sample, heard.text, predictor.modalities)
            if not (sample.audio_path or sample.video_path or sample.text):
                raise UploadError(422, f"{upload.name}: no speech was heard in the clip, and this model reads only "
                                       "its words: send the transcript")
        transcribed_at = time.perf_counter()
        record, timing = await queue.submit(sample)
        return record, timing, heard, transcribed_at

    @app.get("/v1/model", response_model=ModelCard)
    async def model() -> dict[str, Any]:
        """The model card: classes, branches (each with its own accuracy and whether uploads feed it),
        components with their plugin versions, training metrics, limits."""
        return card

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok", model=card["name"], max_batch=settings.max_batch,
                      api_key_required=bool(settings.api_key))

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "full"}})
    async def readyz() -> JSONResponse:
        """Readiness: whether a new upload would be admitted, and how deep the queues are."""
        busy = in_flight()
        full = busy >= settings.max_queue
        body = Readiness(status="full" if full else "ready", in_flight=busy, max_queue=settings.max_queue,
                         queue_depth=queue.depth, transcribing=transcription.depth,
                         max_transcribing=settings.max_transcribing)
        return JSONResponse(body.model_dump(), status_code=503 if full else 200)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def app_from_environment() -> FastAPI:
    """The app for one uvicorn worker process: checkpoint and settings from `SETTINGS_ENV` (set by `serve`)."""
    options = json.loads(os.environ[SETTINGS_ENV])
    threads = os.environ.get("EMOFUSE_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    for field in ("cors_origins", "allowed_hosts"):
        if field in options:
            options[field] = tuple(options[field])
    return create_app(load(options.pop("checkpoint"), feature_memory=SERVICE_FEATURE_MEMORY), ServeSettings(**options))


#: A service keeps no clip's features for the next request: every upload is new, and one request's data
#: must never answer another's.
SERVICE_FEATURE_MEMORY = 0

#: Seconds a worker process may take to answer the supervisor's health check (loading a model on a busy
#: machine can starve it); uvicorn's default of 5 s kills workers still loading, in a loop.
WORKER_HEALTHCHECK_S = 300


def serve(checkpoint: Path, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          settings: ServeSettings | None = None, log_level: str = "info",
          warn: Callable[[str], None] = lambda line: None) -> None:
    """Run the service until interrupted; the checkpoint is loaded (and any error raised) before it listens,
    and each of `startup_warnings` is handed to `warn` (the CLI prints them)."""
    import inspect

    import uvicorn

    settings = settings or ServeSettings()
    predictor = load(checkpoint, feature_memory=SERVICE_FEATURE_MEMORY)
    for line in startup_warnings(model_card(predictor, settings), settings, host):
        warn(line)
    if workers == 1:
        uvicorn.run(create_app(predictor, settings), host=host, port=port, log_level=log_level)
        return
    del predictor  # it loaded: each worker process now loads its own copy
    os.environ[SETTINGS_ENV] = json.dumps({"checkpoint": str(Path(checkpoint).resolve()), **asdict(settings)})
    patience = ({"timeout_worker_healthcheck": WORKER_HEALTHCHECK_S}
                if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters else {})
    uvicorn.run("emofuse.core.apps.serve:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_level=log_level, **patience)


__all__ = ["BatchingQueue", "Prediction", "ServeSettings", "TranscriptionService", "UploadError",
           "app_from_environment", "create_app", "model_card", "serve", "startup_warnings"]
