"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar beside them.

`model.safetensors` + `model.json` (config, class names, component names and the versions of the
plugins that made them, metrics, a checksum of the tensor file). Writes are atomic (temp file +
fsync + rename), so a crash mid-save leaves the previous checkpoint intact. Loading never unpickles:
a ``.pt``/``.pth``/``.pkl`` file is refused.
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
from safetensors.torch import load_file, save

from emofuse.core.errors import CheckpointError

SIDECAR_SUFFIX = ".json"
TENSOR_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
FORMAT_VERSION = 1


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


def save_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Save `tensors` to ``<path>.safetensors`` and `meta` to ``<path>.json``; returns the tensor path.

    Both files are written to fsynced temp files first and only then renamed over the old ones
    (tensors first, sidecar last), so a failed save leaves the previous checkpoint intact.
    """
    tpath = tensor_path(path)
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    blob = save(contiguous, metadata={"format": "emofuse", "format_version": str(FORMAT_VERSION)})
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


def load_checkpoint(path: Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, meta)``; `path` may name the .safetensors, the .json or the stem.

    The tensor file's checksum is compared with the sidecar's, so truncation or bit flips are
    refused before any tensor is used.
    """
    path = Path(path)
    _refuse_pickle(path)
    if path.is_dir():
        path = path / "model"
    tpath = tensor_path(path)
    if not tpath.is_file():
        raise CheckpointError(f"{tpath}: no such checkpoint", hint="pass the .safetensors file a run wrote (runs/<name>/model.safetensors)")
    meta = read_sidecar(path)
    blob = tpath.read_bytes()
    if verify and meta.get("sha256") and hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise CheckpointError(
            f"{tpath}: checksum mismatch with {sidecar_path(path).name} (file truncated or corrupted)",
            hint="use another checkpoint of the run, or retrain",
        )
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tpath}: not a readable safetensors file ({exc})", hint="use another checkpoint, or retrain") from None
    return tensors, meta
