"""Load test of `emofuse serve` on loopback: requests/s and p50/p95 latency for 1, 4 and 16 concurrent
clients, with batching (the default queue) and without (``--max-batch 1``), then a mixed load where one
upload in ``--transcribe-every`` comes without its transcript (so the service transcribes its speech, on
its own thread) and the others bring theirs: p95 of each kind, to show that transcriptions do not delay
the requests that need none.

    HF_HUB_OFFLINE=1 python benchmarks/bench_serve.py [--checkpoint runs/x/model.safetensors]
        [--requests 96] [--concurrency 1,4,16] [--time-cap 60] [--threads 1] [--transcribe-every 4]
        [--markdown out.md]

Bounded on purpose: the script starts the server itself on a free port of 127.0.0.1 (and nowhere
else), sends a fixed number of requests per level, stops a level when its time cap is reached, stops
the server, and exits. Each request uploads one real RAVDESS clip (cycled over 24 clips of 4 actors)
with its transcript, the way a client of the service would. Without ``--checkpoint`` it first trains
the same tiny `mm-lstm` model as `run_all.py`'s predict stage (48 clips, 1 epoch: seconds). In the mixed
load the server keeps no transcripts in memory (``--transcript-memory 0``), so every clip sent without
its transcript is really transcribed.

Latency is measured at the client, from sending the upload to reading the whole answer. "mean batch"
is the number of clips the service scored together with each request, from its own timings.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import httpx

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}


@dataclass
class Level:
    """What one concurrency level measured."""

    mode: str
    clients: int
    #: Every n-th upload is sent without its transcript (None: all bring it).
    transcribe_every: int | None = None
    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    #: The latencies of the uploads sent without a transcript (mixed load only).
    transcribed_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    capped: bool = False

    def rows(self) -> list[dict[str, object]]:
        """One row; in a mixed load, one per kind of upload (with its transcript, transcribed)."""
        if self.transcribe_every is None:
            return [self._row(self.mode, self.latencies_ms, self.batch_sizes)]
        return [self._row(f"{self.mode}: with transcript", self.latencies_ms, self.batch_sizes),
                self._row(f"{self.mode}: transcribed", self.transcribed_ms, [])]

    def _row(self, mode: str, latencies: list[float], batch_sizes: list[int]) -> dict[str, object]:
        ok = len(latencies)
        q = statistics.quantiles(latencies, n=20, method="inclusive") if ok >= 2 else [float("nan")] * 19
        return {"mode": mode, "clients": self.clients, "ok": ok, "errors": len(self.errors),
                "rps": ok / self.wall_s if self.wall_s else float("nan"),
                "p50_ms": statistics.median(latencies) if ok else float("nan"), "p95_ms": q[18],
                "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else float("nan"),
                "capped": self.capped}


def real_clips(count: int = 24) -> list[tuple[str, bytes, str]]:
    """(file name, bytes, transcript) of `count` RAVDESS clips from actors 1-4."""
    paths = [p for actor in ("01", "02", "03", "04")
             for p in sorted((DATA / "ravdess-speech" / f"Actor_{actor}").glob("*.ogg"))[: count // 4]]
    if not paths:
        raise SystemExit(f"no RAVDESS clips under {DATA}: this benchmark uploads real clips")
    return [(p.name, p.read_bytes(), STATEMENTS[p.stem.split("-")[4]]) for p in paths]


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_tiny_model(folder: Path, threads: int) -> Path:
    """The tiny audio+text model of `run_all.py`'s predict stage, trained here (seconds)."""
    import torch

    torch.set_num_threads(threads)
    import emofuse
    from emofuse.core.config import validate

    config = validate({"name": "tiny", "output_dir": str(folder), "preset": "mm-lstm",
                       "data": {"dataset": "ravdess", "data_dir": str(DATA), "limit": 48},
                       "branches": {"audio_text": {"name": "mm-lstm"}},
                       "train": {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu"}})
    return emofuse.train(config, resume=False).checkpoint


class Server:
    """`emofuse serve` in a child process on a free loopback port, stopped on exit."""

    def __init__(self, checkpoint: Path, *, log: Path, max_batch: int = 8, window_ms: float = 5.0, threads: int = 1,
                 options: Sequence[str] = (), env: dict[str, str] | None = None):
        self.port = free_loopback_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.command = [sys.executable, "-m", "emofuse.cli.app", "--threads", str(threads), "serve", str(checkpoint),
                        "--host", "127.0.0.1", "--port", str(self.port), "--max-batch", str(max_batch),
                        "--batch-window-ms", str(window_ms), *options]
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **self.env}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"emofuse serve did not start: {self.log.read_text()[-2000:]}")

    def __exit__(self, *_) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def run_level(url: str, level: Level, clips: list[tuple[str, bytes, str]], requests: int,
                    time_cap_s: float) -> Level:
    """`level.clients` clients share `requests` uploads; none starts after the time cap."""
    next_index = iter(range(requests))
    limits = httpx.Limits(max_connections=level.clients, max_keepalive_connections=level.clients)
    async with httpx.AsyncClient(base_url=url, timeout=max(30.0, time_cap_s), limits=limits) as http:
        start = time.perf_counter()

        async def client() -> None:
            for i in next_index:
                if time.perf_counter() - start > time_cap_s:
                    level.capped = True
                    return
                name, data, text = clips[i % len(clips)]
                transcribed = level.transcribe_every is not None and i % level.transcribe_every == 0
                level.sent += 1
                sent = time.perf_counter()
                try:
                    response = await http.post("/v1/predict", files={"file": (name, data)},
                                               data={} if transcribed else {"transcript": text})
                except httpx.HTTPError as exc:
                    level.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    level.errors.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                if transcribed:
                    level.transcribed_ms.append((time.perf_counter() - sent) * 1e3)
                    continue
                level.latencies_ms.append((time.perf_counter() - sent) * 1e3)
                level.batch_sizes.append(response.json()["timings"]["batch_size"])

        await asyncio.gather(*(client() for _ in range(level.clients)))
        level.wall_s = time.perf_counter() - start
    return level


def warm_up(url: str, clips: list[tuple[str, bytes, str]], transcribe: bool = False) -> None:
    """A few requests first, so lazy imports and first-call allocations are not measured (the transcriber's
    model too, for a mixed load)."""
    for name, data, text in clips[:3]:
        httpx.post(f"{url}/v1/predict", files={"file": (name, data)}, data={"transcript": text},
                   timeout=120).raise_for_status()
    if transcribe:
        name, data, _ = clips[-1]
        httpx.post(f"{url}/v1/predict", files={"file": (name, data)}, timeout=120).raise_for_status()


def markdown(rows: list[dict[str, object]], header: str) -> str:
    lines = [header, "",
             "| mode | clients | requests ok | errors | requests/s | p50 ms | p95 ms | mean batch |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        capped = " (time cap)" if r["capped"] else ""
        lines.append(f"| {r['mode']} | {r['clients']} | {r['ok']}{capped} | {r['errors']} | {r['rps']:.1f} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['mean_batch']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="model to serve (default: train a tiny mm-lstm here)")
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency level and mode")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--time-cap", type=float, default=60.0, help="seconds after which a level sends no more")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    parser.add_argument("--max-batch", type=int, default=8, help="the batching mode's largest batch")
    parser.add_argument("--window-ms", type=float, default=5.0, help="the batching mode's window")
    parser.add_argument("--transcribe-every", type=int, default=4,
                        help="mixed load: every n-th upload comes without its transcript (0: no mixed load)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    clips = real_clips()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as work:
        work_dir = Path(work)
        checkpoint = args.checkpoint or train_tiny_model(work_dir / "runs", args.threads)
        rows = []
        modes = [(f"batching (max {args.max_batch}, {args.window_ms:g} ms window)", args.max_batch, args.window_ms, None),
                 ("no batching (max 1)", 1, 0.0, None)]
        if args.transcribe_every > 0:
            modes.append((f"mixed (1 in {args.transcribe_every} transcribed)", args.max_batch, args.window_ms,
                          args.transcribe_every))
        for mode, max_batch, window, every in modes:
            options = ["--transcript-memory", "0"] if every else []
            with Server(checkpoint, max_batch=max_batch, window_ms=window, threads=args.threads, options=options,
                        log=work_dir / f"server-{max_batch}-{every}.log") as server:
                warm_up(server.url, clips, transcribe=every is not None)
                for clients in levels:
                    level = asyncio.run(run_level(server.url, Level(mode, clients, every), clips, args.requests,
                                                  args.time_cap))
                    rows += level.rows()
                    for row in level.rows():
                        print(markdown([row], "").splitlines()[-1], flush=True)
                    for error in level.errors[:3]:
                        print(f"  error: {error}", file=sys.stderr)
    load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (f"`emofuse serve` on 127.0.0.1, {os.cpu_count()} cores, torch threads {args.threads}, 1 worker; "
              f"{args.requests} uploads of real RAVDESS .ogg clips per level (with transcript, but for the mixed load's "
              f"transcribed ones); "
              f"load average {load_before} at the start, {load_after} at the end; {time.strftime('%d %b %Y')}.")
    table = markdown(rows, header)
    print("\n" + table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table, encoding="utf-8")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
