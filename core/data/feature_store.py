"""Where frozen encoders' outputs live between runs of their backbone: the `FeatureStore` interface.

Every route from a batch to an encoder's output (training, scoring, evaluation, prediction) asks a store
for the clip's extracted features (`FeatureStore.extract`), which runs the backbone only on the clips it
has not seen. Two stores share that logic: `FeatureCache` on disk (`emofuse.core.data.cache`: runs and
comparisons reuse it across processes) and `MemoryFeatureStore` (prediction and serving: nothing is
written, a bounded number of clips is kept).

Keys and namespaces are the same for both: a namespace is one encoder state (`encoder_namespace`), a key
one clip's inputs for the modalities that encoder reads (`batch_keys`).
"""
from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from emofuse.core.data.code_identity import code_identity
from emofuse.core.data.collate import select
from emofuse.core.data.keys import combine_keys
from emofuse.core.interfaces import Encoder, collate_extracted
from emofuse.core.types import AUDIO, VIDEO, Batch

__all__ = ["FeatureStore", "MemoryFeatureStore", "CacheStats", "batch_keys", "encoder_namespace", "describe"]

_fingerprints: "weakref.WeakKeyDictionary[Encoder, str]" = weakref.WeakKeyDictionary()
#: namespace -> what made it (component, options-and-weights fingerprint, code), for `identity.json`.
identities: dict[str, dict[str, Any]] = {}


def encoder_namespace(encoder: Encoder) -> str:
    """``<name>-<hash>`` of the encoder's fingerprint (options, frozen weights) and its code identity;
    computed once per object (the fingerprint hashes every frozen weight)."""
    namespace = _fingerprints.get(encoder)
    if namespace is None:
        state, code = encoder.fingerprint(), code_identity(encoder)
        digest = hashlib.sha256(json.dumps([state, code], sort_keys=True).encode()).hexdigest()[:16]
        namespace = f"{encoder.name}-{digest}"
        describe(namespace, {"component": f"encoder {encoder.name!r}", "name": encoder.name, "state": state,
                             "code": code})
        _fingerprints[encoder] = namespace
    return namespace


def describe(namespace: str, record: Mapping[str, Any]) -> None:
    """What made `namespace` (``component``, ``name``, ``code``...), written to its ``identity.json`` when the
    folder is created; with a ``state``, a changed code of the same component and state is said aloud."""
    identities[namespace] = dict(record)


def batch_keys(batch: Batch, modalities: Iterable[str] = ()) -> list[str]:
    """Per-sample cache keys of `batch` for a component reading `modalities` (all, when empty).

    Keys restricted to a component's own modalities mean that, say, an edited transcript does not
    invalidate a video backbone's cached frames.
    """
    mods = sorted(set(modalities))
    per_modality = batch.extra.get("modality_keys")
    if per_modality is not None and mods and all(m in per_modality for m in mods):
        return [combine_keys({m: per_modality[m][i] for m in mods}) for i in range(len(batch))]
    keys = batch.extra.get("keys")
    if keys is None or len(keys) != len(batch):
        raise ValueError("batch carries no cache keys; build it with emofuse.core.data (loader or make_batch)")
    return list(keys)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class FeatureStore:
    """Per-clip tensor dicts by namespace and key; subclasses say where they are kept (`get_many`, `put_many`)."""

    stats: CacheStats

    def get_many(self, namespace: str, keys: list[str]) -> list[dict[str, torch.Tensor] | None]:
        """The stored dict for each key, None where absent."""
        raise NotImplementedError

    def put_many(self, namespace: str, keys: list[str], values: list[dict[str, torch.Tensor]]) -> None:
        """Store `values` under `keys` (keys already stored are kept as they are)."""
        raise NotImplementedError

    def missing(self, namespace: str, keys: Sequence[str]) -> list[str]:
        """The keys with no stored entry."""
        values = self.get_many(namespace, list(keys))
        return [k for k, v in zip(keys, values) if v is None]

    def extract(self, encoder: Encoder, batch: Batch) -> dict[str, torch.Tensor]:
        """`encoder.extract` for the whole batch, running it only on samples not yet stored.

        Returns the collated tensors (`collate_extracted`) on the batch's device.
        """
        if not encoder.cacheable:
            return encoder.extracted_for(batch, None)
        keys = batch_keys(batch, encoder.modalities)
        namespace = encoder_namespace(encoder)
        values = self.get_many(namespace, keys)
        missing = [i for i, v in enumerate(values) if v is None]
        self.stats.hits += len(keys) - len(missing)
        self.stats.misses += len(missing)
        if missing:
            lacking = [m for m in (VIDEO, AUDIO) if m in encoder.modalities and getattr(batch, m) is None]
            if lacking:
                raise RuntimeError(
                    f"{len(missing)} samples are not cached for encoder {encoder.name!r}, and this batch was "
                    f"built without decoding {', '.join(lacking)}: warm the cache first (FeatureCache.warm) "
                    f"or include {', '.join(lacking)} in the loader's modalities"
                )
            sub = batch if len(missing) == len(keys) else select(batch, missing)
            with torch.no_grad():
                computed = encoder.extract(sub)
            if computed is None or len(computed) != len(missing):
                raise RuntimeError(
                    f"encoder {encoder.name!r}.extract returned {None if computed is None else len(computed)} "
                    f"items for {len(missing)} samples"
                )
            computed = [{k: v.detach().cpu() for k, v in item.items()} for item in computed]
            self.put_many(namespace, [keys[i] for i in missing], computed)
            for i, item in zip(missing, computed):
                values[i] = item
        collated = collate_extracted(values)  # type: ignore[arg-type]
        device = batch.labels.device
        return {k: v.to(device) for k, v in collated.items()}


class MemoryFeatureStore(FeatureStore):
    """A store in this process's memory, for prediction and serving: nothing touches the disk, and only the
    `max_entries` clips used last are kept, so a long-running service does not grow without bound."""

    def __init__(self, max_entries: int = 1024):
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, str], dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, namespace: str, keys: list[str]) -> list[dict[str, torch.Tensor] | None]:
        with self._lock:
            out = []
            for key in keys:
                value = self._entries.get((namespace, key))
                if value is not None:
                    self._entries.move_to_end((namespace, key))
                out.append(value)
            return out

    def put_many(self, namespace: str, keys: list[str], values: list[dict[str, torch.Tensor]]) -> None:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        with self._lock:
            for key, value in zip(keys, values):
                self._entries.setdefault((namespace, key), {k: v.detach().cpu() for k, v in value.items()})
                self._entries.move_to_end((namespace, key))
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
