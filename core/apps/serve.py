"""The prediction service behind `emofuse serve`: an HTTP API and a page over one loaded checkpoint.

FastAPI + uvicorn: the Python ecosystem's standard pair for a typed JSON API, with an OpenAPI schema
generated from the same type hints that validate each request. The model loads once per worker
process; uploads go through the same `Predictor.decode`/`Predictor.score` route as `emofuse predict`,
so a clip gets the same probabilities either way. Requests that arrive within a few milliseconds of
each other are scored as one batch on one model thread (`BatchingQueue`).

An upload is stored, under a neutral name, in a temporary folder of its own that is removed when its
request ends; what it is (audio or video, how long) is found by opening it with PyAV, never from its
name; nothing a request sends names a file on the server.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Awaitable, Callable, Generic, Literal, Sequence, TypeVar

from emofuse.core.errors import DataError, EmofuseError, MissingDependencyError

try:
    from fastapi import FastAPI, File, Form, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, Field
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - the `serve` extra is not installed
    raise MissingDependencyError(f"emofuse serve needs FastAPI ({exc.name} is not installed)",
                                 hint="pip install 'emofuse[serve]'") from None

from emofuse import __version__
from emofuse.core.apps.predict import Predictor, load, sample_from_media
from emofuse.core.data.decode import media_duration, probe
from emofuse.core.types import Sample

#: Where `app_from_environment` finds the checkpoint and settings in each uvicorn worker process.
SETTINGS_ENV = "EMOFUSE_SERVE_SETTINGS"
#: Room for the multipart framing and the form fields around the uploaded file.
_FORM_OVERHEAD_BYTES = 64 * 1024
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """What one service accepts and how it batches; every field is a `emofuse serve` option."""

    #: Largest upload accepted, in megabytes (10^6 bytes).
    max_upload_mb: float = 20.0
    #: Longest clip accepted, in seconds, measured from the file's packets.
    max_seconds: float = 60.0
    #: Longest transcript accepted, in characters.
    max_transcript_chars: int = 2000
    #: Requests arriving within this many milliseconds of the first are scored together.
    batch_window_ms: float = 5.0
    #: Most clips in one batch; 1 scores each request alone (no batching).
    max_batch: int = 8
    #: Parent of the per-request upload folders (default: the system's temporary folder).
    temp_dir: str | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)


class UploadError(EmofuseError):
    """An upload the service refuses; `status` is the HTTP status it answers with."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


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


# --- uploads -----------------------------------------------------------------------------------------
@dataclass
class Upload:
    """A stored upload, checked: the sample to score and what its content turned out to be."""

    sample: Sample
    name: str
    kind: Literal["audio", "video"]
    seconds: float


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
    """Open the stored file with PyAV: refuse what is not media, is too long, or has nothing the model reads."""
    try:
        seconds = media_duration(stored)
    except DataError as exc:
        raise UploadError(415, f"{name}: {_scrub(exc.message, stored, name)} (upload an audio or video file)") from None
    if seconds > settings.max_seconds:
        raise UploadError(413, f"{name}: the clip lasts {seconds:.1f} s; this service takes at most "
                               f"{settings.max_seconds:g} s")
    try:
        sample = sample_from_media(stored, text=transcript, modalities=predictor.media_modalities(transcript),
                                   sample_id=sample_id,
                                   by_content=True)
    except DataError as exc:
        raise UploadError(422, f"{name}: {_scrub(exc.message, stored, name)}") from None
    sample.age = age
    sample.gender = gender
    return Upload(sample, name, "video" if probe(stored).has_video else "audio", seconds)


def _scrub(message: str, stored: Path, name: str) -> str:
    """An error's one line with the server's temporary path taken out."""
    text = message.replace(f"{stored}: ", "").replace(str(stored), name).replace(str(stored.parent), "")
    return " ".join(text.split())


# --- responses ---------------------------------------------------------------------------------------
class Timings(BaseModel):
    """Milliseconds spent on each step of one request."""

    upload_ms: float = Field(description="receiving, storing and inspecting the upload")
    queue_ms: float = Field(description="waiting for the model thread and for the batch to fill")
    decode_ms: float = Field(description="decoding the batch this clip was scored in")
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
                                               "speech transcribed (Whisper tiny.en) when none was; null if none")
    transcribed: bool = Field(False, description="true when `transcript` was transcribed from the clip's speech")
    explanation: str | None = Field(None, description="an image explaining a video prediction, as a data: URL, "
                                                      "when the predictor provides one; null otherwise")
    media: Literal["audio", "video"] = Field(description="what the upload's content turned out to be")
    seconds: float = Field(description="the clip's length, measured from its packets")
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


class ModelCard(BaseModel):
    """What `GET /v1/model` answers: enough to know what the model reads and where it came from."""

    name: str
    classes: list[str] = Field(description="the class names, in the order of every probability table")
    modalities: list[str] = Field(description="what the model reads from a clip and the form")
    branches: dict[str, BranchCard]
    fusion: str | None
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


