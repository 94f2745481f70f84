"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar beside them.

`model.safetensors` + `model.json` (config, class names, component names and the versions of the
plugins that made them, metrics, a checksum of the tensor file). Writes are atomic (temp file +
fsync + rename), so a crash mid-save leaves the previous checkpoint intact. The tensor file also
carries the same metadata and a hash of its tensors in its own header, so it is complete by itself:
a kill between the two renames (new tensors, old sidecar) still loads the new checkpoint whole.
Loading never unpickles: a ``.pt``/``.pth``/``.pkl`` file is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from emofuse.core.errors import CheckpointError

SIDECAR_SUFFIX = ".json"
TENSOR_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
FORMAT_VERSION = 1
#: Header keys of the tensor file: the sidecar's metadata and a hash of the tensors themselves.
META_KEY = "emofuse_meta"
TENSORS_HASH_KEY = "emofuse_tensors_sha256"


def _write_temp(path: Path, data: bytes) -> str:
    """`data` in a fsynced temp file beside `path` (removed again if the write fails); returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never half."""
    atomic_write_files({Path(path): data})


def atomic_write_files(files: Mapping[Path, bytes]) -> None:
    """Write several files, each atomically; every temp file is complete before the first rename.

    A full disk or a read-only folder therefore fails before any file is replaced, so files that
    belong together (tensors and the sidecar holding their checksum) are not left half old, half new.
    """
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            temps.append((_write_temp(Path(path), data), Path(path)))
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            _unlink_quietly(tmp)
        raise


class CheckpointWriteError(CheckpointError, OSError):
    """A save failed (disk full, read-only folder); the previous checkpoint is left as it was.

    Also an `OSError`, so callers that handle I/O failures keep working; the CLI prints it as one line.
    """


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(SIDECAR_SUFFIX)


def tensor_path(path: Path) -> Path:
    return Path(path).with_suffix(TENSOR_SUFFIX)


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes: what a tensor file must hold, however it is laid out."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Save `tensors` to ``<path>.safetensors`` and `meta` to ``<path>.json``; returns the tensor path.

    Both files are written to fsynced temp files first and only then renamed over the old ones
    (tensors first, sidecar last), so a failed save leaves the previous checkpoint intact.
    """
    tpath = tensor_path(path)
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    embedded = json.dumps({**dict(meta), "format_version": FORMAT_VERSION}, sort_keys=True, default=str)
    blob = save(contiguous, metadata={"format": "emofuse", "format_version": str(FORMAT_VERSION),
                                      META_KEY: embedded, TENSORS_HASH_KEY: tensors_sha256(contiguous)})
    sidecar = dict(meta)
    sidecar["format_version"] = FORMAT_VERSION
    sidecar["sha256"] = hashlib.sha256(blob).hexdigest()
    sidecar["tensor_file"] = tpath.name
    try:
        atomic_write_files({tpath: blob,
                            sidecar_path(path): json.dumps(sidecar, indent=2, sort_keys=True, default=str).encode()})
    except OSError as exc:
        raise CheckpointWriteError(
            f"{tpath}: cannot save the checkpoint ({exc.strerror or exc}); the previous one is kept",
            hint="free disk space or choose a writable output_dir",
        ) from exc
    return tpath


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: refusing to load a pickle-based file; emofuse only loads safetensors checkpoints",
            hint="convert it once in a trusted session with safetensors.torch.save_file, or pass the .safetensors file",
        )


def read_sidecar(path: Path) -> dict[str, Any]:
    spath = sidecar_path(path)
    if not spath.is_file():
        raise CheckpointError(f"{spath}: sidecar missing", hint="a checkpoint is a .safetensors file with its .json beside it")
    try:
        return json.loads(spath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{spath}: sidecar is not valid JSON ({exc})", hint="restore it from the run folder") from None


def _self_contained(blob: bytes, tpath: Path, sha: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and metadata of a tensor file that carries both in itself and whose tensors match
    the hash in its header; None for anything else (an older file, a corrupted one)."""
    try:
        header = _header_metadata(blob)
        if META_KEY not in header or TENSORS_HASH_KEY not in header:
            return None
        tensors = load(blob)
    except (SafetensorError, OSError, ValueError):
        return None
    if tensors_sha256(tensors) != header[TENSORS_HASH_KEY]:
        return None
    meta = json.loads(header[META_KEY])
    meta.update(sha256=sha, tensor_file=tpath.name)
    return tensors, meta


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (8-byte little-endian length, then JSON)."""
    if len(blob) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("header longer than the file")
    return dict(json.loads(blob[8:8 + size]).get("__metadata__") or {})


def load_checkpoint(path: Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, meta)``; `path` may name the .safetensors, the .json or the stem.

    The tensor file's checksum is compared with the sidecar's, so truncation or bit flips are
    refused before any tensor is used. When they differ but the tensor file is whole by its own
    header's hash, the sidecar is the stale half of an interrupted save and the file's own
    metadata is used.
    """
    path = Path(path)
    _refuse_pickle(path)
    if path.is_dir():
        path = path / "model"
    tpath = tensor_path(path)
    if not tpath.is_file():
        raise CheckpointError(f"{tpath}: no such checkpoint", hint="pass the .safetensors file a run wrote (runs/<name>/model.safetensors)")
    blob = tpath.read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    meta = read_sidecar(path) if sidecar_path(path).is_file() else None
    if meta is None or (verify and meta.get("sha256") not in (None, sha)):
        whole = _self_contained(blob, tpath, sha)
        if whole is not None:
            return whole
        if meta is None:
            read_sidecar(path)  # raises the clear "sidecar missing" error
        raise CheckpointError(
            f"{tpath}: checksum mismatch with {sidecar_path(path).name} (file truncated or corrupted)",
            hint="use another checkpoint of the run, or retrain",
        )
    try:
        tensors = load(blob)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tpath}: not a readable safetensors file ({exc})", hint="use another checkpoint, or retrain") from None
    return tensors, meta


def checkpoint_sha256(path: Path) -> str:
    """The hash of a checkpoint's tensor file: an identity for whatever was computed from it."""
    return hashlib.sha256(tensor_path(Path(path)).read_bytes()).hexdigest()
