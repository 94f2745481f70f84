"""One check per component kind; each raises AssertionError naming what a component got wrong (the bug, in
words: "ignores a missing modality", "breaks a batch of one", "ignores the presence mask"...), and one
for a distribution (`check_distribution`): a plugin that does not load fails, it is never skipped."""
from __future__ import annotations

import dataclasses
import importlib.metadata as md
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from emofuse.core.checkpoint import load_checkpoint, save_checkpoint
from emofuse.core.config import ComponentRef, RunConfig
from emofuse.core.engine.compose import build_model
from emofuse.core.engine.model_io import load_model, save_model
from emofuse.core.interfaces import BranchInfo, collate_extracted
from emofuse.core.data.collate import drop_modalities, select
from emofuse.core.registry import ALLOW_ENV, Registry, get_registry
from emofuse.core.testing.batches import make_batch
from emofuse.core.types import EncoderOutput, Sample

NUM_CLASSES = 7


def check_distribution(distribution: str, registry: Registry | None = None) -> None:
    """The distribution is installed, loads, and registers at least one component; else the
    registry's reason (a failed import, a broken component, no entry point, a misspelled name)."""
    registry = registry or get_registry()
    want = normalise_distribution(distribution)
    problems = [str(p) for p in registry.problems if normalise_distribution(p.provider.distribution) == want]
    assert not problems, f"distribution {distribution!r} failed to load: {'; '.join(problems)}"
    if any(normalise_distribution(r.provider.distribution) == want for r in registry.all()):
        return
    providers = {normalise_distribution(p.distribution) for p in registry._providers.values()}
    assert want not in providers, (
        f"distribution {distribution!r} registers no component: its hooks (register_encoders, register_fusions, "
        f"register_losses, register_datasets) return nothing")
    try:
        md.distribution(distribution)
    except md.PackageNotFoundError:
        known = sorted({p.distribution for p in registry._providers.values()} | {p.provider.distribution for p in registry.problems})
        raise AssertionError(f"distribution {distribution!r} is not installed (misspelled? emofuse plugins installed: "
                             f"{', '.join(known) or 'none'})") from None
    raise AssertionError(f"distribution {distribution!r} is installed but declares no 'emofuse' entry point "
                         f"(add [project.entry-points.emofuse] to its pyproject.toml), or {ALLOW_ENV} leaves it out")


