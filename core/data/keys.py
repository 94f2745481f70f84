"""Cache keys: a hash per modality of what a clip's tensors are made from, combined per encoder.

Media files are identified by resolved path, size and modification time (ns), not by a content
hash: reading every file each epoch to hash it would cost as much I/O as decoding it, while any
rewrite, re-encode or copy over the file changes size or mtime. A key also carries the
preprocessing settings for that modality and, for normalised inputs (features, age), the
normaliser's statistics, so changing either invalidates exactly the affected entries.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import Iterable, Mapping

import numpy as np

from emofuse.core.data.preprocess import PreprocessSpec
from emofuse.core.types import AUDIO, FEATURES, METADATA, MODALITIES, TEXT, VIDEO, Sample, gender_code

_DEFAULT_SPEC = PreprocessSpec()


def file_identity(path: str | os.PathLike | None) -> str:
    """``resolved-path|size|mtime_ns``; a missing file gets a key of its own (it will fail to decode)."""
    if path is None:
        return "absent"
    resolved = os.path.realpath(path)
    try:
        st = os.stat(resolved)
    except OSError:
        return f"missing:{resolved}"
    return f"{resolved}|{st.st_size}|{st.st_mtime_ns}"


def modality_key(
    sample: Sample, modality: str, *, spec: PreprocessSpec | None = None, normalizer_fingerprint: str = ""
) -> str:
    """Hash of everything that determines `sample`'s input tensors for one modality."""
    spec = spec or _DEFAULT_SPEC
    h = hashlib.sha256(modality.encode())
    if modality == VIDEO:
        h.update(file_identity(sample.video_path).encode())
        h.update(spec.describe(VIDEO).encode())
    elif modality == AUDIO:
        h.update(file_identity(sample.audio_path).encode())
        h.update(spec.describe(AUDIO).encode())
    elif modality == TEXT:
        h.update((sample.text or "").encode("utf-8") if sample.has(TEXT) else b"\0absent")
    elif modality == METADATA:
        age = "nan" if sample.age is None or math.isnan(float(sample.age)) else repr(float(sample.age))
        h.update(f"{age}|{gender_code(sample.gender)}|{normalizer_fingerprint}".encode())
    elif modality == FEATURES:
        for name in sorted(sample.features):
            vec = np.ascontiguousarray(sample.features[name], dtype=np.float32)
            h.update(f"{name}:{vec.shape}".encode())
            h.update(vec.tobytes())
        h.update(normalizer_fingerprint.encode())
    else:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    return h.hexdigest()[:32]


def combine_keys(per_modality: Mapping[str, str]) -> str:
    """One key from modality keys; order-independent, so `sample_key` and batch keys agree."""
    h = hashlib.sha256()
    for modality in sorted(per_modality):
        h.update(f"{modality}={per_modality[modality]};".encode())
    return h.hexdigest()[:32]


def modality_keys(
    sample: Sample, *, spec: PreprocessSpec | None = None, normalizer_fingerprint: str = ""
) -> dict[str, str]:
    return {m: modality_key(sample, m, spec=spec, normalizer_fingerprint=normalizer_fingerprint) for m in MODALITIES}


def sample_key(
    sample: Sample,
    modalities: Iterable[str],
    *,
    spec: PreprocessSpec | None = None,
    normalizer=None,
) -> str:
    """Hash of `sample`'s inputs for `modalities` (file identities, text, features, settings)."""
    mods = set(modalities) or set(MODALITIES)
    fp = normalizer.fingerprint() if normalizer is not None else ""
    return combine_keys({m: modality_key(sample, m, spec=spec, normalizer_fingerprint=fp) for m in mods})
