"""Component options described for people: `emofuse plugins --options` (types, defaults, ranges, help)."""
from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

from pydantic.fields import FieldInfo


def describe_options(component: type) -> list[dict[str, str]]:
    """Each option of `component.Config`: name, type, default, constraints and help (a field's
    description, or the ``#:`` comment above it in the source)."""
    comments = _option_comments(component.Config)
    out = []
    for key, field in component.Config.model_fields.items():
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
