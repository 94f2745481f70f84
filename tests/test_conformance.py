"""One conformance test over every registered component (timm's test_models style).

Every encoder, fusion and loss, built-in or third-party, is constructed with its defaults, runs
forward and backward, and survives a save/reload through safetensors with identical outputs.
Every dataset reader with no required option yields a valid first sample from the real data.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from emofuse.core.checkpoint import load_checkpoint, save_checkpoint
from emofuse.core.config import ComponentRef, RunConfig
from emofuse.core.interfaces import BranchInfo
from emofuse.core.engine.model_io import load_model, save_model
from emofuse.core.engine.compose import build_model
from emofuse.core.registry import get_registry
from emofuse.core.types import EncoderOutput, Sample

from conftest import make_batch

REG = get_registry()
NUM_CLASSES = 7


def _seeded(seed=0):
    torch.manual_seed(seed)


@pytest.mark.parametrize("name", REG.names("encoder"))
def test_encoder_conformance(name, tmp_path):
    _seeded()
    config = RunConfig(branches={"b": ComponentRef(name=name)})
    model = build_model(config, NUM_CLASSES)
    enc = model.branches["b"]
    batch = make_batch(3, num_classes=NUM_CLASSES)

    model.train()
    logits, outputs = model(batch)
    assert logits.shape == (3, NUM_CLASSES) and torch.isfinite(logits).all()
    out = outputs["b"]
    assert isinstance(out, EncoderOutput)
    if out.embedding is not None:
        assert out.embedding.shape == (3, enc.embedding_dim)
    torch.nn.functional.cross_entropy(logits, batch.labels).backward()
    trainable = [p for p in enc.parameters() if p.requires_grad]
    assert trainable, f"{name} has nothing to train"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)

    # a missing modality is data, not a crash
    gappy = make_batch(3, num_classes=NUM_CLASSES, missing={m: [1] for m in enc.modalities})
    model.eval()
    with torch.no_grad():
        g_logits, _ = model(gappy)
    assert torch.isfinite(g_logits).all()

    with torch.no_grad():
        before, _ = model(batch)
    path = save_model(tmp_path / "model", model, config, [f"c{i}" for i in range(NUM_CLASSES)])
    loaded = load_model(path)
    with torch.no_grad():
        after, _ = loaded.model(batch)
    torch.testing.assert_close(after, before)


def _branch_outputs(n_branches=2, batch=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = {}
    for i in range(n_branches):
        present = torch.ones(batch, dtype=torch.bool)
        present[i % batch] = False  # every branch misses one sample
        outs[f"branch{i}"] = EncoderOutput(torch.randn(batch, NUM_CLASSES, generator=g),
                                           torch.randn(batch, dim + i, generator=g), present)
    infos = [BranchInfo(f"branch{i}", NUM_CLASSES, dim + i, ("features",)) for i in range(n_branches)]
    return outs, infos


@pytest.mark.parametrize("name,n_branches", list(itertools.product(REG.names("fusion"), [1, 2, 3])))
def test_fusion_conformance(name, n_branches, tmp_path):
    _seeded()
    cls = REG.cls("fusion", name)
    outs, infos = _branch_outputs(n_branches)
    fusion = cls(cls.make_config({}), NUM_CLASSES, infos)
    fusion.train()
    logits = fusion(outs)
    assert logits.shape == (4, NUM_CLASSES) and torch.isfinite(logits).all()
    params = list(fusion.trainable_parameters())
    assert params, f"{name} has nothing to train"
    torch.nn.functional.cross_entropy(logits, torch.arange(4) % NUM_CLASSES).backward()
    assert any(p.grad is not None for p in params)
    report = fusion.report()
    assert isinstance(report, dict)

    fusion.eval()
    with torch.no_grad():
        before = fusion(outs)
    save_checkpoint(tmp_path / "fusion", fusion.state_dict(), {"name": name})
    state, _ = load_checkpoint(tmp_path / "fusion.safetensors")
    again = cls(cls.make_config({}), NUM_CLASSES, infos)
    again.load_state_dict(state)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(outs), before)


@pytest.mark.parametrize("name", REG.names("loss"))
def test_loss_conformance(name, tmp_path):
    cls = REG.cls("loss", name)
    counts = torch.tensor([10, 5, 3, 8, 1, 6, 2])
    loss_fn = cls(cls.make_config({}), NUM_CLASSES, counts)
    logits = torch.randn(6, NUM_CLASSES, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 6])
    value = loss_fn(logits, labels)
    assert value.dim() == 0 and torch.isfinite(value) and value > 0
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # confident correct predictions cost less than confident wrong ones
    right = torch.nn.functional.one_hot(labels, NUM_CLASSES).float() * 10
    assert loss_fn(right, labels) < loss_fn(-right, labels)
    state = loss_fn.state_dict()
    if state:
        save_checkpoint(tmp_path / "loss", state, {})
        loaded, _ = load_checkpoint(tmp_path / "loss.safetensors")
        again = cls(cls.make_config({}), NUM_CLASSES, counts)
        again.load_state_dict(loaded)
        torch.testing.assert_close(again(logits.detach(), labels), value.detach())


def _defaults_suffice(cls) -> bool:
    return all(not f.is_required() for f in cls.Config.model_fields.values())


@pytest.mark.parametrize("name", REG.names("dataset"))
def test_dataset_conformance(name, shared_data):
    cls = REG.cls("dataset", name)
    if not _defaults_suffice(cls):
        required = [k for k, f in cls.Config.model_fields.items() if f.is_required()]
        pytest.skip(f"{name} needs options {required}; it is tested in its own test file")
    reader = cls(cls.make_config({}), data_dir=shared_data)
    sample = next(iter(reader.samples()))
    assert isinstance(sample, Sample) and sample.id
    assert reader.label_names and 0 <= sample.label < len(reader.label_names)
    assert sample.label_name == reader.label_names[sample.label]
    assert any(sample.has(m) for m in reader.modalities)
