"""Saving and rebuilding a whole composed model: weights, normaliser, config, labels and provenance.

A reload rebuilds every component from the config stored in the sidecar through the registry, so
a checkpoint made with a plugin that is no longer installed says which distribution is missing.
"""
from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from emofuse.core.checkpoint import load_checkpoint, save_checkpoint
from emofuse.core.config import RunConfig, validate
from emofuse.core.engine.compose import ComposedModel, build_model
from emofuse.core.errors import CheckpointError, PluginError
from emofuse.core.registry import Registry, get_registry

MODEL_PREFIX = "model."
NORMALIZER_PREFIX = "normalizer."


def model_state(model: ComposedModel) -> dict[str, torch.Tensor]:
    """The tensors to keep: every branch's `checkpoint_state` (frozen pretrained parts left out) and the fusion."""
    state: dict[str, torch.Tensor] = {}
    for name, enc in model.branches.items():
        for k, v in enc.checkpoint_state().items():
            state[f"branches.{name}.{k}"] = v
    if model.fusion is not None:
        for k, v in model.fusion.state_dict().items():
            state[f"fusion.{k}"] = v
    return state


def components_of(config: RunConfig, registry: Registry) -> list[dict[str, str]]:
    """Which component (and which plugin distribution/version) made each part of the model."""
    rows = [{"role": f"branches.{b}", "kind": "encoder", "name": ref.name, **registry.provenance("encoder", ref.name)}
            for b, ref in config.branches.items()]
    if config.fusion is not None:
        rows.append({"role": "fusion", "kind": "fusion", "name": config.fusion.name,
                     **registry.provenance("fusion", config.fusion.name)})
    rows.append({"role": "loss", "kind": "loss", "name": config.loss.name, **registry.provenance("loss", config.loss.name)})
    if config.fusion_loss is not None:
        rows.append({"role": "fusion_loss", "kind": "loss", "name": config.fusion_loss.name,
                     **registry.provenance("loss", config.fusion_loss.name)})
    return rows


def save_model(
    path: Path,
    model: ComposedModel,
    config: RunConfig,
    label_names: list[str],
    *,
    normalizer_state: Mapping[str, torch.Tensor] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    registry: Registry | None = None,
) -> Path:
    registry = registry or get_registry()
    tensors = {MODEL_PREFIX + k: v for k, v in model_state(model).items()}
    for k, v in (normalizer_state or {}).items():
        tensors[NORMALIZER_PREFIX + k] = v
    meta = {
        "emofuse_version": _emofuse_version(),
        "config": config.model_dump(mode="json"),
        "label_names": list(label_names),
        "components": components_of(config, registry),
        # The sidecar's JSON has sorted keys, so the config's branch order is lost there; a fusion's
        # inputs are positional (a feature-level fusion concatenates embeddings), so keep it apart.
        "branch_order": list(model.branches),
        "metrics": dict(metrics or {}),
        "fusion_report": model.fusion.report() if model.fusion is not None else None,
        **dict(extra or {}),
    }
    return save_checkpoint(path, tensors, meta)


@dataclass
class LoadedModel:
    model: ComposedModel
    config: RunConfig
    label_names: list[str]
    normalizer_state: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def _in_saved_branch_order(config: RunConfig, order: list[str] | None, path: Path) -> RunConfig:
    """`config` with its branches in the order the model was trained with (the fusion's input order)."""
    if order is None:
        return config
    if sorted(order) != sorted(config.branches):
        raise CheckpointError(f"{path}: sidecar branch_order {order} does not name the config's branches "
                              f"{sorted(config.branches)}", hint="the sidecar was edited; restore it")
    return config.model_copy(update={"branches": {name: config.branches[name] for name in order}})


def _check_meta_types(meta: Mapping[str, Any], path: Path) -> None:
    """The metadata a rebuild reads has the types it needs, else one `CheckpointError` naming the key."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: metadata {key!r} {what}", hint="this is not an intact emofuse checkpoint")

    for key in ("config", "label_names"):
        if key not in meta:
            raise bad(key, "is missing")
    if not isinstance(meta["config"], dict):
        raise bad("config", f"is a {type(meta['config']).__name__}, not a table")
    labels = meta["label_names"]
    if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels)
            or len(set(labels)) != len(labels)):
        raise bad("label_names", "is not a list of distinct class names")
    components = meta.get("components", [])
    if not isinstance(components, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("kind"), str) for c in components):
        raise bad("components", "is not a list of {kind, name} entries")
    order = meta.get("branch_order")
    if order is not None and (not isinstance(order, list) or not all(isinstance(b, str) for b in order)):
        raise bad("branch_order", "is not a list of branch names")


def load_model(path: Path, registry: Registry | None = None) -> LoadedModel:
    """Rebuild the composed model a checkpoint describes and load its weights."""
    registry = registry or get_registry()
    tensors, meta = load_checkpoint(path)
    _check_meta_types(meta, path)
    config = validate(meta["config"], source=f"{path} (sidecar config)")
    label_names = list(meta["label_names"])
    for comp in meta.get("components", []):
        if comp["name"] not in registry.components.get(comp["kind"], {}):
            made_with = f"{comp.get('distribution')} {comp.get('version')}"
            failed = [p for p in registry.problems if p.provider.distribution == comp.get("distribution")]
            if failed:
                raise PluginError(f"{path}: {comp['kind']} {comp['name']!r} comes from {made_with}, which is installed "
                                  f"but failed to load: {failed[0].message}",
                                  hint="fix or reinstall that plugin (`emofuse plugins` lists what failed and why)")
            raise PluginError(
                f"{path}: {comp['kind']} {comp['name']!r} is not installed (the checkpoint was made with {made_with})",
                hint=f"pip install {comp.get('distribution')}",
            )
    config = _in_saved_branch_order(config, meta.get("branch_order"), path)
    model = build_model(config, len(label_names), registry=registry)
    state = {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
    expected = model_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model the config describes "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})",
            hint="the plugin versions may differ from the ones that made it; see the sidecar's components",
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor's shape differs, e.g. another number of classes
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "shapes differ")
        raise CheckpointError(f"{path}: weights do not fit the model its metadata describes "
                              f"({len(label_names)} classes; {first})",
                              hint="the metadata does not belong to these weights; retrain") from None
    model.eval()
    normalizer = {k[len(NORMALIZER_PREFIX):]: v for k, v in tensors.items() if k.startswith(NORMALIZER_PREFIX)}
    return LoadedModel(model, config, label_names, normalizer, meta)


def _emofuse_version() -> str:
    """The installed emofuse's version (0.0.0 in a source tree that is not installed)."""
    try:
        return md.version("emofuse")
    except md.PackageNotFoundError:
        return "0.0.0"
