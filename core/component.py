"""What every pluggable component shares: a registered name, a kind, and its own validated options.

Each component class owns a pydantic `Config`, so `--set fusion.gamma=2` is checked by the
component that owns the key and `emofuse plugins` can list every option.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any, ClassVar, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from emofuse.core.errors import ConfigError


class ComponentConfig(BaseModel):
    """Base of every component's options: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem, each with its full key path (``fusion.gamma: ...``)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        path = f"{where}.{loc}" if where and loc else (where or loc)
        parts.append(f"{path}: {e['msg']}")
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

    @classmethod
    def options(cls) -> list[dict[str, str]]:
        """Each option of `Config`: name, type, default, constraints and help (a field's description, or
        the ``#:`` comment above it in the source), for `emofuse plugins --options` and the docs."""
        comments = _option_comments(cls.Config)
        out = []
        for key, field in cls.Config.model_fields.items():
            default = "(required)" if field.is_required() else repr(
                field.default if field.default_factory is None else field.default_factory())
            out.append({"name": key, "type": _type_name(field.annotation), "default": default,
                        "constraints": _constraints(field), "help": field.description or comments.get(key, "")})
        return out


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def _constraints(field: FieldInfo) -> str:
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "min length", "max_length": "max length"}
    parts = []
    for item in field.metadata:
        for attr, symbol in symbols.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _option_comments(config: type) -> dict[str, str]:
    """``#:`` comments above the fields of `config` and its bases (the Sphinx convention)."""
    found: dict[str, str] = {}
    for klass in reversed(config.__mro__):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                above, i = [], node.lineno - 2
                while i >= 0 and lines[i].strip().startswith("#:"):
                    above.insert(0, lines[i].strip()[2:].strip())
                    i -= 1
                if above:
                    found[node.target.id] = " ".join(above)
    return found
