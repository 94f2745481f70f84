"""`emofuse serve` on real sockets, on loopback: a client that trickles its body is cut off, two worker
processes answer under load (uvicorn's supervisor does not kill workers still loading the model), and
the command warns before it listens. Bounded: a free port of 127.0.0.1, a few requests, each server
stopped after its test."""
from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from emofuse.core.apps.predict import load
from emofuse.core.apps.serve import ServeSettings, create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_serve import Server, free_loopback_port  # noqa: E402

STATEMENT = "Kids are talking by the door"


@pytest.fixture(scope="module")
def speech(shared_data) -> bytes:
    return sorted((shared_data / "ravdess-speech" / "Actor_02").glob("*.ogg"))[0].read_bytes()


def running(app):
    """`app` under uvicorn in a thread of this process, on a free loopback port: (port, stop)."""
    import uvicorn

    port = free_loopback_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join(timeout=30)

    return port, stop


@pytest.fixture(scope="module")
def predictor(speech_fusion_checkpoint):
    return load(speech_fusion_checkpoint, device="cpu")


@pytest.fixture
def listening(predictor):
    """The service with a body timeout of 1 s."""
    port, stop = running(create_app(predictor, ServeSettings(body_timeout_s=1.0)))
    try:
        yield port
    finally:
        stop()


def test_a_client_that_trickles_its_body_is_cut_off(listening):
    with socket.create_connection(("127.0.0.1", listening), timeout=10) as conn:
        conn.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b")
        started = time.monotonic()
        answer = b""
        while chunk := conn.recv(65536):  # until the server closes the connection
            answer += chunk
            assert time.monotonic() - started < 8
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer
    assert 0.8 < waited < 5
    assert httpx.get(f"http://127.0.0.1:{listening}/healthz", timeout=10).status_code == 200


def test_a_client_that_hangs_up_stops_its_transcription(predictor, speech):
    """Over a real socket: the request is sent whole, then the connection is closed while it is transcribed."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_serve_traffic import HeldTranscriber

    held = HeldTranscriber()
    port, stop = running(create_app(predictor, ServeSettings(), transcribe_clip=held))
    try:
        request = httpx.Request("POST", f"http://127.0.0.1:{port}/v1/predict", files={"file": ("a.ogg", speech)})
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(f"POST /v1/predict HTTP/1.1\r\n{head}\r\n".encode() + request.read())
            assert held.started.wait(10)
        assert held.cancelled.wait(3)  # stopped within a poll of the hang-up, not run to its 10 s end
    finally:
        stop()


def test_two_workers_answer_under_load(speech_fusion_checkpoint, tmp_path, speech):
    with Server(speech_fusion_checkpoint, log=tmp_path / "server.log", options=["--workers", "2"]) as server:
        deadline = time.monotonic() + 180
        while server.log.read_text().count("Application startup complete") < 2:
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.2)

        async def load_both():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                return await asyncio.gather(*(
                    http.post("/v1/predict", files={"file": (f"{i}.ogg", speech)}, data={"transcript": STATEMENT})
                    for i in range(12)))

        responses = asyncio.run(load_both())
        assert [r.status_code for r in responses] == [200] * 12
        log = server.log.read_text()
    assert log.count("Started server process") == 2 and "died" not in log  # no worker killed and restarted


def test_each_worker_is_given_time_to_load(speech_fusion_checkpoint, monkeypatch):
    """uvicorn's supervisor kills a worker that has not answered its ping within 5 s, by default: a model
    loading on a busy machine was killed and restarted in a loop."""
    import uvicorn

    from emofuse.core.apps import serve

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    serve.serve(speech_fusion_checkpoint, workers=2, port=0)
    assert calls[0]["workers"] == 2 and calls[0]["timeout_worker_healthcheck"] >= 120


def test_serve_warns_before_it_listens_beyond_loopback_without_a_key(speech_fusion_checkpoint, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from emofuse.cli.app import app

    listened = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: listened.append(kwargs["host"]))
    monkeypatch.delenv("EMOFUSE_API_KEY", raising=False)
    result = CliRunner().invoke(app, ["serve", str(speech_fusion_checkpoint), "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 0 and listened == ["0.0.0.0"], result.output
    assert "without an API key" in result.output and "--allowed-host" in result.output
    quiet = CliRunner().invoke(app, ["serve", str(speech_fusion_checkpoint), "--port", "0"])
    assert quiet.exit_code == 0 and "warning" not in quiet.output
    missing = CliRunner().invoke(app, ["serve", str(speech_fusion_checkpoint), "--api-key-env", "NO_SUCH_VAR_33"])
    assert missing.exit_code != 0 and "NO_SUCH_VAR_33" in missing.output
