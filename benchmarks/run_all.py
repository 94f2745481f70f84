"""Every benchmark in one command, one table: throughput, overheads, latency and peak memory per stage.

    HF_HUB_OFFLINE=1 python benchmarks/run_all.py [--quick] [--json results.json]

Each stage runs in its own process (so its peak resident memory, from ``wait4``'s rusage, is its
own) with small sizes by default; the existing benchmark scripts do the measuring:

- ``data``: `bench_data.py` — decode + preprocess clips/s (RAVDESS .ogg audio, CREMA-D .flv frames +
  audio), frozen backbone embedding clips/s (epoch 1 over raw media, `mm-lstm`: MiniLM + log-mel),
  and the same epoch over cached features.
- ``trainer``: `bench_trainer.py` — training step overhead of `fit` against a bare PyTorch loop, and
  a fusion epoch over cached branch logits against recomputed branches.
- ``search``: `bench_search.py` — Optuna trials over cached logits against recomputation.
- ``predict``: this file — trains a tiny `mm-lstm` model on RAVDESS, then `Predictor.predict` on
  single .ogg paths: latency per clip (decode + frozen backbone + head), first call apart.

torch runs on one thread in every stage (``--threads`` to change), and the load average is printed,
because on a shared 2-core machine other processes move every number.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent


def run_stage(args: list[str], *, threads: int) -> tuple[str, float, float, int]:
    """(stdout, wall seconds, peak RSS MiB of the process tree's largest process, exit code)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=HERE.parent)
    out = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return out, time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode


def _number(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def _json_block(text: str) -> dict[str, Any]:
    start, end = text.find("{"), text.rfind("}")
    return json.loads(text[start:end + 1]) if start >= 0 else {}


def stage_data(quick: bool, threads: int, work: Path) -> list[dict[str, Any]]:
    out, wall, rss, rc = run_stage([str(HERE / "bench_data.py"), "--clips", "32" if quick else "96", "--workers", "2",
                                    "--video-repeats", "2" if quick else "4", "--threads", str(threads)],
                                   threads=threads)
    epoch1 = re.search(r"epoch 1 over raw media \(\S+, (\d+) backbone runs\):\s*([\d.]+) s", out)
    epoch2 = re.search(r"epoch 2 over cached features \((\d+) cache hits.*?\):\s*([\d.]+) s", out)
    rows = [
        {"stage": "decode+preprocess RAVDESS .ogg", "value": _number(r"RAVDESS \.ogg.*?:\s*([\d.]+) clips/s", out),
         "unit": "clips/s"},
        {"stage": "decode+preprocess CREMA-D .flv (8 frames + audio)",
         "value": _number(r"CREMA-D \.flv.*?:\s*([\d.]+) clips/s", out), "unit": "clips/s"},
        {"stage": "backbone embedding (mm-lstm, raw media, decode incl.)",
         "value": int(epoch1.group(1)) / float(epoch1.group(2)) if epoch1 else None, "unit": "clips/s"},
        {"stage": "same epoch over cached features",
         "value": int(epoch2.group(1)) / float(epoch2.group(2)) if epoch2 else None, "unit": "clips/s"},
    ]
    return _stamp(rows, wall, rss, rc, out)


def stage_trainer(quick: bool, threads: int, work: Path) -> list[dict[str, Any]]:
    result = work / "trainer.json"
    out, wall, rss, rc = run_stage([str(HERE / "bench_trainer.py"), "--epochs", "2" if quick else "3",
                                    "--repeats", "2" if quick else "3", "--fusion-epochs", "2",
                                    "--threads", str(threads), "--out", str(result)], threads=threads)
    report = json.loads(result.read_text()) if result.is_file() else {}
    o, f = report.get("overhead", {}), report.get("fusion", {})
    ms = o.get("ms_per_step", {})
    rows = [
        {"stage": "training step: trainer vs bare loop", "value": o.get("ratio_training_wall"), "unit": "x (ratio)",
         "note": f"{ms.get('train_wall', float('nan')):.2f} vs {ms.get('bare_wall', float('nan')):.2f} ms/step"},
        {"stage": "fusion epoch: cached logits vs recomputed branches", "value": f.get("speedup_per_epoch"),
         "unit": "x faster",
         "note": f"{1e3 * f.get('cached', {}).get('train_s_per_epoch', float('nan')):.1f} vs "
                 f"{1e3 * f.get('recomputed', {}).get('train_s_per_epoch', float('nan')):.1f} ms/epoch"},
    ]
    return _stamp(rows, wall, rss, rc, out)


def stage_search(quick: bool, threads: int, work: Path) -> list[dict[str, Any]]:
    result = work / "search.json"
    out, wall, rss, rc = run_stage([str(HERE / "bench_search.py"), "--trials", "4" if quick else "10",
                                    "--recompute-trials", "2" if quick else "3", "--branch-epochs", "3",
                                    "--fusion-epochs", "3", "--threads", str(threads), "--json", str(result)],
                                   threads=threads)
    r = json.loads(result.read_text()) if result.is_file() else {}
    rows = [{"stage": "Optuna trial: cached logits vs recomputation", "value": r.get("ratio_per_trial"),
             "unit": "x faster",
             "note": f"{r.get('cached', {}).get('trial_s_mean', float('nan')):.2f} vs "
                     f"{r.get('recompute', {}).get('trial_s_mean', float('nan')):.2f} s/trial, "
                     f"same values: {r.get('same_trial_values')}"}]
    return _stamp(rows, wall, rss, rc, out)


def stage_predict(quick: bool, threads: int, work: Path) -> list[dict[str, Any]]:
    out, wall, rss, rc = run_stage([str(Path(__file__).resolve()), "--predict-worker", str(work / "predict"),
                                    "--clips", "8" if quick else "24", "--threads", str(threads)], threads=threads)
    r = _json_block(out.split("PREDICT ", 1)[1]) if "PREDICT " in out else {}
    rows = [{"stage": "predict latency per clip (.ogg -> label, mm-lstm)", "value": r.get("median_ms"), "unit": "ms",
             "note": f"p90 {r.get('p90_ms', float('nan')):.0f} ms, first call {r.get('first_ms', float('nan')):.0f} ms, "
                     f"load {r.get('load_s', float('nan')):.1f} s"}]
    return _stamp(rows, wall, rss, rc, out)


def predict_worker(folder: Path, clips: int, threads: int) -> int:
    """Train a tiny audio+text model once, then time `Predictor.predict` on one clip at a time."""
    import torch

    torch.set_num_threads(threads)
    import emofuse
    from emofuse.core.config import validate

    config = validate({"name": "tiny", "output_dir": str(folder), "preset": "mm-lstm",
                       "data": {"dataset": "ravdess", "limit": 48},
                       "branches": {"audio_text": {"name": "mm-lstm"}},
                       "train": {"epochs": 1, "batch_size": 16, "seed": 0}})
    result = emofuse.train(config)
    start = time.perf_counter()
    predictor = emofuse.load(result.checkpoint, device="cpu", batch_size=1)
    load_s = time.perf_counter() - start
    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "ravdess-speech"
    paths = sorted(data.glob("Actor_1[12]/*.ogg"))[:clips + 1]
    times = []
    for path in paths:
        t = time.perf_counter()
        (row,) = predictor.predict([path], text="Kids are talking by the door")
        times.append(1e3 * (time.perf_counter() - t))
        assert row.get("label") or row.get("error"), row
    steady = times[1:]
    q = statistics.quantiles(steady, n=10) if len(steady) > 1 else steady * 9
    print("PREDICT " + json.dumps({"first_ms": times[0], "median_ms": statistics.median(steady), "p90_ms": q[-1],
                                   "clips": len(steady), "load_s": load_s}), flush=True)
    return 0


def _stamp(rows: list[dict[str, Any]], wall: float, rss: float, rc: int, out: str) -> list[dict[str, Any]]:
    for row in rows:
        row.update(stage_wall_s=wall, peak_rss_mib=rss, ok=rc == 0)
    if rc != 0:
        print(out[-3000:], file=sys.stderr)
    return rows


STAGES: dict[str, Callable[[bool, int, Path], list[dict[str, Any]]]] = {
    "data": stage_data, "trainer": stage_trainer, "search": stage_search, "predict": stage_predict,
}


def print_table(rows: list[dict[str, Any]], header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=header)
    for col, justify in (("stage", "left"), ("value", "right"), ("unit", "left"), ("note", "left"),
                         ("process wall s", "right"), ("peak RSS MiB", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        value = r.get("value")
        table.add_row(r["stage"] + ("" if r["ok"] else " [red](failed)[/]"),
                      "n/a" if value is None else f"{value:.2f}", r["unit"], r.get("note", ""),
                      f"{r['stage_wall_s']:.1f}", f"{r['peak_rss_mib']:.0f}")
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smallest sizes (a few minutes on 2 cores)")
    parser.add_argument("--only", action="append", choices=sorted(STAGES), help="run only these stages")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in every stage")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--predict-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--clips", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.predict_worker is not None:
        return predict_worker(args.predict_worker, args.clips, args.threads)
    load = os.getloadavg()
    header = (f"emofuse benchmarks: {len(os.sched_getaffinity(0))} cores, torch threads {args.threads}, "
              f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="emofuse-bench-") as tmp:
        for name in args.only or list(STAGES):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows += STAGES[name](args.quick, args.threads, Path(tmp))
    print_table(rows, header + f" (end: {os.getloadavg()[0]:.1f})")
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
