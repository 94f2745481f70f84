"""Faults: saves into a read-only or full folder, a feature-cache writer killed mid-write, and a
training run killed with SIGKILL at random moments that still ends exactly as an uninterrupted one.

Where the test runs as root and may mount, the read-only folder and the full disk are real (a tiny
tmpfs, remounted read-only); elsewhere they are simulated by making the write itself fail the way
the kernel would (EROFS / ENOSPC).
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from emofuse.core import checkpoint as ckpt
from emofuse.core.engine.compose import build_model
from emofuse.core.config import validate
from emofuse.core.data.cache import FeatureCache
from emofuse.core.errors import CheckpointError, EmofuseError
from emofuse.core.engine.model_io import load_model, save_model

LABELS = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]


# -- a real small folder: tmpfs when we may mount, else a plain folder plus simulated failures ------
def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None and sys.platform.startswith("linux")


@contextmanager
def small_folder(path: Path, size: str) -> Iterator[bool]:
    """`path` as a tmpfs of `size` when possible; yields whether it is a real mount."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = _can_mount() and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fail_writes(monkeypatch, code: int) -> None:
    """Simulate the kernel refusing writes in the checkpoint module (EROFS on create, ENOSPC on write)."""
    import tempfile

    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen
    if code == errno.EROFS:
        def mkstemp(*_a, **_k):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(ckpt.tempfile, "mkstemp", mkstemp)
    else:
        class FullDisk:
            def __init__(self, fd, mode):
                self._fh = real_fdopen(fd, mode)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._fh.close()

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode="r", *a, **k: FullDisk(fd, mode))
    del real_mkstemp


def _model(batch_factory, hidden: int):
    config = validate({"branches": {"video": {"name": "features", "features": ["au"], "hidden_dims": [hidden]}}})
    model = build_model(config, len(LABELS))
    model(batch_factory(4, num_classes=len(LABELS)))  # materialise the lazy input layer
    return model, config


def _assert_untouched(folder: Path, before: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temp file left either
    loaded = load_model(folder / "model.safetensors")
    assert loaded.label_names == LABELS


def test_read_only_output_folder_keeps_the_previous_checkpoint(tmp_path, monkeypatch, batch_factory):
    folder = tmp_path / "run"
    with small_folder(folder, "4m") as mounted:
        model, config = _model(batch_factory, 16)
        save_model(folder / "model", model, config, LABELS)
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        if mounted:
            assert subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True).returncode == 0
        else:
            _fail_writes(monkeypatch, errno.EROFS)
        newer, _ = _model(batch_factory, 16)
        with pytest.raises(CheckpointError, match=r"cannot save the checkpoint \(Read-only file system\)") as info:
            save_model(folder / "model", newer, config, LABELS)
        assert isinstance(info.value, OSError) and "writable output_dir" in str(info.value)
        assert "\n" not in str(info.value)
        monkeypatch.undo()
        _assert_untouched(folder, before)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, batch_factory):
    folder = tmp_path / "run"
    with small_folder(folder, "256k") as mounted:
        small, config = _model(batch_factory, 8)
        save_model(folder / "model", small, config, LABELS)
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        if not mounted:
            _fail_writes(monkeypatch, errno.ENOSPC)
        big, big_config = _model(batch_factory, 4096)  # ~600 KB of weights: more than the folder holds
        with pytest.raises(CheckpointError, match=r"No space left on device.*previous one is kept"):
            save_model(folder / "model", big, big_config, LABELS)
        monkeypatch.undo()
        _assert_untouched(folder, before)


# -- the feature cache: a writer killed at random moments never leaves an entry a reader trusts -----
CACHE_WRITER = textwrap.dedent('''
    import sys, torch
    from emofuse.core.data.cache import FeatureCache
    cache = FeatureCache(sys.argv[1])
    print("READY", flush=True)
    for shard in range(10_000):
        keys = [f"k{shard}-{j}" for j in range(8)]
        values = [{"x": torch.full((4096,), float(shard * 8 + j)), "n": torch.tensor(shard * 8 + j)} for j in range(8)]
        cache.put_many("enc-abc", keys, values)
        print(f"WROTE {shard}", flush=True)
''')