def model_card(predictor: Predictor, settings: ServeSettings) -> dict[str, Any]:
    """Classes, branches, the components with the plugin versions that made them, and training metrics."""
    meta = predictor.loaded.meta
    config = predictor.loaded.config
    return _finite({
        "name": config.name,
        "classes": list(predictor.label_names),
        "modalities": list(predictor.modalities),
        "branches": {name: {"encoder": ref.name, "modalities": sorted(predictor.model.branches[name].modalities)}
                     for name, ref in config.branches.items()},
        "fusion": config.fusion.name if config.fusion is not None else None,
        "components": meta.get("components", []),
        "metrics": meta.get("metrics", {}),
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


# --- the app -----------------------------------------------------------------------------------------
class BodySizeLimit:
    """Refuses a request body over `max_bytes`: by its Content-Length before reading it, else as it streams in.

    FastAPI's own route limit answers plain text; this answers with the same JSON ``detail`` line as
    every other refusal, naming the limit.
    """

    def __init__(self, app: Any, max_bytes: int, detail: str):
        self.app = app
        self.max_bytes = max_bytes
        self.detail = detail

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.detail)
            return message

        await self.app(scope, counted, send)


def page_html() -> str:
    """The one page served at ``/`` (shipped as package data)."""
    return resources.files("emofuse.core.apps").joinpath("static", "index.html").read_text(encoding="utf-8")


def create_app(predictor: Predictor, settings: ServeSettings | None = None) -> FastAPI:
    """The service over an already loaded `predictor` (tests and `emofuse serve` build it the same way)."""
    settings = settings or ServeSettings()
    ids = itertools.count()

    def run_batch(samples: list[Sample]) -> list[tuple[dict[str, Any], dict[str, float]]]:
        start = time.perf_counter()
        if predictor.transcribe:  # clips without a transcript: their speech, transcribed (cached per clip)
            samples = predictor.with_transcripts(list(samples))  # one Sample back per Sample given
        clips = predictor.decode(samples)
        decoded = time.perf_counter()
        records = predictor.score(clips)
        scored = time.perf_counter()
        timing = {"decode_ms": (decoded - start) * 1e3, "model_ms": (scored - decoded) * 1e3,
                  "batch_size": len(samples), "started": start}
        return [(record, timing) for record in records]

    queue: BatchingQueue[Sample, tuple[dict[str, Any], dict[str, float]]] = BatchingQueue(
        run_batch, max_batch=settings.max_batch, window_s=settings.batch_window_ms / 1e3)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await queue.start()
        try:
            yield
        finally:
            await queue.stop()

    app = FastAPI(title="emofuse", version=__version__, lifespan=lifespan,
                  description="Emotion recognition from an audio or video clip, with an optional transcript "
                              "and speaker metadata, by one trained emofuse checkpoint.")
    card = model_card(predictor, settings)
    page = page_html()
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes + _FORM_OVERHEAD_BYTES
                       + 4 * settings.max_transcript_chars,
                       detail=f"upload is over this service's {settings.max_upload_mb:g} MB limit")

    @app.exception_handler(UploadError)
    async def _refused(_, exc: UploadError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'request'}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    refusals = {code: {"model": ErrorDetail, "description": why} for code, why in (
        (400, "empty upload"), (413, "upload too large or clip too long"),
        (415, "not an audio or video file PyAV can read"),
        (422, "missing or invalid field, no stream the model reads, or a clip that fails to decode"))}

    @app.post("/v1/predict", response_model=Prediction, responses=refusals)
    async def predict(
        file: UploadFile = File(description="an audio or video clip in any container PyAV reads"),
        transcript: str | None = Form(None, max_length=settings.max_transcript_chars,
                                      description="what is said in the clip; used by models that read text"),
        age: float | None = Form(None, ge=0, le=130, description="the speaker's age in years"),
        gender: Literal["male", "female", "unknown"] | None = Form(None, description="the speaker's gender"),
    ) -> Prediction:
        received = time.perf_counter()
        name = display_name(file.filename)
        with tempfile.TemporaryDirectory(prefix="emofuse-upload-", dir=settings.temp_dir) as folder:
            stored = await store_upload(file, Path(folder), settings)
            upload = await run_in_threadpool(
                inspect_upload, stored, name, f"upload-{next(ids)}", predictor, settings,
                transcript=(transcript or None), age=age, gender=gender)
            inspected = time.perf_counter()
            record, timing = await queue.submit(upload.sample)
            if "error" in record:
                raise UploadError(422, f"{name}: {_scrub(record['error'], stored, name)}")
        done = time.perf_counter()
        return Prediction(
            id=name, label=record["label"], probabilities=record["probabilities"], branches=record["branches"],
            modalities=record["modalities"], transcript=record.get("transcript"),
            transcribed=bool(record.get("transcribed")),
            explanation=record.get("explanation"), media=upload.kind, seconds=round(upload.seconds, 3),
            timings=Timings(upload_ms=(inspected - received) * 1e3, queue_ms=(timing["started"] - inspected) * 1e3,
                            decode_ms=timing["decode_ms"], model_ms=timing["model_ms"], total_ms=(done - received) * 1e3,
                            batch_size=timing["batch_size"]))

    @app.get("/v1/model", response_model=ModelCard)
    async def model() -> dict[str, Any]:
        """The model card: classes, branches, components with their plugin versions, training metrics, limits."""
        return card

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", model=card["name"], max_batch=settings.max_batch)

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
    return create_app(load(options.pop("checkpoint")), ServeSettings(**options))


def serve(checkpoint: Path, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          settings: ServeSettings | None = None, log_level: str = "info") -> None:
    """Run the service until interrupted; the checkpoint is loaded (and any error raised) before it listens."""
    import uvicorn

    settings = settings or ServeSettings()
    predictor = load(checkpoint)
    if workers == 1:
        uvicorn.run(create_app(predictor, settings), host=host, port=port, log_level=log_level)
        return
    del predictor  # it loaded: each worker process now loads its own copy
    os.environ[SETTINGS_ENV] = json.dumps({"checkpoint": str(Path(checkpoint).resolve()), **asdict(settings)})
    uvicorn.run("emofuse.core.apps.serve:app_from_environment", factory=True, host=host, port=port,
                workers=workers, log_level=log_level)


__all__ = ["BatchingQueue", "Prediction", "ServeSettings", "UploadError", "app_from_environment", "create_app",
           "model_card", "serve"]
