"""One run folder, one run: a lock while a training writes it, and no silent replacement of a run
trained with another config (``--overwrite`` replaces it on purpose).

Without the lock two trainings into one folder interleave ``metrics.jsonl`` and overwrite each
other's checkpoints; without the config check a rerun with, say, another learning rate would train
over a finished run and leave nothing that says so.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from emofuse.core.checkpoint import atomic_write_bytes
from emofuse.core.config import RunConfig
from emofuse.core.engine.run_files import HISTORY_FILE, IDENTITY_FILE, LOCK_FILE, MODEL_FILE, RESULT_FILE, STATE_FILE
from emofuse.core.errors import ConfigError

#: Settings that differ between machines or reruns without changing what a run learns.
MACHINE_LOCAL = ("device", "num_workers")
#: What a training leaves in its folder (``--overwrite`` removes these before it starts).
RUN_OUTPUTS = (f"{MODEL_FILE}.safetensors", f"{MODEL_FILE}.json", f"{STATE_FILE}.safetensors", f"{STATE_FILE}.json",
               HISTORY_FILE, RESULT_FILE, "config.toml")


def run_identity(config: RunConfig) -> dict[str, Any]:
    """`config` as JSON without where it writes and how this machine runs it."""
    data = json.loads(json.dumps(config.model_dump(mode="json"), default=str))
    data.pop("output_dir", None)
    data.pop("cache_dir", None)
    trains = [data.get("train"), data.get("fusion_train"), *(data.get("branch_train") or {}).values()]
    for section in trains:
        if isinstance(section, dict):
            for key in MACHINE_LOCAL:
                section.pop(key, None)
    return data


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two JSON trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


@contextlib.contextmanager
def guarded_run_dir(run_dir: Path, config: RunConfig, *, overwrite: bool = False) -> Iterator[None]:
    """Hold `run_dir`'s lock and refuse (or, with `overwrite`, clear) a run of another config in it."""
    lock = FileLock(str(run_dir / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ConfigError(f"{run_dir}: another training is writing this run folder (it holds {LOCK_FILE})",
                          hint="wait for it to finish, or choose another --name") from None
    try:
        remove_stale_temps(run_dir)
        _check_identity(run_dir, run_identity(config), overwrite)
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def branch_dir_lock(branch_dir: Path, ctx: Any) -> Iterator[None]:
    """A shared branch folder (named by its fingerprint): wait for a run training it, then reuse it."""
    if not ctx.is_main:
        yield
        return
    branch_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(branch_dir / LOCK_FILE)):
        remove_stale_temps(branch_dir)
        yield


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete the temp files (``.model.safetensors.*.tmp``, ``.split.json.*.tmp``) that a run killed while it
    saved left in its folder. Only called under the folder's lock, so no writer of them is alive."""
    stale = sorted(Path(run_dir).glob(".*.tmp")) if Path(run_dir).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _check_identity(run_dir: Path, identity: dict[str, Any], overwrite: bool) -> None:
    path = run_dir / IDENTITY_FILE
    outputs = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    try:
        stored = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (ValueError, UnicodeDecodeError):
        stored = {}  # damaged: not known to be the same config
    if outputs and stored is not None and stored != identity:
        if not overwrite:
            changed = changed_keys(stored, identity) or ["(unreadable record)"]
            raise ConfigError(
                f"{run_dir}: holds a run trained with another config (changed: {', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''})",
                hint="pass --overwrite to replace it, or choose another --name")
        for output in outputs:
            output.unlink()
        if stored.get("data") != identity.get("data"):
            (run_dir / "split.json").unlink(missing_ok=True)
    atomic_write_bytes(path, json.dumps(identity, indent=2, sort_keys=True).encode())