@pytest.mark.parametrize("seed", [0, 1])
def test_a_cache_writer_killed_mid_put_leaves_no_half_entry(tmp_path, seed):
    script = tmp_path / "writer.py"
    script.write_text(CACHE_WRITER)
    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "READY"
    time.sleep(random.Random(seed).uniform(0.05, 0.6))  # a random moment, most likely inside a write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    written = [int(line.split()[1]) for line in proc.stdout.read().splitlines() if line.startswith("WROTE")]
    proc.stdout.close()
    assert written, "the writer was killed before it stored anything"

    cache = FeatureCache(root)
    shards = max(written) + 3  # the reported shards, plus any whose report was cut off
    keys = [f"k{s}-{j}" for s in range(shards) for j in range(8)]
    values = cache.get_many("enc-abc", keys)
    for key, value in zip(keys, values):
        shard, j = (int(x) for x in key[1:].split("-"))
        if value is None:
            assert shard > max(written), f"{key} was stored and reported, yet is missing"
            continue
        expected = shard * 8 + j
        assert set(value) == {"x", "n"} and int(value["n"]) == expected
        assert value["x"].shape == (4096,) and bool((value["x"] == expected).all())
    assert cache.missing("enc-abc", keys) == [k for k, v in zip(keys, values) if v is None]
    # leftovers of the interrupted write are temp files, never read as shards
    assert not list(root.glob("*/*.corrupt"))


# -- training killed with SIGKILL at random moments --------------------------------------------------
TRAIN = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from emofuse.core.config import validate
    from emofuse.core.engine.training import train_run
    config = validate(json.loads(sys.argv[1]))
    print("READY", flush=True)
    result = train_run(config, progress=False)
    print("RESULT " + json.dumps({"metrics": result.metrics, "history": result.history,
                                   "report": result.fusion_report}), flush=True)
''')


def _fused(out: Path) -> dict:
    features = {"name": "features", "features": ["au"], "hidden_dims": [32], "dropout": 0.2}
    return {
        "name": "run", "output_dir": str(out), "data": {"dataset": "ravdess", "limit": 240},
        "branches": {"video": features, "audio": {**features, "features": ["mfcc"]}},
        "fusion": {"name": "enhanced-late"},
        "train": {"epochs": 8, "batch_size": 32, "lr": 3e-3, "seed": 0},
        "fusion_train": {"epochs": 10, "batch_size": 8, "lr": 1e-2, "patience": 50, "seed": 0},
    }


def _start(script: Path, config: dict) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, str(script), json.dumps(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def _kill_when(proc: subprocess.Popen, moment, delay: float, saved) -> tuple[bool, bool]:
    """SIGKILL `proc` `delay` seconds after `moment()` turns true (polled every 5 ms), unless it ends
    first; returns (killed, whether a checkpoint had been saved by then). A run that ends on its own
    must end well: a resume that crashes fails here with its error."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and not moment() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    was_saved = saved()
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == -signal.SIGKILL:
        return True, was_saved
    assert proc.returncode == 0, f"a resumed run failed: {err[-3000:]}"
    return False, False


def test_training_killed_at_random_moments_ends_as_an_uninterrupted_run(tmp_path, shared_data):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    reference = _start(script, _fused(tmp_path / "reference"))  # runs alongside
    config = _fused(tmp_path / "killed")
    killed_dir = tmp_path / "killed"
    saved = lambda: any(killed_dir.rglob("last.json"))  # noqa: E731
    rng = random.Random(8)
    # Kills at random moments tied to the run's progress rather than the clock, so that a fast machine
    # still gets them: early (data loading or the first branch), just after a checkpoint, and inside the
    # fusion stage. A machine fast enough to finish before a kill gets another try at the next moment.
    moments = [lambda: True, saved, saved, lambda: (killed_dir / "run" / "last.json").exists()]
    delays = [rng.uniform(0.0, 0.5), rng.uniform(0.0, 0.05), rng.uniform(0.0, 0.02), rng.uniform(0.0, 0.02)]
    kills = after_a_save = 0
    for moment, delay in zip(moments, delays):
        proc = _start(script, config)
        assert proc.stdout.readline().strip() == "READY"
        killed, was_saved = _kill_when(proc, moment, delay, saved)
        kills += killed
        after_a_save += killed and was_saved
    assert kills >= 1 and after_a_save >= 1, (kills, after_a_save)  # at least one resume starts from saved state
    resumed, expected = _finish(_start(script, config)), _finish(reference)
    assert resumed["metrics"] == expected["metrics"]
    timing = {"seconds", "train_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(resumed["history"]) == strip(expected["history"])
    assert resumed["report"] == expected["report"]


def test_checkpoint_errors_are_one_line_emofuse_errors(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "m", {"a": torch.ones(8)}, {})
    path.write_bytes(b"")  # zero-length
    with pytest.raises(EmofuseError) as info:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
