"""The prediction service in process (FastAPI's test client, httpx over ASGI): the same answers as
`emofuse predict`, batching that changes no answer, bad uploads refused with one line while the service
keeps answering, nothing left in the temporary folder, and no request that can name a server path."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from emofuse.core.apps.predict import load, predict_files
from emofuse.core.apps.serve import BatchingQueue, ServeSettings, create_app, display_name
from emofuse.core.data.decode import media_duration

STATEMENT = "Kids are talking by the door"
#: The service answers loopback host names only (by default): the test client must use one.
LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def predictor(speech_fusion_checkpoint):
    return load(speech_fusion_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def clips(shared_data) -> dict[str, Path]:
    ogg = sorted((shared_data / "ravdess-speech" / "Actor_02").glob("*.ogg"))
    media = shared_data / "crema-d" / "media"
    return {"ogg": ogg[0], "ogg2": ogg[7], "ogg3": ogg[21], "long": ogg[8], "flv": media / "1001_DFA_ANG_XX.flv",
            "mp3": media / "1002_DFA_HAP_XX.mp3"}


@pytest.fixture
def temp_root(tmp_path) -> Path:
    root = tmp_path / "uploads"
    root.mkdir()
    return root


@pytest.fixture
def client(predictor, temp_root):
    with TestClient(create_app(predictor, ServeSettings(max_upload_mb=0.3, max_seconds=4.0,
                                                        temp_dir=str(temp_root))), base_url=LOCAL) as c:
        yield c


def predicted_by_cli(checkpoint: Path, clip: Path, tmp_path: Path, text: str | None) -> dict:
    out = tmp_path / f"{clip.stem}.jsonl"
    assert not any("error" in r for r in predict_files(checkpoint, inputs=[clip], text=text, out=out))
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    return record


@pytest.mark.parametrize("kind, text", [("ogg", STATEMENT), ("flv", "Don't forget a jacket"), ("mp3", None)])
def test_answers_are_those_of_emofuse_predict(client, clips, speech_fusion_checkpoint, tmp_path, kind, text):
    clip = clips[kind]
    data = {"transcript": text} if text else {}
    # the upload's name says nothing: its content is sniffed (a .flv sent as "clip.bin" is still video)
    response = client.post("/v1/predict", files={"file": ("clip.bin", clip.read_bytes())}, data=data)
    assert response.status_code == 200, response.text
    got = response.json()
    expected = predicted_by_cli(speech_fusion_checkpoint, clip, tmp_path, text)
    for key in ("label", "probabilities", "branches", "modalities", "transcript"):
        assert got[key] == expected[key], key
    assert got["id"] == "clip.bin" and got["media"] == ("video" if kind == "flv" else "audio")
    assert list(got["probabilities"]) == client.get("/v1/model").json()["classes"]
    assert got["explanation"] is None
    if text is None:  # without a transcript the speech is transcribed, as `emofuse predict` does
        assert got["transcribed"] and got["transcript"] and got["branches"]["words"] and got["branches"]["speech"]
    else:
        assert not got["transcribed"] and got["transcript"] == text
    timings = got["timings"]
    assert timings["batch_size"] == 1 and timings["total_ms"] >= timings["decode_ms"] + timings["model_ms"] > 0
    assert 1.5 < got["seconds"] < 4.0


def test_concurrent_requests_are_batched_without_changing_answers(predictor, clips, speech_fusion_checkpoint,
                                                                  tmp_path):
    names = ["ogg", "ogg2", "ogg3", "mp3", "flv", "ogg", "ogg2", "mp3"]
    expected = {k: predicted_by_cli(speech_fusion_checkpoint, clips[k], tmp_path, STATEMENT) for k in set(names)}
    app = create_app(predictor, ServeSettings(max_batch=8, batch_window_ms=200))

    async def run() -> list[httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as http:
                return await asyncio.gather(*(
                    http.post("/v1/predict", files={"file": (f"{k}.{k[:3]}", clips[k].read_bytes())},
                              data={"transcript": STATEMENT}) for k in names))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(names)
    sizes = [r.json()["timings"]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes  # the 200 ms window grouped requests
    for name, response in zip(names, responses):
        got, want = response.json(), expected[name]
        assert got["label"] == want["label"] and got["modalities"] == want["modalities"]
        # A batch changes float32 sums by ~1e-8, which can move the 6th printed decimal by one unit.
        for branch in ("speech", "words"):
            assert_same_probabilities(got["branches"][branch], want["branches"][branch])
        assert_same_probabilities(got["probabilities"], want["probabilities"])


def assert_same_probabilities(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(want)
    assert max(abs(got[k] - want[k]) for k in want) <= 1.01e-6, (got, want)


def test_bad_uploads_get_one_line_4xx_and_the_service_keeps_answering(client, clips, temp_root, tmp_path):
    ogg = clips["ogg"].read_bytes()
    long_clip = clips["long"]  # 4.1 s, over this client's 4 s limit
    cases = [
        ("empty", ("a.ogg", b""), {}, 400, "upload is empty"),
        ("garbage", ("a.ogg", b"\x00garbage" * 500), {}, 415, "not a readable media file"),
        ("text as audio", ("notes.wav", b"hello, this is not audio at all\n" * 20), {}, 415, "notes.wav"),
        ("truncated", ("cut.ogg", ogg[:3000]), {}, 422, "truncated"),
        ("oversized", ("big.ogg", ogg + b"\0" * 300_000), {}, 413, "0.3 MB limit"),
        ("too long", ("long.ogg", long_clip.read_bytes()), {}, 413, "at most 4 s"),
        ("no file", None, {"transcript": "hi"}, 415, "multipart/form-data"),  # a urlencoded form holds no file
        ("bad metadata", ("a.ogg", ogg), {"age": "-4"}, 422, "age: Input should be greater than or equal to 0"),
        ("long transcript", ("a.ogg", ogg), {"transcript": "x" * 2001}, 422, "transcript: String should have at most"),
    ]
    assert media_duration(long_clip) > 4.0
    for what, file, data, status, words in cases:
        response = client.post("/v1/predict", files={"file": file} if file else None, data=data)
        detail = response.json()["detail"]
        assert response.status_code == status, (what, response.text)
        assert isinstance(detail, str) and words in detail and "\n" not in detail, (what, detail)
        assert str(tmp_path) not in detail and "/tmp" not in detail and "emofuse-upload" not in detail, (what, detail)
        assert client.post("/v1/predict", files={"file": ("ok.ogg", ogg)}).status_code == 200, what
    assert list(temp_root.iterdir()) == []  # every upload's folder is gone, refused or not


def test_a_body_streamed_without_length_is_cut_at_the_limit(client):
    def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.ogg\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 16_384  # 640 kB in all, over the 0.3 MB limit, with no Content-Length
        yield b"\r\n--b--\r\n"

    response = client.post("/v1/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "0.3 MB limit" in response.json()["detail"]
    assert client.get("/healthz").json()["status"] == "ok"


def test_no_request_can_name_a_server_path(client, clips):
    # a garbage upload named after a real clip on this machine: the named file is never read
    response = client.post("/v1/predict", files={"file": (str(clips["ogg"]), b"not audio" * 50)})
    assert response.status_code == 415
    assert str(clips["ogg"].parent) not in response.json()["detail"]
    sneaky = client.post("/v1/predict", files={"file": ("../../../../etc/passwd", clips["ogg"].read_bytes())})
    assert sneaky.status_code == 200 and sneaky.json()["id"] == "passwd"
    assert display_name("C:\\Users\\x\\clip.wav") == "clip.wav" and display_name("\x00\n") == "upload"
    # there is no field through which a path could be given: the schema's form has these four only
    schema = client.get("/openapi.json").json()
    ref = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    assert set(form["properties"]) == {"file", "transcript", "age", "gender"} and form["required"] == ["file"]


def test_model_card_health_and_page(client, predictor):
    card = client.get("/v1/model").json()
    assert card["name"] == "speech-fusion" and card["classes"] == predictor.label_names
    assert {name: (b["encoder"], b["modalities"], b["title"], b["uploads_feed_it"], b["note"])
            for name, b in card["branches"].items()} == {
        "speech": ("mm-lstm", ["audio", "metadata", "text"], "the voice and the words", True, None),
        "words": ("text-classifier", ["metadata", "text"], "the words", True, None)}
    # each branch's own accuracy, from the run's stage 1, beside the fused model's
    trained = predictor.loaded.meta["metrics"]
    for name, branch in card["branches"].items():
        assert branch["accuracy"]["test"] == trained["branches"][name]["test"]["accuracy"]
    assert card["accuracy"]["test"] == trained["test"]["accuracy"] and card["upload_warnings"] == []
    assert {(c["role"], c["distribution"]) for c in card["components"]} >= {("branches.speech", "emofuse"),
                                                                           ("fusion", "emofuse")}
    assert all(c["version"] for c in card["components"])
    assert 0.0 <= card["metrics"]["test"]["accuracy"] <= 1.0  # the training run's own figures
    assert card["limits"] == {"max_upload_mb": 0.3, "max_seconds": 4.0, "max_transcript_chars": 2000}
    assert client.get("/healthz").json() == {"status": "ok", "model": "speech-fusion", "max_batch": 8,
                                             "api_key_required": False}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="predict-form"' in page.text and "v1/predict" in page.text


def test_the_predictors_explanation_and_transcription_pass_through(predictor, clips, monkeypatch):
    """The places the video-explanation and Whisper work will fill: whatever the predictor's record
    carries as ``explanation`` and ``transcript`` is what the service answers."""
    scored = predictor.score

    def score_and_explain(decoded):
        records = scored(decoded)
        for record in records:
            record["explanation"] = "data:image/png;base64,iVBORw0KGgo="
            record["transcript"] = "what the transcriber heard"
        return records

    monkeypatch.setattr(predictor, "score", score_and_explain)
    with TestClient(create_app(predictor), base_url=LOCAL) as c:
        got = c.post("/v1/predict", files={"file": ("a.ogg", clips["ogg"].read_bytes())}).json()
    assert got["explanation"] == "data:image/png;base64,iVBORw0KGgo="
    assert got["transcript"] == "what the transcriber heard"


def test_batching_queue_groups_within_the_window_and_survives_a_failing_batch():
    calls: list[list[int]] = []

    def run_batch(items: list[int]) -> list[int]:
        calls.append(list(items))
        if -1 in items:
            raise ValueError("bad batch")
        time.sleep(0.02)
        return [i * 10 for i in items]

    async def scenario():
        queue = BatchingQueue(run_batch, max_batch=3, window_s=0.05)
        await queue.start()
        try:
            first = await asyncio.gather(*(queue.submit(i) for i in range(5)))
            failed = await asyncio.gather(queue.submit(-1), queue.submit(7), return_exceptions=True)
            after = await queue.submit(8)
        finally:
            await queue.stop()
        return first, failed, after

    first, failed, after = asyncio.run(scenario())
    assert first == [0, 10, 20, 30, 40]
    assert calls[:2] == [[0, 1, 2], [3, 4]]  # at most max_batch together, in arrival order
    assert [type(e) for e in failed] == [ValueError, ValueError]  # the whole batch's callers hear of it
    assert after == 80 and calls[-1] == [8]

    # without batching (max_batch 1) every item runs alone
    calls.clear()

    async def alone():
        queue = BatchingQueue(run_batch, max_batch=1, window_s=0.05)
        await queue.start()
        try:
            return await asyncio.gather(*(queue.submit(i) for i in range(3)))
        finally:
            await queue.stop()

    assert asyncio.run(alone()) == [0, 10, 20] and calls == [[0], [1], [2]]


def test_a_client_that_leaves_does_not_stop_the_queue():
    release = threading.Event()

    def run_batch(items):
        release.wait(5)
        return items

    async def scenario():
        queue = BatchingQueue(run_batch, max_batch=4, window_s=0.0)
        await queue.start()
        try:
            waiting = asyncio.create_task(queue.submit("gone"))
            await asyncio.sleep(0.05)
            waiting.cancel()
            release.set()
            return await asyncio.wait_for(queue.submit("next"), 5)
        finally:
            await queue.stop()

    assert asyncio.run(scenario()) == "next"


def test_each_worker_builds_its_app_from_the_environment(speech_fusion_checkpoint, monkeypatch):
    """`emofuse serve --workers N` hands the checkpoint and settings to each uvicorn worker process this way."""
    from emofuse.core.apps.serve import SETTINGS_ENV, app_from_environment

    monkeypatch.setenv(SETTINGS_ENV, json.dumps({"checkpoint": str(speech_fusion_checkpoint), "max_upload_mb": 5.0,
                                                 "max_seconds": 30.0, "max_batch": 4}))
    with TestClient(app_from_environment(), base_url=LOCAL) as c:
        assert c.get("/healthz").json() == {"status": "ok", "model": "speech-fusion", "max_batch": 4,
                                            "api_key_required": False}
        assert c.get("/v1/model").json()["limits"]["max_upload_mb"] == 5.0


def test_serve_command_refuses_a_missing_checkpoint_before_listening(tmp_path):
    from typer.testing import CliRunner

    from emofuse.cli.app import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nope.safetensors"), "--port", "0"])
    assert result.exit_code == 2
    assert "nope.safetensors: no such checkpoint" in result.output and "Traceback" not in result.output


def audio_with_cover_art(path: Path, seconds: float = 1.0) -> Path:
    """An MP4 audio file (AAC) whose video stream is only an attached still picture, as music files carry."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mp4") as out:
        audio = out.add_stream("aac", rate=48000)
        cover = out.add_stream("mjpeg", rate=1)
        cover.width = cover.height = 64
        cover.pix_fmt = "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24").reformat(format="yuvj420p")
        for packet in [*cover.encode(picture), *cover.encode(None)]:
            out.mux(packet)
        for start in range(0, int(48000 * seconds), 1024):
            frame = av.AudioFrame.from_ndarray((rng.standard_normal((1, 1024)) * 0.1).astype(np.float32),
                                               format="flt", layout="mono")
            frame.sample_rate, frame.pts = 48000, start
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    return path


def test_cover_art_does_not_make_audio_a_video(client, tmp_path):
    from emofuse.core.data.decode import probe

    song = audio_with_cover_art(tmp_path / "song.m4a")
    assert probe(song).has_video is False and 0.9 < media_duration(song) < 1.2
    got = client.post("/v1/predict", files={"file": ("song", song.read_bytes())}).json()
    assert got["media"] == "audio" and "video" not in got["modalities"]  # (noise may transcribe to a word)
