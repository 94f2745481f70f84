"""The corpus reader a `DataConfig` names, built through the registry, and the data folder it reads."""
from __future__ import annotations

import os
from pathlib import Path

from emofuse.core.config import DataConfig
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import DatasetReader
from emofuse.core.registry import Registry, get_registry

#: Environment variable naming the data folder used when no ``--data`` / ``data.data_dir`` is given.
DATA_ENV = "EMOFUSE_DATA"


def default_data_dir() -> Path | None:
    """``$EMOFUSE_DATA``, else ``shared/data`` in the current folder or the nearest folder above it
    that has one (``../shared/data`` beside a checkout run from inside it), if it exists. Found from
    where the user works, never from where emofuse is installed."""
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path.cwd()
    for base in (here, *here.parents):
        candidate = base / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(data: DataConfig) -> Path:
    if data.data_dir is not None:
        if not Path(data.data_dir).is_dir():
            raise ConfigError(f"data.data_dir: {data.data_dir} is not a folder", hint="pass --data PATH to your corpora")
        return Path(data.data_dir)
    env = os.environ.get(DATA_ENV, "").strip()
    if env and not Path(env).is_dir():
        raise ConfigError(f"{DATA_ENV}={env} is not a folder", hint=f"point {DATA_ENV} at your corpora, or pass --data PATH")
    found = default_data_dir()
    if found is None:
        raise ConfigError(
            f"no data folder: no --data given, {DATA_ENV} is not set, and there is no shared/data in "
            f"{Path.cwd()} or a folder above it",
            hint=f"pass --data PATH (a folder holding ravdess-speech/, meld/, ...) or set {DATA_ENV}=PATH",
        )
    return found


def build_reader(config: DataConfig, registry: Registry | None = None) -> DatasetReader:
    registry = registry or get_registry()
    cls = registry.cls("dataset", config.dataset)
    cfg = cls.make_config(config.options, where=f"data.options[{config.dataset}]")
    return cls(cfg, data_dir=resolve_data_dir(config))
