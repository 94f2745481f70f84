"""What a feature cache holds (per namespace: component, code, size, age) and pruning it.

`emofuse cache` prints `inventory`; `emofuse cache prune` lists what `prune` would delete (``--dry-run``)
or deletes it. A namespace is one component state (see `emofuse.core.data.cache`); its age is the
time since its newest shard was written.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emofuse.core.errors import ConfigError

__all__ = ["CacheEntry", "inventory", "prune", "IDENTITY_FILE"]

#: What made a namespace (written by the cache when it creates one; read here and on a code change).
#: Kept here so that listing a cache imports no torch.
IDENTITY_FILE = "identity.json"

DAY_S = 86400.0


@dataclass(frozen=True)
class CacheEntry:
    """One namespace folder of a feature cache."""

    path: Path
    #: ``encoder 'mm-lstm'`` from its identity record, else read from the folder's name.
    component: str
    #: The component's registered name (``mm-lstm``); "" when the folder does not say.
    name: str
    #: The provider recorded for it (``emofuse 0.1.0``), "" when unknown.
    provider: str
    size_bytes: int
    shards: int
    #: Seconds since its newest shard (or the folder) was written.
    age_s: float

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "component": self.component, "provider": self.provider,
                "size_bytes": self.size_bytes, "shards": self.shards, "age_days": round(self.age_s / DAY_S, 2)}


def inventory(root: Path, *, now: float | None = None) -> list[CacheEntry]:
    """Every namespace under `root`, largest first (none when `root` does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    entries = [_entry(folder, now) for folder in sorted(root.iterdir()) if folder.is_dir()]
    return sorted(entries, key=lambda e: (-e.size_bytes, str(e.path)))


def prune(root: Path, *, older_than_days: float | None = None, component: str | None = None, everything: bool = False,
          dry_run: bool = False, now: float | None = None) -> list[CacheEntry]:
    """Delete the namespaces selected (older than `older_than_days`, of `component`, or all); return them.
    At least one selection is required, so that a bare ``prune`` never empties a cache."""
    if not everything and older_than_days is None and component is None:
        raise ConfigError("cache prune: say what to delete",
                          hint="give --older-than DAYS, --component NAME or --all (and --dry-run to list it first)")
    if older_than_days is not None and older_than_days < 0:
        raise ConfigError(f"cache prune: --older-than must be 0 or more days, not {older_than_days}")
    chosen = [e for e in inventory(root, now=now)
              if everything or ((older_than_days is None or e.age_s >= older_than_days * DAY_S)
                                and (component is None or component in (e.name, e.component)))]
    if not dry_run:
        for entry in chosen:
            shutil.rmtree(entry.path, ignore_errors=True)
    return chosen


def _entry(folder: Path, now: float) -> CacheEntry:
    files = [p for p in folder.iterdir() if p.is_file()]
    shards = [p for p in files if p.suffix == ".safetensors"]
    try:
        identity = json.loads((folder / IDENTITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        identity = {}
    component, name = identity.get("component"), identity.get("name")
    if not component or not name:
        component, name = _component_from_folder(folder.name)
    newest = max((p.stat().st_mtime for p in shards), default=folder.stat().st_mtime)
    return CacheEntry(path=folder, component=component, name=name,
                      provider=(identity.get("code") or {}).get("provider", ""),
                      size_bytes=sum(p.stat().st_size for p in files), shards=len(shards), age_s=max(0.0, now - newest))


def _component_from_folder(folder: str) -> tuple[str, str]:
    """(component, name) of a folder without an identity record: ``<encoder>-<hash>``, or stored branch
    outputs ``outputs-<branch>-<encoder>-<hash>-<sha>`` (branch and encoder names may hold '-': not split)."""
    if folder.startswith("outputs-"):
        return f"branch outputs {folder.removeprefix('outputs-').rsplit('-', 2)[0]!r}", ""
    name = folder.rsplit("-", 1)[0]
    return f"encoder {name!r}", name