def normalise_distribution(name: str) -> str:
    """A distribution name as pip compares them (case, '-', '_' and '.' alike)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def check_encoder(name: str, tmp_path: Path, *, options: Mapping[str, Any] | None = None,
                  registry: Registry | None = None, num_classes: int = NUM_CLASSES) -> None:
    """Forward and backward, a missing modality marked absent, every clip's output independent of the
    rest of its batch, a batch of one, the cached path with media stripped, save and reload."""
    registry = registry or get_registry()
    torch.manual_seed(0)
    config = RunConfig(branches={"b": ComponentRef(name=name, **dict(options or {}))})
    model = build_model(config, num_classes, registry=registry)
    enc = model.branches["b"]
    batch = make_batch(3, num_classes=num_classes)

    model.train()
    logits, outputs = model(batch)
    assert logits.shape == (3, num_classes) and torch.isfinite(logits).all(), f"{name}: bad logits {tuple(logits.shape)}"
    out = outputs["b"]
    assert isinstance(out, EncoderOutput), f"{name}: forward must return an EncoderOutput"
    if out.embedding is not None:
        assert out.embedding.shape == (3, enc.embedding_dim), f"{name}: embedding shape != [B, embedding_dim]"
    torch.nn.functional.cross_entropy(logits, batch.labels).backward()
    trainable = [p for p in enc.parameters() if p.requires_grad]
    assert trainable, f"{name} has nothing to train"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), f"{name}: no gradient reaches it"

    model.eval()
    gappy = make_batch(3, num_classes=num_classes, missing={m: [1] for m in enc.modalities})
    with torch.no_grad():
        g_logits, g_outputs = model(gappy)
    assert torch.isfinite(g_logits).all(), f"{name}: a missing modality gives non-finite logits"
    seen = g_outputs["b"].presence()
    assert seen.shape == (3,) and not bool(seen[1]), (
        f"{name} ignores a missing modality: clip 1 has none of {list(enc.modalities)} (batch.present False), yet "
        f"its EncoderOutput.present says the encoder saw it; return present=batch.present[...] of what it reads")

    with torch.no_grad():
        before, _ = model(batch)
        _check_batch_independence(name, model, batch, before, num_classes)
        if enc.cacheable:  # the trainer's path: features from the cache, no media decoded
            per_sample = enc.extract(batch)
            assert per_sample is not None and len(per_sample) == len(batch), f"{name}: extract must give one dict per sample"
            stripped = dataclasses.replace(batch, video=None, audio=None, audio_lengths=None)
            try:
                cached = enc(stripped, collate_extracted(per_sample)).logits
            except (AttributeError, TypeError) as exc:
                raise AssertionError(
                    f"{name} reads media in forward on the cached path: with features from the cache the batch "
                    f"carries no video or audio (None), so read them only through self.extracted_for(batch, "
                    f"extracted); it raised {type(exc).__name__}: {exc}") from exc
            torch.testing.assert_close(cached, before, msg=lambda m: f"{name}: cached path differs from direct: {m}")
            _check_ablation_from_cache(name, enc, batch, stripped, collate_extracted(per_sample))
    path = save_model(tmp_path / f"{name}-model", model, config, [f"c{i}" for i in range(num_classes)],
                      registry=registry)
    loaded = load_model(path, registry=registry)
    with torch.no_grad():
        after, _ = loaded.model(batch)
    torch.testing.assert_close(after, before, msg=lambda m: f"{name}: reloaded checkpoint differs: {m}")


def _check_ablation_from_cache(name: str, enc: Any, batch: Any, stripped: Any, cached: Mapping[str, torch.Tensor]) -> None:
    """Scoring without a modality reads the features cached with it, the modality marked absent
    (`emofuse.core.engine.encode`): the output must equal extracting without it, so what the encoder
    extracted from an absent modality must not reach its output."""
    for modality in enc.modalities:
        without = drop_modalities(batch, [modality])
        direct = enc(without).logits
        from_cache = enc(drop_modalities(stripped, [modality]), cached).logits
        torch.testing.assert_close(from_cache, direct, rtol=1e-3, atol=1e-4, msg=lambda m: (
            f"{name} reads cached features of an absent modality: with {modality} marked absent (batch.present "
            f"False), its output from features extracted with {modality} differs from extracting without it; gate "
            f"what forward takes from each modality's features by batch.presence({modality!r}): {m}"))


def _check_batch_independence(name: str, model: torch.nn.Module, batch: Any, together: torch.Tensor,
                              num_classes: int) -> None:
    """Each clip scored alone (a batch of one) gets logits ``[1, C]`` equal to its row in the batch."""
    for i in range(len(batch)):
        alone = dataclasses.replace(select(batch, [i]), audio=batch.audio[i:i + 1])  # same padding as together
        logits, _ = model(alone)
        assert logits.shape == (1, num_classes), (
            f"{name} breaks a batch of one: its logits have shape {tuple(logits.shape)}, expected (1, {num_classes}) "
            f"(a .squeeze() without a dim drops the batch dimension)")
        torch.testing.assert_close(logits[0], together[i], rtol=1e-3, atol=1e-4, msg=lambda m: (
            f"{name}: one clip's output depends on the rest of its batch (clip {i} alone differs from clip {i} in a "
            f"batch of {len(batch)}; statistics over the batch dimension?): {m}"))


def branch_outputs(n_branches: int, *, batch: int = 4, dim: int = 16, num_classes: int = NUM_CLASSES,
                   seed: int = 0) -> tuple[dict[str, EncoderOutput], list[BranchInfo]]:
    """Outputs of `n_branches` branches by name (each misses one sample) and their `BranchInfo`s."""
    g = torch.Generator().manual_seed(seed)
    outs = {}
    for i in range(n_branches):
        present = torch.ones(batch, dtype=torch.bool)
        present[i % batch] = False
        outs[f"branch{i}"] = EncoderOutput(torch.randn(batch, num_classes, generator=g),
                                           torch.randn(batch, dim + i, generator=g), present)
    infos = [BranchInfo(f"branch{i}", num_classes, dim + i, ("features",)) for i in range(n_branches)]
    return outs, infos


def check_fusion(name: str, n_branches: int, tmp_path: Path, *, options: Mapping[str, Any] | None = None,
                 registry: Registry | None = None, num_classes: int = NUM_CLASSES) -> None:
    """Any number of branches by name, in any order; trains; reports JSON-able values; reloads."""
    registry = registry or get_registry()
    torch.manual_seed(0)
    cls = registry.cls("fusion", name)
    outs, infos = branch_outputs(n_branches, num_classes=num_classes)
    fusion = cls(cls.make_config(options or {}), num_classes, infos)
    fusion.train()
    logits = fusion(outs)
    assert logits.shape == (4, num_classes) and torch.isfinite(logits).all(), f"{name}: bad fused logits"
    params = list(fusion.trainable_parameters())
    assert params, f"{name} has nothing to train"
    torch.nn.functional.cross_entropy(logits, torch.arange(4) % num_classes).backward()
    assert any(p.grad is not None for p in params), f"{name}: no gradient reaches it"
    assert isinstance(fusion.report(), dict), f"{name}: report() must return a dict"

    fusion.eval()
    with torch.no_grad():
        before = fusion(outs)
        shuffled = dict(reversed(list(outs.items())))
        torch.testing.assert_close(fusion(shuffled), before, msg=lambda m: f"{name}: depends on branch order: {m}")
        _check_absent_branches(name, fusion, outs, before)
    save_checkpoint(tmp_path / f"{name}-fusion", fusion.state_dict(), {"name": name})
    state, _ = load_checkpoint(tmp_path / f"{name}-fusion.safetensors")
    again = cls(cls.make_config(options or {}), num_classes, infos)
    again.load_state_dict(state)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(outs), before, msg=lambda m: f"{name}: reloaded fusion differs: {m}")


def _check_absent_branches(name: str, fusion: Any, outs: Mapping[str, EncoderOutput], before: torch.Tensor) -> None:
    """What an absent branch (present False) returned must not reach the fused logits: other values
    change nothing, and NaN (a branch that could not run) does not leak."""
    def absent_rows_filled(value: float | None) -> dict[str, EncoderOutput]:
        g = torch.Generator().manual_seed(1)
        out = {}
        for b, o in outs.items():
            absent = ~o.presence()

            def fill(t: torch.Tensor | None) -> torch.Tensor | None:
                if t is None:
                    return None
                other = torch.full_like(t, value) if value is not None else torch.randn(t.shape, generator=g) * 100
                return torch.where(absent.unsqueeze(1), other, t)

            out[b] = dataclasses.replace(o, logits=fill(o.logits), embedding=fill(o.embedding))
        return out

    changed = fusion(absent_rows_filled(None))
    torch.testing.assert_close(changed, before, msg=lambda m: (
        f"{name} ignores the presence mask: changing what an absent branch (EncoderOutput.present False) returned "
        f"changed the fused logits; leave absent branches out: {m}"))
    with_nan = fusion(absent_rows_filled(float("nan")))
    assert torch.isfinite(with_nan).all(), (
        f"{name} lets NaN from an absent branch leak into the fused output (0 * NaN is NaN: mask with "
        f"torch.where(present, value, 0), not by multiplying with the presence mask)")


def check_loss(name: str, tmp_path: Path, *, options: Mapping[str, Any] | None = None,
               registry: Registry | None = None, num_classes: int = NUM_CLASSES) -> None:
    """A finite positive scalar with gradients, lower for right answers, unlabelled rows ignored."""
    registry = registry or get_registry()
    cls = registry.cls("loss", name)
    counts = torch.tensor([10, 5, 3, 8, 1, 6, 2][:num_classes] + [4] * max(0, num_classes - 7))
    loss_fn = cls(cls.make_config(options or {}), num_classes, counts)
    logits = torch.randn(6, num_classes, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 6]) % num_classes
    value = loss_fn(logits, labels)
    assert value.dim() == 0 and torch.isfinite(value) and value > 0, f"{name}: not a finite positive scalar"
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all(), f"{name}: bad gradient"
    right = torch.nn.functional.one_hot(labels, num_classes).float() * 10
    assert loss_fn(right, labels) < loss_fn(-right, labels), f"{name}: right answers must cost less than wrong ones"
    with_unlabelled = loss_fn(torch.cat([logits.detach(), torch.randn(2, num_classes)]),
                              torch.cat([labels, torch.tensor([-1, -1])]))
    torch.testing.assert_close(with_unlabelled, value.detach(), msg=lambda m: f"{name}: label -1 must add no loss: {m}")
    state = loss_fn.state_dict()
    if state:
        save_checkpoint(tmp_path / f"{name}-loss", state, {})
        loaded, _ = load_checkpoint(tmp_path / f"{name}-loss.safetensors")
        again = cls(cls.make_config(options or {}), num_classes, counts)
        again.load_state_dict(loaded)
        torch.testing.assert_close(again(logits.detach(), labels), value.detach())


def check_dataset(name: str, data_dir: Path | None, *, options: Mapping[str, Any] | None = None,
                  registry: Registry | None = None) -> None:
    """The reader yields valid samples with labels in its label set and a modality it declares."""
    registry = registry or get_registry()
    cls = registry.cls("dataset", name)
    reader = cls(cls.make_config(options or {}), data_dir=data_dir)
    sample = next(iter(reader.samples()), None)
    assert sample is not None, f"{name}: yields no sample"
    assert isinstance(sample, Sample) and sample.id, f"{name}: samples must be Sample with an id"
    assert reader.label_names and 0 <= sample.label < len(reader.label_names), f"{name}: label outside label_names"
    assert sample.label_name == reader.label_names[sample.label], f"{name}: label_name and label disagree"
    assert any(sample.has(m) for m in reader.modalities), f"{name}: sample carries none of {reader.modalities}"
