"""Which code made a stored result: each component's provider (distribution and version) and, for a
local or editable install, a hash of its source files.

Every reuse key (cached features, branch and fusion runs, search studies) includes this, so that an
edited plugin, or an upgraded one, is recomputed instead of silently reused. The source files of a
component are the modules of its class and base classes, plus the local modules those modules use
(followed through their globals), the framework (``emofuse.core``, ``emofuse.cli``) excepted: its
changes come with emofuse's version. A module is hashed when it is not an installed copy (outside
``site-packages``) or when its distribution was installed from a local folder (``direct_url.json``).

Hashes are computed once per process, as the code a process runs is the code it imported:
`forget_hashes` starts over (tests that edit a module and reload it).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import json
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["code_identity", "module_identity", "what_changed", "forget_hashes", "PROVIDER_ATTR"]

#: Class attribute the registry sets on each component class it registers: its `Provider`.
PROVIDER_ATTR = "_emofuse_provider"
#: Framework packages whose code is identified by emofuse's version alone.
FRAMEWORK = ("emofuse.core", "emofuse.cli")
_STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()


def code_identity(component: Any) -> dict[str, Any]:
    """``{"provider": "<distribution> <version>", "sources": {module: sha256[:16]}}`` of a component
    class or instance (an `nn.Module` instance adds the classes of its submodules, e.g. a backbone)."""
    cls = component if isinstance(component, type) else type(component)
    classes = {cls, *cls.__mro__}
    if not isinstance(component, type) and hasattr(component, "modules"):
        classes |= {type(m) for m in component.modules()}
    modules = {c.__module__ for c in classes if c.__module__ in sys.modules}
    return {"provider": _provider_of(cls), "sources": dict(sorted(module_identity(modules).items()))}


def module_identity(module_names: Iterable[str]) -> dict[str, str]:
    """Hashes of the local source files of `module_names` and of the local modules they use."""
    seen: dict[str, str] = {}
    todo = list(module_names)
    while todo:
        name = todo.pop()
        if name in seen or name.startswith(FRAMEWORK) or name not in sys.modules:
            continue
        digest = _source_hash(name)
        if digest is None:
            continue
        seen[name] = digest
        todo.extend(_modules_used_by(sys.modules[name]))
    return seen


def what_changed(component: str, old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str | None:
    """One line saying how `component`'s code differs between two `code_identity` records (None: same)."""
    if not old:
        return None
    if old.get("provider") != new.get("provider"):
        return f"{component}: provided by {new.get('provider')} now, by {old.get('provider')} before"
    before, now = old.get("sources") or {}, new.get("sources") or {}
    edited = sorted(m for m in set(before) | set(now) if before.get(m) != now.get(m))
    if not edited:
        return None
    files = ", ".join(_label(m) for m in edited[:3]) + (", ..." if len(edited) > 3 else "")
    return f"{component}: its source changed ({files})"


def forget_hashes() -> None:
    """Hash the source files again (after a module was edited and reloaded in this process)."""
    _source_hash.cache_clear()
    _distribution_of_module.cache_clear()


def _label(module: str) -> str:
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    return Path(path).name if path else module


def _provider_of(cls: type) -> str:
    provider = cls.__dict__.get(PROVIDER_ATTR)
    if provider is not None:
        return f"{provider.distribution} {provider.version}"
    dist = _distribution_of_module(cls.__module__.split(".")[0])
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "no distribution"


@functools.lru_cache(maxsize=None)
def _distribution_of_module(top_level: str) -> md.Distribution | None:
    names = _top_level_distributions().get(top_level) or []
    for name in names:
        try:
            return md.distribution(name)
        except md.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _top_level_distributions() -> Mapping[str, list[str]]:
    return md.packages_distributions()


@functools.lru_cache(maxsize=None)
def _source_hash(module_name: str) -> str | None:
    """sha256[:16] of a module's source file when it is local code, else None."""
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    file = Path(path).resolve()
    if not _is_local(file, module_name):
        return None
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def _is_local(file: Path, module_name: str) -> bool:
    if file.is_relative_to(_STDLIB) and "site-packages" not in file.parts:
        return False
    if "site-packages" not in file.parts and "dist-packages" not in file.parts:
        return True  # a checkout, an editable install or a module on sys.path
    dist = _distribution_of_module(module_name.split(".")[0])
    return dist is not None and _installed_from_folder(dist)


def _installed_from_folder(dist: md.Distribution) -> bool:
    try:
        raw = dist.read_text("direct_url.json")
        return bool(raw) and "dir_info" in json.loads(raw)
    except (OSError, ValueError):
        return False


def _modules_used_by(module: types.ModuleType) -> list[str]:
    """Names of the modules whose objects `module` holds in its globals."""
    used = []
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType):
            used.append(value.__name__)
        elif isinstance(value, (type, types.FunctionType)):
            owner = getattr(value, "__module__", None)
            if isinstance(owner, str):
                used.append(owner)
    return used
