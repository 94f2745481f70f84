"""What `emofuse plugins` lists: every registered component with its provider, summary and options
(types, defaults, ranges, help).

Listing needs the component classes, and importing them imports torch (seconds). So the listing is
kept in the user cache beside a stamp of everything it was read from: the installed entry points
(name, target, distribution, version), `EMOFUSE_PLUGINS`, and the size and mtime of every module file
loaded while reading it. A later listing is served from there only when all of that is unchanged;
anything else (a plugin installed, upgraded or edited, emofuse itself edited) reads the classes again.
A listing with a broken plugin is never kept, so installing what it lacked shows at once.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import inspect
import json
import os
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic.fields import FieldInfo

from emofuse.core.data.user_cache import user_cache_dir
from emofuse.core.hookspecs import ALLOW_ENV, ENTRY_POINT_GROUP

#: Bumped when the cached listing's shape changes.
LISTING_FORMAT = 1


@dataclass
class ComponentInfo:
    """One registered component as people see it."""

    kind: str
    name: str
    distribution: str
    version: str
    plugin: str
    summary: str
    #: option name -> {type, default, constraints, help}
    options: dict[str, dict[str, str]]


@dataclass
class ComponentListing:
    components: list[ComponentInfo]
    #: plugins skipped while loading, each as "distribution version (plugin 'x'): why"
    problems: list[str] = field(default_factory=list)
    #: True when served from the cache (no component class was imported)
    cached: bool = False


def list_components(*, use_cache: bool = True) -> ComponentListing:
    """Every registered component (the module's docstring says when the cache answers)."""
    path = user_cache_dir("plugins") / "listing.json"
    signature = _installed_signature()
    loaded = sys.modules.get("emofuse.core.registry")
    if use_cache and getattr(loaded, "_DEFAULT", None) is None:  # a registry already loaded here is the truth
        cached = _read_cached(path, signature)
        if cached is not None:
            return cached
    from emofuse.core.registry import get_registry

    registry = get_registry()
    components = [
        ComponentInfo(r.kind, r.name, r.provider.distribution, r.provider.version, r.provider.plugin, r.cls.summary(),
                      {o["name"]: {k: v for k, v in o.items() if k != "name"} for o in describe_options(r.cls)})
        for r in registry.all()
    ]
    listing = ComponentListing(components, [str(p) for p in registry.problems])
    if not listing.problems:
        _write_cached(path, signature, listing)
    return listing


def _installed_signature() -> dict[str, Any]:
    points = sorted(
        (ep.name, ep.value, ep.dist.metadata["Name"] if ep.dist else "", ep.dist.version if ep.dist else "")
        for ep in md.entry_points(group=ENTRY_POINT_GROUP)
    )
    return {"format": LISTING_FORMAT, "python": sys.version, "allow": os.environ.get(ALLOW_ENV, ""),
            "entry_points": [list(p) for p in points]}


def _stamp(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _read_cached(path: os.PathLike, signature: dict[str, Any]) -> ComponentListing | None:
    try:
        stored = json.loads(open(path, encoding="utf-8").read())
        if stored["signature"] != signature:
            return None
        if any(_stamp(f) != stamp for f, stamp in stored["files"].items()):
            return None
        return ComponentListing([ComponentInfo(**c) for c in stored["components"]], [], cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, unreadable or of another shape: read the classes


def _write_cached(path: os.PathLike, signature: dict[str, Any], listing: ComponentListing) -> None:
    files = {}
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        stamp = _stamp(source) if source else None
        if stamp is not None:  # (torch.ops and the like carry a __file__ that is no file)
            files[source] = stamp
    payload = {"signature": signature, "files": files, "components": [asdict(c) for c in listing.components]}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder only costs the next listing its speed


def describe_options(component: type) -> list[dict[str, str]]:
    """Each option of `component.Config`: name, type, default, constraints and help (a field's
    description, or the ``#:`` comment above it in the source)."""
    comments = _option_comments(component.Config)
    out = []
    for key, info in component.Config.model_fields.items():
        default = "(required)" if info.is_required() else repr(
            info.default if info.default_factory is None else info.default_factory())
        out.append({"name": key, "type": _type_name(info.annotation), "default": default,
                    "constraints": _constraints(info), "help": info.description or comments.get(key, "")})
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
