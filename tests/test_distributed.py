"""Data parallelism: `train_run` under torchrun with 2 processes (gloo on CPU) matches 1 process.

"Same result" means: with the global batch size held equal, the 2-process run ends with the same
metrics on every split, the same per-epoch validation losses and the same learned fusion weights
as the single-process run, up to float summation order (1e-5). The branches here have no batch
norm and no dropout: batch-norm statistics are per process under DDP and dropout masks are drawn
per process, so models with either are equivalent in distribution, not bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from emofuse.core.engine.distributed import ShardedBatchSampler, global_batches, shard

VENV_BIN = Path(sys.executable).parent

WORKER = textwrap.dedent('''
    """Runs train_run once (alone, or as one rank of a torchrun job) and writes the result as JSON."""
    import json, os, sys
    import torch
    from pydantic import Field
    from torch import nn

    torch.set_num_threads(1)
    from emofuse.core.component import ComponentConfig
    from emofuse.core.config import validate
    from emofuse.core.hookspecs import hookimpl
    from emofuse.core.interfaces import Encoder
    from emofuse.core.registry import Provider, Registry
    from emofuse.core.engine.training import train_run
    from emofuse.core.types import FEATURES, EncoderOutput


    class LinearFeaturesConfig(ComponentConfig):
        feature: str = "au"
        dim: int = Field(35, ge=1)
        hidden: int = 32


    class LinearFeatures(Encoder):
        """Two linear layers over one feature set: no batch norm, no dropout."""

        name = "test-linear-features"
        modalities = (FEATURES,)
        Config = LinearFeaturesConfig

        def __init__(self, config, num_classes):
            super().__init__(config, num_classes)
            self.hidden = nn.Linear(config.dim, config.hidden)
            self.out = nn.Linear(config.hidden, num_classes)
            self.embedding_dim = config.hidden

        def forward(self, batch, extracted=None):
            h = torch.relu(self.hidden(batch.features[self.config.feature].float()))
            return EncoderOutput(self.out(h), h, present=batch.present[FEATURES])


    @hookimpl
    def register_encoders():
        return [LinearFeatures]


    registry = Registry().load_entry_points()
    registry.add_plugin(sys.modules[__name__], Provider("dist-test", "emofuse-tests", "0"))
    result = train_run(validate(json.loads(sys.argv[1])), registry=registry, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        out = {"metrics": result.metrics, "history": result.history, "report": result.fusion_report,
               "branches": {b: r.metrics for b, r in result.branch_results.items()},
               "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
        open(sys.argv[2], "w").write(json.dumps(out))
''')


def test_global_batches_are_cut_the_same_for_any_world_size():
    one = global_batches(50, 8, shuffle=True, seed=3, epoch=2, min_last=1)
    assert sorted(i for b in one for i in b) == list(range(50))
    for world in (2, 4):
        parts = []
        for rank in range(world):
            sampler = ShardedBatchSampler(50, 8, shuffle=True, seed=3, rank=rank, world_size=world)
            sampler.set_epoch(2)
            parts.append(list(sampler))
        per_rank = [len(p) for p in parts]
        assert len(set(per_rank)) == 1  # every rank steps the same number of times
        for k, batch in enumerate(one[: per_rank[0]]):
            assert sorted(i for p in parts for i in p[k]) == sorted(batch)
    # a last global batch smaller than the world is dropped, not split unevenly into empty shards
    assert len(global_batches(17, 8, shuffle=False, seed=0, epoch=0, min_last=2)) == 2
    assert shard([0, 1, 2, 3, 4], 1, 2) == [1, 3]
    assert global_batches(10, 4, shuffle=True, seed=1, epoch=0, min_last=1) != \
        global_batches(10, 4, shuffle=True, seed=1, epoch=1, min_last=1)


def _config(out: Path, data_dir: Path) -> dict:
    return {
        "name": "ddp", "output_dir": str(out), "cache_dir": str(out / "cache"),
        "data": {"dataset": "ravdess", "data_dir": str(data_dir), "limit": 240},
        "branches": {
            "video": {"name": "test-linear-features", "feature": "au", "dim": 35},
            "audio": {"name": "test-linear-features", "feature": "mfcc", "dim": 259},
        },
        "fusion": {"name": "enhanced-late"},
        "loss": {"name": "focal", "gamma": 2.0, "alpha": "balanced"},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "seed": 5, "device": "cpu"},
        "fusion_train": {"epochs": 4, "batch_size": 8, "grad_accumulation": 2, "lr": 1e-2, "seed": 5, "device": "cpu"},
    }


def _run(cmd: list[str], tmp: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_match_one(tmp_path, shared_data):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    _run([sys.executable, str(worker), json.dumps(_config(tmp_path / "single", shared_data)), str(one)], tmp_path)
    _run([str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(worker),
          json.dumps(_config(tmp_path / "ddp", shared_data)), str(two)], tmp_path)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for split in ("train", "val", "test"):
        assert b["metrics"][split] == pytest.approx(a["metrics"][split], abs=1e-5), split
        for branch in ("video", "audio"):
            assert b["branches"][branch][split] == pytest.approx(a["branches"][branch][split], abs=1e-5)
    assert [r["val_loss"] for r in b["history"]] == pytest.approx([r["val_loss"] for r in a["history"]], abs=1e-5)
    assert [r["train_loss"] for r in b["history"]] == pytest.approx([r["train_loss"] for r in a["history"]], abs=1e-5)
    assert b["report"]["raw_weights"] == pytest.approx(a["report"]["raw_weights"], abs=1e-5)
    assert b["report"]["class_bias"] == pytest.approx(a["report"]["class_bias"], abs=1e-5)
    # only rank 0 wrote: one history file whose rows are the fusion epochs, once each
    rows = (tmp_path / "ddp" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [0, 1, 2, 3]


def test_training_never_ends_an_epoch_on_a_single_sample():
    # batch norm cannot train on one sample: 33 clips in batches of 32 give one batch, not 32 + 1
    assert [len(b) for b in ShardedBatchSampler(33, 32, shuffle=True, seed=0)] == [32]
    assert [len(b) for b in ShardedBatchSampler(34, 32, shuffle=True, seed=0)] == [32, 2]
    # evaluation keeps every sample
    assert [len(b) for b in ShardedBatchSampler(33, 32, shuffle=False, seed=0, drop_small_last=False)] == [32, 1]


def test_length_grouped_batches_pad_less_and_still_cover_every_sample_once():
    lengths = [(i * 37) % 101 for i in range(2000)]  # lengths unrelated to position
    plain = global_batches(2000, 16, shuffle=True, seed=0, epoch=0, min_last=1)
    grouped = global_batches(2000, 16, shuffle=True, seed=0, epoch=0, min_last=1, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(2000))

    def padded(batches):  # what batches pad to: each batch's longest sample times its size
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.6 * padded(plain)
    # the batches are shuffled (not ordered by length), differ by epoch, and shard like any others
    first = [max(lengths[i] for i in b) for b in grouped]
    assert first != sorted(first) and first != sorted(first, reverse=True)
    assert grouped != global_batches(2000, 16, shuffle=True, seed=0, epoch=1, min_last=1, lengths=lengths)
    parts = [list(ShardedBatchSampler(2000, 16, shuffle=True, seed=0, rank=r, world_size=2, lengths=lengths))
             for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*parts)] == [sorted(b) for b in grouped]
    # evaluation order is untouched
    assert global_batches(40, 16, shuffle=False, seed=0, epoch=0, min_last=1, lengths=lengths[:40]) == \
        global_batches(40, 16, shuffle=False, seed=0, epoch=0, min_last=1)
    with pytest.raises(ValueError, match="3 lengths for 40 samples"):
        global_batches(40, 16, shuffle=True, seed=0, epoch=0, min_last=1, lengths=[1, 2, 3])
