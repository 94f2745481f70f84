"""Named presets from ``registry.toml``: compositions of registered components with their defaults.

A preset is a partial run config. ``extends = ["a", "b"]`` merges other presets first (left to right),
so the reference design's fusions are written as "both branch presets + a fusion". The layering of a
run's config is: preset -> ``--config`` file -> CLI flags -> ``--set key=value``.
"""
from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from emofuse.core.config import RunConfig, apply_set, deep_merge, load_toml, validate
from emofuse.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_KEYS = {"description", "extends"}


def registry_file():
    """The ``registry.toml`` shipped inside the installed package (a Traversable: may live in a zip)."""
    return resources.files("emofuse").joinpath("registry.toml")


def load_presets(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """All presets by name, as written (``extends`` not yet resolved)."""
    path = Path(path) if path else registry_file()
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: registry file missing", hint="reinstall emofuse") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(doc) - {"presets"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level table(s) {sorted(unknown)}; only [presets.NAME] is allowed")
    presets = doc.get("presets", {})
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise ConfigError(f"{path}: [presets] must hold one table per preset")
    return presets


def resolve_preset(name: str, presets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The preset `name` as a partial run-config dict, with every ``extends`` merged in."""
    presets = load_presets() if presets is None else presets
    return _resolve(name, presets, ())


def _resolve(name: str, presets: Mapping[str, Mapping[str, Any]], chain: tuple[str, ...]) -> dict[str, Any]:
    if name not in presets:
        raise ConfigError(f"no preset named {name!r} (known: {', '.join(sorted(presets))})", hint="run `emofuse presets`")
    if name in chain:
        raise ConfigError(f"preset {name!r} extends itself: {' -> '.join(chain + (name,))}")
    body = dict(presets[name])
    parents = body.pop("extends", [])
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError(f"preset {name!r}: extends = {parents!r} is not a preset name or a list of names",
                          hint='e.g. extends = ["au-mlp", "mfcc-mlp"]')
    body.pop("description", None)
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = deep_merge(merged, _resolve(parent, presets, chain + (name,)))
    return deep_merge(merged, body)


def describe(name: str, presets: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    presets = load_presets() if presets is None else presets
    return str(presets[name].get("description", ""))


def compose_config(
    *,
    preset: str | None = None,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    replace: Mapping[str, Any] | None = None,
    sets: Iterable[str] = (),
) -> RunConfig:
    """Layer preset, config file, CLI overrides and ``--set`` assignments into one validated config.

    `overrides` merge into tables; `replace` swaps whole top-level keys (``--encoder`` replaces the
    branch set, ``--fusion none`` drops the fusion: a None value removes the key).
    """
    raw: dict[str, Any] = {}
    file_raw = load_toml(config_file) if config_file else {}
    preset = preset or file_raw.get("preset")
    if preset:
        raw = resolve_preset(preset)
        raw["preset"] = preset
        raw.setdefault("name", preset)
    raw = deep_merge(raw, file_raw)
    raw = deep_merge(raw, dict(overrides or {}))
    for key, value in (replace or {}).items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    for assignment in sets:
        apply_set(raw, assignment)
    source = str(config_file) if config_file else (f"preset {preset!r}" if preset else "config")
    return validate(raw, source=source)


def all_presets_valid(presets: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, RunConfig]:
    """Validate every preset as a run config (used by tests and `emofuse presets`)."""
    presets = load_presets() if presets is None else presets
    return {name: validate(resolve_preset(name, presets), source=f"preset {name!r}") for name in presets}
