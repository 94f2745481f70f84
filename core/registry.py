"""The component registry: loads plugins from ``emofuse`` entry points through pluggy, records who
provided each component, and turns names into classes.

A plugin that fails to import, or registers a broken component, is reported with its distribution
name and version and skipped: the rest keep working. Two plugins claiming one name is an error that
names both. ``EMOFUSE_PLUGINS`` (comma-separated entry-point or distribution names) restricts loading.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from emofuse.core import hookspecs
from emofuse.core.component import Component
from emofuse.core.errors import PluginError
from emofuse.core.hookspecs import ALLOW_ENV, ENTRY_POINT_GROUP
from emofuse.core.interfaces import DatasetReader, Encoder, Fusion, Loss

#: component kind -> (hook name, base class)
KINDS: dict[str, tuple[str, type]] = {
    "encoder": ("register_encoders", Encoder),
    "fusion": ("register_fusions", Fusion),
    "loss": ("register_losses", Loss),
    "dataset": ("register_datasets", DatasetReader),
}


@dataclass(frozen=True)
class Provider:
    """Where a component came from: the plugin (entry-point) name and its distribution."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} (plugin {self.plugin!r})"


@dataclass(frozen=True)
class Registered:
    kind: str
    name: str
    cls: type
    provider: Provider


@dataclass
class Problem:
    """A plugin or component that was skipped, and why."""

    provider: Provider
    message: str

    def __str__(self) -> str:
        return f"{self.provider}: {self.message}"


@dataclass
class Registry:
    """All components by kind and name, plus the problems met while loading them."""

    components: dict[str, dict[str, Registered]] = field(default_factory=lambda: {k: {} for k in KINDS})
    problems: list[Problem] = field(default_factory=list)
    manager: pluggy.PluginManager = field(default_factory=lambda: _new_manager())
    _providers: dict[str, Provider] = field(default_factory=dict)

    # -- loading ---------------------------------------------------------------------------
    def load_entry_points(self, allow: Iterable[str] | None = None) -> "Registry":
        """Import every ``emofuse`` entry point (or the allowed ones) and register its components."""
        allowed = set(allow) if allow is not None else _allow_list_from_env()
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            provider = Provider(ep.name, dist.metadata["Name"] if dist else "unknown", dist.version if dist else "?")
            if allowed is not None and ep.name not in allowed and provider.distribution not in allowed:
                continue
            if ep.name in self._providers:
                continue  # the same entry point seen twice on sys.path (e.g. editable + site copy)
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down
                self.problems.append(Problem(provider, f"failed to import {ep.value}: {_one_line(exc)}"))
                continue
            self.add_plugin(module, provider)
        return self

    def add_plugin(self, plugin: Any, provider: Provider) -> None:
        """Register one plugin object (a module or any object with hookimpls) and collect its components."""
        try:
            self.manager.register(plugin, name=provider.plugin)
        except ValueError as exc:
            self.problems.append(Problem(provider, _one_line(exc)))
            return
        self._providers[provider.plugin] = provider
        for kind, (hook_name, _) in KINDS.items():
            for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
                if impl.plugin_name != provider.plugin:
                    continue
                try:
                    classes = impl.function() or []
                except Exception as exc:
                    self.problems.append(Problem(provider, f"{hook_name}() raised {_one_line(exc)}"))
                    continue
                for cls in classes:
                    self._add_component(kind, cls, provider)

    def _add_component(self, kind: str, cls: Any, provider: Provider) -> None:
        base = KINDS[kind][1]
        problem = _check_component(kind, cls, base)
        if problem:
            self.problems.append(Problem(provider, problem))
            return
        existing = self.components[kind].get(cls.name)
        if existing is not None and existing.cls is not cls:
            raise PluginError(
                f"{kind} name {cls.name!r} is claimed twice: by {existing.provider} and by {provider}",
                hint=f"uninstall one of them or restrict loading with {ALLOW_ENV}",
            )
        self.components[kind][cls.name] = Registered(kind, cls.name, cls, provider)
        cls._emofuse_provider = provider  # read by the reuse keys (`emofuse.core.data.code_identity`)

    # -- lookup ----------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Registered:
        if kind not in self.components:
            raise PluginError(f"unknown component kind {kind!r}; expected one of {sorted(KINDS)}")
        try:
            return self.components[kind][name]
        except KeyError:
            known = ", ".join(sorted(self.components[kind])) or "none"
            broken = "; ".join(str(p) for p in self.problems)
            if broken:  # it may be one of the plugins that failed to load: say so rather than "not installed"
                raise PluginError(
                    f"no {kind} named {name!r} is registered (known: {known}); plugins that failed to load: {broken}",
                    hint="fix or reinstall the failing plugin (`emofuse plugins` lists what failed and why)",
                ) from None
            raise PluginError(
                f"no {kind} named {name!r} is registered (known: {known})",
                hint="install the plugin that provides it, or run `emofuse plugins` to list what is there",
            ) from None

    def cls(self, kind: str, name: str) -> type:
        return self.get(kind, name).cls

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def all(self) -> list[Registered]:
        return [r for kind in KINDS for _, r in sorted(self.components[kind].items())]

    def provenance(self, kind: str, name: str) -> dict[str, str]:
        p = self.get(kind, name).provider
        return {"plugin": p.plugin, "distribution": p.distribution, "version": p.version}


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _allow_list_from_env() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV, "").strip()
    if not raw:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _check_component(kind: str, cls: Any, base: type) -> str | None:
    """Why `cls` cannot be registered as a `kind`, or None when it can."""
    if not isinstance(cls, type) or not issubclass(cls, base):
        return f"{kind} hook returned {cls!r}, which is not a subclass of {base.__module__}.{base.__name__}"
    if not getattr(cls, "name", "") or not isinstance(cls.name, str):
        return f"{kind} class {cls.__qualname__} has no `name`"
    cfg = getattr(cls, "Config", None)
    if not (isinstance(cfg, type) and hasattr(cfg, "model_fields")):
        return f"{kind} {cls.name!r}: `Config` must be a pydantic model"
    if issubclass(cls, (Encoder, DatasetReader)) and not cls.modalities:
        return f"{kind} {cls.name!r} declares no `modalities`"
    return None


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    loc = f" [{where[0].filename}:{where[0].lineno}]" if where else ""
    return (text[0] if text else type(exc).__name__) + loc


_DEFAULT: Registry | None = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _DEFAULT
    if _DEFAULT is None or refresh:
        _DEFAULT = Registry().load_entry_points()
    return _DEFAULT


def component_kinds() -> list[str]:
    return list(KINDS)


__all__ = ["Registry", "Registered", "Provider", "Problem", "get_registry", "Component", "ENTRY_POINT_GROUP"]
