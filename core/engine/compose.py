"""Turns a `RunConfig` into live components through the registry: the only place names become objects."""
from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from emofuse.core.component import ComponentConfig
from emofuse.core.config import ComponentRef, RunConfig, TrainConfig
from emofuse.core.data.readers import build_reader, default_data_dir, resolve_data_dir  # noqa: F401 (also importable from here)
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import BranchInfo, Encoder, Fusion, Loss
from emofuse.core.registry import Registry, get_registry
from emofuse.core.types import Batch, EncoderOutput


def build_encoder(ref: ComponentRef, num_classes: int, *, where: str, registry: Registry | None = None) -> Encoder:
    registry = registry or get_registry()
    cls = registry.cls("encoder", ref.name)
    return cls(cls.make_config(ref.options, where=where), num_classes)


def build_fusion(
    ref: ComponentRef, num_classes: int, branches: Sequence[BranchInfo], registry: Registry | None = None
) -> Fusion:
    registry = registry or get_registry()
    cls = registry.cls("fusion", ref.name)
    return cls(cls.make_config(ref.options, where="fusion"), num_classes, branches)


def build_loss(
    ref: ComponentRef, num_classes: int, class_counts: torch.Tensor | None = None, registry: Registry | None = None,
    *, where: str = "loss",
) -> Loss:
    registry = registry or get_registry()
    cls = registry.cls("loss", ref.name)
    return cls(cls.make_config(ref.options, where=where), num_classes, class_counts)


def compose_blaming_layers(*, preset: str | None = None, config_file: Path | None = None,
                           overrides: Mapping[str, Any] | None = None, replace: Mapping[str, Any] | None = None,
                           sets: Sequence[str] = ()) -> RunConfig:
    """`emofuse.core.presets.compose_config`, with an invalid result blamed on the layer that broke it: the preset
    (or config file), the options given (flags or arguments), or the ``--set`` after which no layer made a valid
    config; a bad ``--name`` is not the preset's fault."""
    from emofuse.core.presets import compose_config

    base = str(config_file) if config_file else (f"preset {preset!r}" if preset else "config")
    try:
        return compose_config(preset=preset, config_file=config_file, overrides=overrides, replace=replace, sets=sets)
    except ConfigError as exc:
        if not exc.message.startswith(f"{base}: "):
            raise  # not about the merged config's values (an unknown preset, a --set without '=')
        layers = [(base, {}), ("the options given", {"overrides": overrides, "replace": replace})]
        layers += [(f"--set {a}", {"overrides": overrides, "replace": replace, "sets": sets[:i + 1]})
                   for i, a in enumerate(sets)]
        blamed = base
        for (_, before), (source, _) in zip(layers, layers[1:]):
            with suppress(ConfigError):
                compose_config(preset=preset, config_file=config_file, **before)
                blamed = source  # the config was still valid before this layer
        raise ConfigError(blamed + exc.message[len(base):], hint=exc.hint) from None


def check_components(config: RunConfig, registry: Registry | None = None) -> None:
    """Every component named by `config` exists and accepts its options, checked before anything is
    loaded or trained: a typo in the fusion's options must not surface after the branches trained.

    The fusion is also built once over placeholder branches, so checks that need the branch count
    (one initial weight per branch) run now too."""
    registry = registry or get_registry()
    for branch, ref in config.branches.items():
        check_component("encoder", ref, f"branches.{branch}", registry)
    check_component("loss", config.loss, "loss", registry)
    if config.fusion_loss is not None:
        check_component("loss", config.fusion_loss, "fusion_loss", registry)
    registry.cls("dataset", config.data.dataset).make_config(config.data.options, where="data.options")
    if config.fusion is not None:
        cls = registry.cls("fusion", config.fusion.name)
        options = check_component("fusion", config.fusion, "fusion", registry)
        placeholders = [BranchInfo(name, 2, 0, ()) for name in config.branches]
        try:
            cls(options, 2, placeholders)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - other failures may come from the placeholders, not the options
            pass


def check_component(kind: str, ref: ComponentRef, where: str, registry: Registry) -> ComponentConfig:
    """`ref`'s options validated by its component, and so every component nested in them: a `ComponentRef`
    option (a wrapper's ``inner`` encoder, in a list or table too) names a component of the same kind."""
    options = registry.cls(kind, ref.name).make_config(ref.options, where=where)
    for field in type(options).model_fields:
        value = getattr(options, field)
        items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else None
        nested = [(f"{where}.{field}", value)] if items is None else [(f"{where}.{field}.{k}", v) for k, v in items]
        for place, item in nested:
            if isinstance(item, ComponentRef):
                check_component(kind, item, place, registry)
    return options


