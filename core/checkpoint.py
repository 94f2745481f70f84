"""Checkpoints: tensors in safetensors, everything else in a JSON sidecar beside them.

`model.safetensors` + `model.json` (config, class names, component names and the versions of the
plugins that made them, metrics, a checksum of the tensor file). Writes are atomic (temp file +
fsync + rename), so a crash mid-save leaves the previous checkpoint intact. The tensor file also
carries the same metadata and a hash of its tensors in its own header, so it is complete by itself:
a kill between the two renames (new tensors, old sidecar) still loads the new checkpoint whole.
A seal in that header, a hash over the tensors' hash and the metadata text, covers what the
checkpoint means (class names, config, components): an edited header breaks the seal, and a
sidecar that differs from the sealed metadata is refused, so the same scores never come back under
other class names.
Loading never unpickles: a ``.pt``/``.pth``/``.pkl`` file is refused.
"""
from __future__ import annotations

import contextlib
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
#: Header key of the seal: a hash over the tensors' hash and the embedded metadata text together.
SEAL_KEY = "emofuse_seal_sha256"
#: Sidecar keys that describe the tensor file itself (not part of the embedded metadata).
FILE_KEYS = ("sha256", "tensor_file")
REMEDY = "restore the checkpoint from its run folder, or retrain"


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
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


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
    tensors_hash = tensors_sha256(contiguous)
    blob = save(contiguous, metadata={"format": "emofuse", "format_version": str(FORMAT_VERSION),
                                      META_KEY: embedded, TENSORS_HASH_KEY: tensors_hash,
                                      SEAL_KEY: _seal(tensors_hash, embedded)})
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
        meta = json.loads(spath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{spath}: sidecar is not valid JSON ({exc})", hint="restore it from the run folder") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{spath}: sidecar holds a JSON {type(meta).__name__}, not an object",
                              hint="restore it from the run folder")
    return meta


def _seal(tensors_hash: str, embedded_meta: str) -> str:
    return hashlib.sha256(f"{tensors_hash}\n{embedded_meta}".encode()).hexdigest()


def _canonical(meta: Mapping[str, Any]) -> dict[str, str]:
    """Each metadata key as canonical JSON text (NaN metrics compare equal this way)."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in meta.items() if k not in FILE_KEYS}


def _check_sidecar_agrees(sidecar: Mapping[str, Any], embedded: Mapping[str, Any], spath: Path, tpath: Path) -> None:
    """Refuse a sidecar whose content differs from the metadata carried inside the tensor file."""
    a, b = _canonical(sidecar), _canonical(embedded)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if differ:
        raise CheckpointError(
            f"{spath}: {', '.join(map(repr, differ[:4]))}{', ...' if len(differ) > 4 else ''} differ from the metadata "
            f"sealed in {tpath.name} (the sidecar was edited)",
            hint=f"delete {spath.name} (the tensor file is complete by itself) or {REMEDY}")


def _embedded(blob: bytes, tpath: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    """The tensor file's header metadata and the emofuse metadata inside it (None when it has none)."""
    try:
        header = _header_metadata(blob)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{tpath}: not a readable safetensors file ({exc})", hint=REMEDY) from None
    if META_KEY not in header:
        return header, None
    try:
        meta = json.loads(header[META_KEY])
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{tpath}: the metadata in its header is not a JSON object", hint=REMEDY)
    return header, meta


def _load_tensors(blob: bytes, tpath: Path) -> dict[str, torch.Tensor]:
    try:
        return load(blob)
    except (SafetensorError, OSError, ValueError, TypeError, OverflowError) as exc:
        raise CheckpointError(f"{tpath}: not a readable safetensors file ({exc})",
                              hint="use another checkpoint, or retrain") from None


def _header_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header (8-byte little-endian length, then a JSON object)."""
    if len(blob) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(blob[:8], "little")
    if size > len(blob) - 8:
        raise ValueError("header longer than the file")
    try:
        header = json.loads(blob[8:8 + size])
    except UnicodeDecodeError as exc:
        raise ValueError(f"header is not UTF-8 ({exc.reason})") from None
    if not isinstance(header, dict):
        raise ValueError(f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("header __metadata__ is not a map of strings")
    return dict(metadata)


def load_checkpoint(path: Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, meta)``; `path` may name the .safetensors, the .json or the stem.

    A sealed tensor file (see the module docstring) is checked against its own seal and is the
    authority on its metadata: a sidecar that belongs to it (same checksum, or none) must agree with
    it; one with another checksum is the stale half of an interrupted save and is ignored. A file
    from before the seal loads only beside a sidecar whose checksum matches it and whose content
    agrees with the metadata embedded in it. ``verify=False`` skips the checks (reading damaged files).
    """
    path = Path(path)
    _refuse_pickle(path)
    if path.is_dir():
        path = path / "model"
    tpath, spath = tensor_path(path), sidecar_path(path)
    if not tpath.is_file():
        raise CheckpointError(f"{tpath}: no such checkpoint", hint="pass the .safetensors file a run wrote (runs/<name>/model.safetensors)")
    blob = tpath.read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    sidecar = read_sidecar(path) if spath.is_file() else None
    if not verify:
        tensors = _load_tensors(blob, tpath)
        return tensors, dict(sidecar if sidecar is not None else _embedded(blob, tpath)[1] or {})
    own_sidecar = sidecar is not None and sidecar.get("sha256") in (None, sha)
    try:
        header, embedded = _embedded(blob, tpath)
    except CheckpointError:
        if sidecar is not None and not own_sidecar:
            raise _mismatch(tpath) from None
        raise
    if SEAL_KEY in header:
        tensors = _load_tensors(blob, tpath)
        if (embedded is None or header.get(TENSORS_HASH_KEY) != tensors_sha256(tensors)
                or header[SEAL_KEY] != _seal(header[TENSORS_HASH_KEY], header[META_KEY])):
            if sidecar is not None and not own_sidecar:
                raise _mismatch(tpath)
            raise CheckpointError(f"{tpath}: its tensors or the metadata in its header do not match its seal "
                                  "(the file was edited or corrupted)", hint=REMEDY)
        if own_sidecar:
            _check_sidecar_agrees(sidecar, embedded, spath, tpath)
        return tensors, {**embedded, "sha256": sha, "tensor_file": tpath.name}
    if sidecar is None:
        read_sidecar(path)  # raises the clear "sidecar missing" error
    if not own_sidecar:
        raise _mismatch(tpath)
    tensors = _load_tensors(blob, tpath)
    if embedded is None:
        raise CheckpointError(f"{tpath}: carries no metadata of its own (written by an emofuse before the "
                              "metadata was embedded, or not by emofuse), so its class names cannot be verified",
                              hint="retrain it with this version")
    _check_sidecar_agrees(sidecar, embedded, spath, tpath)
    return tensors, sidecar


def _mismatch(tpath: Path) -> CheckpointError:
    return CheckpointError(f"{tpath}: checksum mismatch with {sidecar_path(tpath).name} (file truncated or corrupted)",
                           hint="use another checkpoint of the run, or retrain")


def checkpoint_sha256(path: Path) -> str:
    """The hash of a checkpoint's tensor file: an identity for whatever was computed from it."""
    return hashlib.sha256(tensor_path(Path(path)).read_bytes()).hexdigest()
