"""What every pluggable component shares: a registered name, a kind, and its own validated options.

Each component class owns a pydantic `Config`, so `--set fusion.gamma=2` is checked by the
component that owns the key and `emofuse plugins` can list every option.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from emofuse.core.errors import ConfigError


class ComponentConfig(BaseModel):
    """Base of every component's options: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem, each with its full key path (``fusion.gamma: ...``); NaN or infinity in a number field
    is said so (a range check would call NaN "too large")."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        path = f"{where}.{loc}" if where and loc else (where or loc)
        nan = isinstance(e["input"], float) and not math.isfinite(e["input"]) and not e["type"].endswith(
            ("_type", "forbidden"))  # NaN in a number field; a text or unknown key is told what it is
        parts.append(f"{path}: " + ("must be a finite number, not NaN or infinity" if nan
                                    else e["msg"].removeprefix("Value error, ")))
    return "; ".join(parts)


class Component:
    """Mixin for registered component classes. Subclasses set `name` and may override `Config`."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring, for listings."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def make_config(cls, options: Mapping[str, Any] | None = None, *, where: str = "") -> ComponentConfig:
        """Validate `options` against this component's `Config`; errors name the key path."""
        where = where or f"{cls.kind}.{cls.name}"
        try:
            return cls.Config(**dict(options or {}))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, where)) from None
        except TypeError as err:
            raise ConfigError(f"{where}: {err}") from None
