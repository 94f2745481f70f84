"""On-disk cache of frozen components' outputs, so a frozen backbone runs once per clip, ever.

Layout: ``<root>/<namespace>/<shard>.safetensors``; a namespace is one component state (name plus a
hash of `Encoder.fingerprint()`, options and frozen weights, and of its code: provider, version and, for
a local install, its source files, `code_identity`), a key is one clip's inputs (`sample_key`). Each
namespace folder holds ``identity.json`` (what made it), so that an encoder whose code changed is
recomputed with one line saying which component changed and how (`FeatureCache.notify`).
Each entry carries a checksum of its tensor bytes (xxh3-128, about 10 GB/s, in the shard's metadata),
checked the first time an open `FeatureCache` reads it (`missing` checks up front, so a trainer learns of
damage before it stops decoding media): flipped bytes mean the shard is set aside and its entries recomputed.
Each `put_many` writes one new shard (tensors named ``<key>/<name>``): written to a temp file,
fsynced, then renamed into place, so a crash never leaves a half shard that a later run trusts, and
several processes (parallel Optuna trials) can add shards side by side. A changed config or weight
gives a new namespace; a changed input file or setting gives a new key; both simply miss.

Typical use by a trainer: ``cache.warm(encoders, loader_with_all_modalities)`` once (progress bar,
DataLoader workers decode on every core), then train with loaders that skip the modalities whose
encoders are all cached: `extract` serves every batch from disk without decoding a frame.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from emofuse.core.data.cache_inventory import IDENTITY_FILE
from emofuse.core.data.code_identity import what_changed
from emofuse.core.data.feature_store import (
    CacheStats,
    FeatureStore,
    batch_keys,
    describe,
    encoder_namespace,
    identities,
)
from emofuse.core.data.keys import sample_key
from emofuse.core.interfaces import Encoder
from emofuse.core.errors import EmofuseError
from emofuse.core.types import Batch

log = logging.getLogger("emofuse.data")

__all__ = ["FeatureCache", "CacheStats", "CacheWriteError", "sample_key", "batch_keys", "encoder_namespace", "describe"]

_SUFFIX = ".safetensors"
_EMPTY_MARK = "__empty__"
_FORMAT = "emofuse-feature-cache-2"
_CHECKSUM = "xxh3_128/"

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class CacheWriteError(EmofuseError, OSError):
    """A cache entry could not be written (disk full, read-only folder); nothing half-written is left.
    Also an `OSError`, like `emofuse.core.checkpoint.CheckpointWriteError`."""


def entry_checksum(value: Mapping[str, torch.Tensor]) -> str:
    """xxh3-128 of one entry's tensors: names, dtypes, shapes and raw bytes."""
    h = xxhash.xxh3_128()
    for name in sorted(value):
        tensor = value[name].detach().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class FeatureCache(FeatureStore):
    """Safetensors shards of per-sample tensor dicts, by namespace and key. Never pickle."""

    def __init__(self, root: Path | str, notify: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()
        #: Told, in one line each, why entries are recomputed (a changed component, damaged bytes).
        self.notify = notify or log.warning
        self._index: dict[str, dict[str, Path]] = {}
        self._scanned: dict[str, set[str]] = {}
        self._verified: set[tuple[Path, str]] = set()
        self._lock = threading.Lock()

    # -- raw storage -----------------------------------------------------------------------
    def get_many(self, namespace: str, keys: list[str]) -> list[dict[str, torch.Tensor] | None]:
        """The stored dict for each key, None where absent."""
        index = self._lookup(namespace, keys)
        by_shard: dict[Path, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            shard = index.get(key)
            if shard is not None:
                by_shard[shard].append(i)
        out: list[dict[str, torch.Tensor] | None] = [None] * len(keys)
        for shard, positions in by_shard.items():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    names, meta = list(f.keys()), f.metadata() or {}
                    for i in positions:
                        prefix = keys[i] + "/"
                        out[i] = {
                            n[len(prefix):]: f.get_tensor(n)
                            for n in names
                            if n.startswith(prefix) and n[len(prefix):] != _EMPTY_MARK
                        }
                        if (shard, keys[i]) not in self._verified:
                            _check_entry(meta, keys[i], out[i])  # type: ignore[arg-type]
                            self._verified.add((shard, keys[i]))
            except Exception as exc:  # damaged shard: forget it, recompute its entries
                self._quarantine(namespace, shard, exc)
                for i in positions:
                    out[i] = None
        return out

    def verify(self, namespace: str, keys: Sequence[str]) -> None:
        """Check the stored entries of `keys` against their checksums (once per process); a shard that
        fails is set aside, so its entries count as missing and are recomputed."""
        index = self._lookup(namespace, list(keys))
        by_shard: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            shard = index.get(key)
            if shard is not None and (shard, key) not in self._verified:
                by_shard[shard].append(key)
        for shard, shard_keys in by_shard.items():
            try:
                with safe_open(str(shard), framework="pt") as f:
                    names, meta = list(f.keys()), f.metadata() or {}
                    for key in shard_keys:
                        prefix = key + "/"
                        _check_entry(meta, key, {n[len(prefix):]: f.get_tensor(n) for n in names
                                                 if n.startswith(prefix) and n[len(prefix):] != _EMPTY_MARK})
                        self._verified.add((shard, key))
            except Exception as exc:
                self._quarantine(namespace, shard, exc)

    def put_many(self, namespace: str, keys: list[str], values: list[dict[str, torch.Tensor]]) -> None:
        """Store one shard holding `values` under `keys` (keys already stored are not written again)."""
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        index = self._lookup(namespace, keys)
        tensors: dict[str, torch.Tensor] = {}
        checksums: dict[str, str] = {}
        new_keys = []
        for key, value in zip(keys, values):
            if key in index or key in new_keys:
                continue
            if "/" in key:
                raise ValueError(f"cache key {key!r} must not contain '/'")
            new_keys.append(key)
            if not value:
                tensors[f"{key}/{_EMPTY_MARK}"] = torch.zeros(0)
            stored = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in value.items()}
            tensors.update({f"{key}/{name}": tensor for name, tensor in stored.items()})
            checksums[_CHECKSUM + key] = entry_checksum(stored)
        if not new_keys:
            return
        folder = self._folder(namespace)
        digest = hashlib.sha256("\n".join(new_keys).encode()).hexdigest()[:12]
        final = folder / f"{digest}-{uuid.uuid4().hex[:8]}{_SUFFIX}"
        data = safetensors_save(tensors, metadata={"format": _FORMAT, "namespace": namespace, **checksums})
        try:
            _atomic_write(final, data)
        except OSError as exc:
            raise CacheWriteError(
                f"{folder}: cannot write the feature cache ({exc.strerror or exc})",
                hint="free disk space, or set cache_dir to a folder on another disk") from exc
        with self._lock:
            self._scanned.setdefault(namespace, set()).add(final.name)
            ns_index = self._index.setdefault(namespace, {})
            for key in new_keys:
                ns_index[key] = final
                self._verified.add((final, key))

    def __contains__(self, item: tuple[str, str]) -> bool:
        namespace, key = item
        return key in self._lookup(namespace, [key])

    def missing(self, namespace: str, keys: Sequence[str]) -> list[str]:
        """The keys with no stored entry that passes its checksum."""
        self.verify(namespace, keys)
        index = self._lookup(namespace, list(keys))
        return [k for k in keys if k not in index]

    # -- frozen encoders -------------------------------------------------------------------
    def warm(
        self,
        encoders: Mapping[str, Encoder] | Sequence[Encoder],
        loader: Iterable[Batch],
        *,
        description: str = "extracting frozen features",
        progress: bool = True,
    ) -> CacheStats:
        """Run every cacheable encoder over `loader` once, storing what is missing; shows a progress bar."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        encs = list(encoders.values()) if isinstance(encoders, Mapping) else list(encoders)
        encs = [e for e in encs if e.cacheable]
        before = CacheStats(self.stats.hits, self.stats.misses)
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for batch in loader:
                for enc in encs:
                    self.extract(enc, batch)
                bar.advance(task)
        return CacheStats(self.stats.hits - before.hits, self.stats.misses - before.misses)

    # -- housekeeping ----------------------------------------------------------------------
    def namespaces(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def size_bytes(self, namespace: str | None = None) -> int:
        folders = [self.root / namespace] if namespace else [self.root / n for n in self.namespaces()]
        return sum(p.stat().st_size for d in folders if d.is_dir() for p in d.glob(f"*{_SUFFIX}"))

    def clear(self, namespace: str | None = None) -> None:
        """Delete one namespace's shards, or everything under the root."""
        for name in [namespace] if namespace else self.namespaces():
            folder = self.root / name
            for p in folder.glob("*"):
                p.unlink()
            if folder.is_dir():
                folder.rmdir()
            self._index.pop(name, None)
            self._scanned.pop(name, None)

    # -- internals -------------------------------------------------------------------------
    def _folder(self, namespace: str) -> Path:
        if not _NAMESPACE_RE.match(namespace):
            raise ValueError(f"cache namespace {namespace!r} must be letters, digits, '.', '_' or '-'")
        folder = self.root / namespace
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            identity = identities.get(namespace)
            if identity is not None:
                _atomic_write(folder / IDENTITY_FILE, json.dumps({**identity, "created": time.time()}).encode())
                if "state" in identity:
                    self._explain_new(namespace, identity)
        return folder

    def _explain_new(self, namespace: str, identity: Mapping[str, Any]) -> None:
        """Say why a component's entries are computed again when an earlier namespace of the same
        component, options and weights exists: its code changed."""
        for other in sorted(self.root.glob(f"*/{IDENTITY_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True):
            if other.parent.name == namespace:
                continue
            try:
                before = json.loads(other.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if before.get("component") != identity["component"] or before.get("state") != identity["state"]:
                continue
            change = what_changed(identity["component"], before.get("code"), identity["code"])
            if change:
                self.notify(f"{change}: computing its features again (not reusing {other.parent})")
                return

    def _lookup(self, namespace: str, keys: Sequence[str]) -> dict[str, Path]:
        """The namespace index, rescanned for shards other processes added when a key is unknown."""
        with self._lock:
            index = self._index.setdefault(namespace, {})
            if namespace not in self._scanned or any(k not in index for k in keys):
                self._scan(namespace)
            return index

    def _scan(self, namespace: str) -> None:
        folder = self._folder(namespace)
        if namespace not in self._scanned:
            _remove_abandoned_temps(folder)
        seen = self._scanned.setdefault(namespace, set())
        index = self._index.setdefault(namespace, {})
        for shard in sorted(folder.glob(f"*{_SUFFIX}")):
            if shard.name in seen:
                continue
            seen.add(shard.name)
            try:
                with safe_open(str(shard), framework="pt") as f:
                    names = list(f.keys())
            except Exception as exc:
                self._quarantine(namespace, shard, exc, locked=True)
                continue
            for name in names:
                index.setdefault(name.split("/", 1)[0], shard)

    def _quarantine(self, namespace: str, shard: Path, exc: BaseException, *, locked: bool = False) -> None:
        self.notify(f"feature cache shard {shard} is damaged ({exc}); its entries are computed again")
        try:
            os.replace(shard, shard.with_suffix(".corrupt"))
        except OSError:
            pass

        def forget() -> None:
            index = self._index.get(namespace, {})
            for key in [k for k, p in index.items() if p == shard]:
                del index[key]

        if locked:
            forget()
        else:
            with self._lock:
                forget()


class DamagedEntry(ValueError):
    """A stored entry whose bytes do not match the checksum it was written with."""


def _check_entry(meta: Mapping[str, str], key: str, value: Mapping[str, torch.Tensor]) -> None:
    expected = meta.get(_CHECKSUM + key)
    if expected is None:
        raise DamagedEntry(f"entry {key!r} carries no checksum")
    if entry_checksum(value) != expected:
        raise DamagedEntry(f"entry {key!r} fails its checksum: its bytes changed on disk")


#: A temp file older than this is abandoned even if a process with its pid is alive (pids are reused).
ABANDONED_AFTER_S = 3600.0
#: A temp file whose writer is gone is only removed after this long, so a writer on another machine
#: sharing the folder (whose pid means nothing here) has long finished its few-second write.
DEAD_WRITER_GRACE_S = 120.0


def _remove_abandoned_temps(folder: Path) -> None:
    """Delete temp shards that killed writers left behind (`_atomic_write` names them by pid)."""
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        try:
            age = now - tmp.stat().st_mtime
            pid = int(tmp.name.rsplit(".", 2)[-2])
        except (OSError, ValueError):
            continue
        if age > ABANDONED_AFTER_S or (age > DEAD_WRITER_GRACE_S and not process_alive(pid)):
            tmp.unlink(missing_ok=True)
            log.info("removed %s, left by a cache writer that was killed mid-write", tmp)


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours to signal
        return True
    return True


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, rename over, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
