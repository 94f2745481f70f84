"""The corpus reader a `DataConfig` names, built through the registry, and the data folder it reads."""
from __future__ import annotations

from pathlib import Path

from emofuse.core.config import DataConfig
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import DatasetReader
from emofuse.core.registry import Registry, get_registry

#: Where the corpora live when no ``--data`` is given: ``../shared/data`` beside the project.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or beside the current folder), if it exists."""
    for base in (PROJECT_ROOT, Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(data: DataConfig) -> Path:
    if data.data_dir is not None:
        if not Path(data.data_dir).is_dir():
            raise ConfigError(f"data.data_dir: {data.data_dir} is not a folder", hint="pass --data PATH to your corpora")
        return Path(data.data_dir)
    found = default_data_dir()
    if found is None:
        raise ConfigError(
            "no data folder given and ../shared/data does not exist beside this checkout",
            hint="pass --data PATH (a folder holding ravdess-speech/, meld/, ...) or set data.data_dir",
        )
    return found


def build_reader(config: DataConfig, registry: Registry | None = None) -> DatasetReader:
    registry = registry or get_registry()
    cls = registry.cls("dataset", config.dataset)
    cfg = cls.make_config(config.options, where=f"data.options[{config.dataset}]")
    return cls(cfg, data_dir=resolve_data_dir(config))
