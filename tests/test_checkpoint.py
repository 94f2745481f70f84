"""Checkpoints: safetensors + JSON sidecar, atomic writes, checksums, pickles refused."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from emofuse.core import checkpoint as ckpt
from emofuse.core.errors import CheckpointError


def test_round_trip_keeps_tensors_and_meta(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b.c": torch.arange(5)}
    path = ckpt.save_checkpoint(tmp_path / "model", tensors, {"label_names": ["x", "y"]})
    assert path.name == "model.safetensors" and (tmp_path / "model.json").is_file()
    loaded, meta = ckpt.load_checkpoint(path)
    assert meta["label_names"] == ["x", "y"] and len(meta["sha256"]) == 64
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".pkl", ".ckpt"])
def test_pickles_are_refused_without_unpickling(tmp_path, suffix):
    evil = tmp_path / f"model{suffix}"
    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CheckpointError, match="refusing to load a pickle-based file"):
        ckpt.load_checkpoint(evil)


def test_pickle_renamed_to_safetensors_is_refused(tmp_path):
    ckpt.save_checkpoint(tmp_path / "model", {"a": torch.ones(2)}, {})
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ckpt.load_checkpoint(tmp_path / "model.safetensors", verify=False)


def test_bit_flip_and_truncation_are_detected(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "model", {"a": torch.randn(100)}, {})
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.load_checkpoint(path)
    path.write_bytes(bytes(data[:50]))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ckpt.load_checkpoint(path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "model", {"a": torch.zeros(3)}, {"v": 1})

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path / "model", {"a": torch.ones(3)}, {"v": 2})
    monkeypatch.undo()
    tensors, meta = ckpt.load_checkpoint(path)
    assert meta["v"] == 1 and torch.equal(tensors["a"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_missing_sidecar_is_a_clear_error_unless_the_tensor_file_carries_its_metadata(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "model", {"a": torch.zeros(1)}, {"v": 3})
    (tmp_path / "model.json").unlink()
    tensors, meta = ckpt.load_checkpoint(path)  # the tensor file is complete by itself
    assert meta["v"] == 3 and torch.equal(tensors["a"], torch.zeros(1))
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(path))  # a plain safetensors file, no emofuse header
    with pytest.raises(CheckpointError, match="sidecar missing"):
        ckpt.load_checkpoint(path)


def test_a_kill_between_the_two_renames_loads_the_new_checkpoint_whole(tmp_path, monkeypatch):
    """Tensors are renamed first, the sidecar last: dying in between leaves new tensors beside an old
    sidecar. The tensor file's own header (metadata + tensor hash) makes it load as the new checkpoint."""
    path = ckpt.save_checkpoint(tmp_path / "model", {"a": torch.zeros(3)}, {"v": 1})
    real_replace, renames = os.replace, []

    def die_before_the_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt  # stands in for SIGKILL: the rest of the save never runs
        renames.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_before_the_sidecar)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path / "model", {"a": torch.ones(3)}, {"v": 2})
    monkeypatch.undo()
    assert [p.name for p in renames] == ["model.safetensors"]
    assert ckpt.read_sidecar(path)["v"] == 1  # the sidecar is the stale half
    tensors, meta = ckpt.load_checkpoint(path)
    assert meta["v"] == 2 and torch.equal(tensors["a"], torch.ones(3))
    assert meta["sha256"] == ckpt.checkpoint_sha256(path)
