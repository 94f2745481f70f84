"""The feature cache: hits, misses, invalidation by input and by config, and crash safety."""
from __future__ import annotations

import shutil
from typing import ClassVar

import pytest
import torch

from emofuse.core.engine.compose import default_data_dir
from emofuse.core.component import ComponentConfig
from emofuse.core.config import DataConfig
from emofuse.core.data.cache import FeatureCache, batch_keys, sample_key
from emofuse.core.data.pipeline import load_data, make_batch
from emofuse.core.interfaces import Encoder
from emofuse.core.types import AUDIO, TEXT, Batch, EncoderOutput

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the shared corpora (../shared/data) are not beside this checkout")


class FrameEnergyConfig(ComponentConfig):
    frame: int = 400


class FrameEnergy(Encoder):
    """Frozen 'backbone': log energy of each `frame`-sample window of the waveform (variable length)."""

    name: ClassVar[str] = "test-frame-energy"
    Config: ClassVar[type[ComponentConfig]] = FrameEnergyConfig
    modalities: ClassVar[tuple[str, ...]] = (AUDIO,)

    def __init__(self, config, num_classes=2):
        super().__init__(config, num_classes)
        self.calls = 0
        self.seen: list[str] = []

    def extract(self, batch: Batch):
        self.calls += 1
        self.seen += batch.ids
        out = []
        for wave, n in zip(batch.audio, batch.audio_lengths):
            frames = wave[: int(n) // self.config.frame * self.config.frame].view(-1, self.config.frame)
            out.append({"energy": frames.pow(2).mean(dim=1).add(1e-8).log(), "peak": wave.abs().max()})
        return out

    def forward(self, batch, extracted=None):
        e = self.extracted_for(batch, extracted)
        return EncoderOutput(logits=e["energy"].mean(dim=1, keepdim=True).expand(-1, self.num_classes))


@pytest.fixture
def corpus(tmp_path):
    """Four real clips copied into a manifest, so the test can change one of them."""
    clips = sorted((DATA / "ravdess-speech" / "Actor_03").glob("03-01-0[2-3]-01-0[12]-01-03.ogg"))
    assert len(clips) == 4
    rows = ["id,label,speaker,audio,text"]
    for i, clip in enumerate(clips):
        shutil.copy(clip, tmp_path / clip.name)
        rows.append(f"c{i},{'calm' if '-02-' in clip.name else 'happy'},Actor_03,{clip.name},words {i}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    config = DataConfig(dataset="manifest", data_dir=tmp_path, split="balanced",
                        options={"path": "m.csv", "labels": ["calm", "happy"]})
    bundle = load_data(config, {"audio"})
    return tmp_path, bundle, sorted(bundle.splits["train"], key=lambda s: s.id)


def test_second_pass_hits_the_cache_and_matches_fresh_output(corpus, tmp_path):
    folder, bundle, samples = corpus
    cache = FeatureCache(tmp_path / "cache")
    enc = FrameEnergy(FrameEnergyConfig())
    batch = make_batch(samples, {"audio"}, bundle.normalizer)
    first = cache.extract(enc, batch)
    assert enc.calls == 1 and cache.stats.misses == 4 and cache.stats.hits == 0
    assert first["energy"].dim() == 2 and first["energy_lengths"].tolist() == [
        int(n) // 400 for n in batch.audio_lengths]
    again = FeatureCache(tmp_path / "cache").extract(enc, batch)  # a new process would see the same
    assert enc.calls == 1
    for key in first:
        assert torch.equal(first[key], again[key])
    direct = enc.extracted_for(batch, None)
    assert torch.allclose(direct["energy"], first["energy"]) and torch.allclose(direct["peak"], first["peak"])
    # Batches built without decoding audio are served entirely from disk.
    no_audio = make_batch(samples, {"text"}, bundle.normalizer)
    assert no_audio.audio is None
    assert torch.equal(cache.extract(enc, no_audio)["energy"], first["energy"])
    assert batch_keys(no_audio, enc.modalities) == batch_keys(batch, enc.modalities)


def test_only_missing_samples_are_computed(corpus, tmp_path):
    _, bundle, samples = corpus
    cache = FeatureCache(tmp_path / "cache")
    enc = FrameEnergy(FrameEnergyConfig())
    cache.extract(enc, make_batch(samples[:2], {"audio"}, bundle.normalizer))
    enc.seen.clear()
    out = cache.extract(enc, make_batch(samples, {"audio"}, bundle.normalizer))
    assert enc.seen == [samples[2].id, samples[3].id] and out["energy"].shape[0] == 4


def test_changed_input_file_or_config_invalidates_only_what_changed(corpus, tmp_path):
    folder, bundle, samples = corpus
    cache = FeatureCache(tmp_path / "cache")
    enc = FrameEnergy(FrameEnergyConfig())
    cache.extract(enc, make_batch(samples, {"audio"}, bundle.normalizer))
    # Replace one clip's file with another recording: its key changes, the others stay cached.
    target = samples[1].audio_path
    shutil.copy(DATA / "ravdess-speech" / "Actor_05" / "03-01-03-02-02-02-05.ogg", target)
    enc.seen.clear()
    cache.extract(enc, make_batch(samples, {"audio"}, bundle.normalizer))
    assert enc.seen == [samples[1].id]
    # Another text does not touch an audio encoder's entries.
    samples[0].text = "different words"
    enc.seen.clear()
    cache.extract(enc, make_batch(samples, {"audio"}, bundle.normalizer))
    assert enc.seen == []
    assert sample_key(samples[0], {TEXT}) != sample_key(samples[2], {TEXT})
    # Another option means another fingerprint, hence a separate namespace.
    other = FrameEnergy(FrameEnergyConfig(frame=800))
    cache.extract(other, make_batch(samples, {"audio"}, bundle.normalizer))
    assert other.calls == 1 and len(cache.namespaces()) == 2


def test_interrupted_or_damaged_writes_are_never_trusted(corpus, tmp_path):
    _, bundle, samples = corpus
    root = tmp_path / "cache"
    cache = FeatureCache(root)
    enc = FrameEnergy(FrameEnergyConfig())
    batch = make_batch(samples, {"audio"}, bundle.normalizer)
    cache.extract(enc, batch)
    (shard,) = list(root.glob("*/*.safetensors"))
    (shard.parent / f".{shard.name}.123.tmp").write_bytes(shard.read_bytes()[:100])  # a crash mid-write
    shard.write_bytes(shard.read_bytes()[:200])  # a damaged shard
    fresh = FeatureCache(root)
    enc.calls = 0
    out = fresh.extract(enc, batch)
    assert enc.calls == 1 and out["energy"].shape[0] == 4
    assert list(root.glob("*/*.corrupt"))  # the damaged shard is set aside, not reread
    assert FeatureCache(root).missing(fresh.namespaces()[0], batch_keys(batch, enc.modalities)) == []


def test_put_and_get_many_round_trip_any_tensors(tmp_path):
    cache = FeatureCache(tmp_path)
    values = [{"x": torch.arange(6, dtype=torch.float16).view(2, 3), "n": torch.tensor(3)}, {}]
    cache.put_many("ns-1", ["k1", "k2"], values)
    got = cache.get_many("ns-1", ["k2", "nope", "k1"])
    assert got[0] == {} and got[1] is None
    assert torch.equal(got[2]["x"], values[0]["x"]) and got[2]["x"].dtype == torch.float16
    with pytest.raises(ValueError):
        cache.put_many("../escape", ["k"], [{}])


def test_warm_fills_the_cache_from_a_loader_once(corpus, tmp_path):
    _, bundle, samples = corpus
    cache = FeatureCache(tmp_path / "cache")
    enc = FrameEnergy(FrameEnergyConfig())
    loader = bundle.loader("train", batch_size=3, shuffle=False, seed=0, modalities={"audio"}, num_workers=2)
    first = cache.warm([enc], loader, progress=False)
    assert (first.hits, first.misses) == (0, len(samples))
    again = cache.warm({"audio": enc}, loader, progress=False)
    assert (again.hits, again.misses) == (len(samples), 0) and again.hit_rate == 1.0


def test_temp_shards_of_killed_writers_are_removed_on_the_next_open(tmp_path):
    """`_atomic_write` names its temp file by pid; one whose writer is gone (or that is very old) is
    debris of a kill mid-write. A recent temp of a live writer is left alone."""
    import os
    import subprocess
    import sys
    import time

    from emofuse.core.data import cache as cache_module

    FeatureCache(tmp_path).put_many("ns", ["a"], [{"x": torch.ones(2)}])
    folder = tmp_path / "ns"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    old = time.time() - cache_module.DEAD_WRITER_GRACE_S - 10
    dead = folder / f".x-1.safetensors.{dead_pid}.tmp"
    ancient = folder / f".x-2.safetensors.{os.getpid()}.tmp"
    live = folder / f".x-3.safetensors.{os.getpid()}.tmp"
    for path, mtime in ((dead, old), (ancient, time.time() - cache_module.ABANDONED_AFTER_S - 10), (live, old)):
        path.write_bytes(b"half a shard")
        os.utime(path, (mtime, mtime))
    reopened = FeatureCache(tmp_path)
    assert torch.equal(reopened.get_many("ns", ["a"])[0]["x"], torch.ones(2))
    assert not dead.exists() and not ancient.exists()
    assert live.exists()  # its writer (this process) may still rename it


def test_a_full_disk_while_caching_is_a_one_line_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import os

    from emofuse.core.errors import EmofuseError

    cache = FeatureCache(tmp_path)

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(EmofuseError, match="No space left on device.*cache") as info:
        cache.put_many("enc-abc", ["k1"], [{"x": torch.ones(3)}])
    assert isinstance(info.value, OSError) and "\n" not in str(info.value)
    monkeypatch.undo()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert cache.get_many("enc-abc", ["k1"]) == [None]


def _flip_tensor_bytes(shard, count=64):
    """Invert `count` bytes in the middle of a safetensors file's tensor data (after its header)."""
    import struct

    raw = bytearray(shard.read_bytes())
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    middle = data_start + (len(raw) - data_start - count) // 2
    for i in range(middle, middle + count):
        raw[i] ^= 0xFF
    shard.write_bytes(bytes(raw))


def test_flipped_tensor_bytes_are_detected_and_the_entries_recomputed_with_one_line(corpus, tmp_path):
    """A shard whose tensor bytes changed on disk (bit rot, a bad copy) still parses; its checksum
    catches it, the shard is set aside and its entries computed again, and one line says so."""
    _, bundle, samples = corpus
    root = tmp_path / "cache"
    enc = FrameEnergy(FrameEnergyConfig())
    batch = make_batch(samples, {"audio"}, bundle.normalizer)
    clean = FeatureCache(root).extract(enc, batch)
    (shard,) = list(root.glob("*/*.safetensors"))
    _flip_tensor_bytes(shard)

    said = []
    fresh = FeatureCache(root, notify=said.append)
    namespace = fresh.namespaces()[0]
    keys = batch_keys(batch, enc.modalities)
    assert sorted(fresh.missing(namespace, keys)) == sorted(keys)  # the up-front check of a trainer
    assert len(said) == 1 and "fails its checksum" in said[0] and shard.name in said[0]
    enc.calls = 0
    out = fresh.extract(enc, batch)
    assert enc.calls == 1
    for key in clean:
        assert torch.equal(out[key], clean[key])
    assert list(root.glob("*/*.corrupt"))


def test_a_direct_read_of_flipped_bytes_returns_nothing_rather_than_the_damaged_tensors(tmp_path):
    said = []
    FeatureCache(tmp_path).put_many("ns", ["a", "b"], [{"x": torch.arange(64.0)}, {"x": torch.ones(64)}])
    (shard,) = list(tmp_path.glob("ns/*.safetensors"))
    _flip_tensor_bytes(shard)
    assert FeatureCache(tmp_path, notify=said.append).get_many("ns", ["a", "b"]) == [None, None]
    assert len(said) == 1 and "checksum" in said[0]