def branch_info(name: str, encoder: Encoder) -> BranchInfo:
    return BranchInfo(name, encoder.num_classes, encoder.embedding_dim, tuple(encoder.modalities))


class ComposedModel(nn.Module):
    """Branches (encoders by branch name) and, when there are several, a fusion over them."""

    def __init__(self, branches: Mapping[str, Encoder], fusion: Fusion | None = None):
        super().__init__()
        if not branches:
            raise ConfigError("a model needs at least one branch", hint="add one under [branches] or pass --encoder")
        if fusion is None and len(branches) > 1:
            raise ConfigError(
                f"{len(branches)} branches ({', '.join(branches)}) but no fusion",
                hint="choose one with --fusion NAME (see `emofuse plugins`)",
            )
        self.branches = nn.ModuleDict(dict(branches))
        self.fusion = fusion

    @property
    def modalities(self) -> set[str]:
        return {m for enc in self.branches.values() for m in enc.modalities}

    def branch_outputs(
        self, batch: Batch, extracted: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    ) -> dict[str, EncoderOutput]:
        extracted = extracted or {}
        return {name: enc(batch, extracted.get(name)) for name, enc in self.branches.items()}

    def forward(
        self, batch: Batch, extracted: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    ) -> tuple[torch.Tensor, dict[str, EncoderOutput]]:
        outputs = self.branch_outputs(batch, extracted)
        if self.fusion is None:
            (only,) = outputs.values()
            return only.logits, outputs
        return self.fusion(outputs), outputs


def build_model(
    config: RunConfig, num_classes: int, registry: Registry | None = None
) -> ComposedModel:
    """Every branch of `config`, plus its fusion when it has one."""
    registry = registry or get_registry()
    if not config.branches:
        raise ConfigError("branches: no branch configured", hint="use --preset NAME or --encoder NAME")
    encoders = {
        name: build_encoder(ref, num_classes, where=f"branches.{name}", registry=registry)
        for name, ref in config.branches.items()
    }
    fusion = None
    if config.fusion is not None:
        infos = [branch_info(n, e) for n, e in encoders.items()]
        fusion = build_fusion(config.fusion, num_classes, infos, registry=registry)
    return ComposedModel(encoders, fusion)


def branch_modalities(config: RunConfig, registry: Registry | None = None) -> dict[str, tuple[str, ...]]:
    """Each branch's modalities (primary first), without building the encoders."""
    registry = registry or get_registry()
    out = {}
    for branch, ref in config.branches.items():
        cls = registry.cls("encoder", ref.name)
        out[branch] = cls.modalities_for(cls.make_config(ref.options, where=f"branches.{branch}"))
    return out


def required_modalities(config: RunConfig, registry: Registry | None = None) -> set[str]:
    """The union of modalities the configured encoders read, so the data side decodes only those."""
    return {m for mods in branch_modalities(config, registry).values() for m in mods}


def encoder_replacement_note(before: RunConfig, after: RunConfig, *, name_given: bool) -> str | None:
    """One line saying what ``--encoder`` replaced in a preset or config file (`before`) and what of it
    the run keeps (`after`): its run name and its stage settings, which were tuned for other branches."""
    old = {b: ref.name for b, ref in before.branches.items()}
    new = {b: ref.name for b, ref in after.branches.items()}
    if not old or old == new:
        return None
    source = f"preset {before.preset!r}" if before.preset else "the config"
    parts = [f"--encoder replaced the branches of {source} ({_pairs(old)}) with {_pairs(new)}"]
    if before.fusion is not None and after.fusion is None:
        parts[-1] += f", and its fusion {before.fusion.name!r} (one branch is trained alone)"
    kept = []
    if not name_given and after.name == before.name:
        kept.append(f"the run name {after.name!r} (--name to change it)")
    tuned = {k: v for k, v in after.train.model_dump(mode="json").items()
             if v != TrainConfig.model_fields[k].get_default(call_default_factory=True)
             and k not in ("device", "num_workers")}
    if tuned:
        kept.append("train settings " + ", ".join(f"{k}={v}" for k, v in sorted(tuned.items())))
    if after.fusion is not None and after.fusion_train is not None:
        kept.append("its fusion_train settings")
    unused = sorted(set(before.branch_train) - set(new))
    if kept:
        parts.append("kept " + "; ".join(kept))
    if unused:
        parts.append(f"its branch_train settings for {', '.join(unused)} no longer apply")
    return "; ".join(parts)


def _pairs(branches: Mapping[str, str]) -> str:
    return ", ".join(f"{b}={n}" for b, n in branches.items())
