"""`emofuse new-plugin NAME`: a plugin package that installs, registers, passes the conformance kit
and trains, written from the templates in ``plugin_template/``; the starting point for a new component."""
from __future__ import annotations

import re
import string
from importlib import resources
from pathlib import Path

from emofuse.core.errors import ConfigError

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")


def new_plugin(name: str, parent: Path) -> Path:
    """Write the package ``<parent>/emofuse-<name>/`` and return its folder."""
    if not _NAME.match(name):
        raise ConfigError(f"plugin name {name!r}: use lower-case letters, digits and '-', starting with a letter",
                          hint="e.g. emofuse new-plugin prosody")
    dist = f"emofuse-{name}"
    package = "emofuse_" + name.replace("-", "_")
    target = Path(parent) / dist
    if target.exists():
        raise ConfigError(f"{target} already exists", hint="choose another name or folder (--into)")
    values = {"name": name, "dist": dist, "package": package}
    template = resources.files("emofuse.core.apps") / "plugin_template"
    files = {
        "pyproject.toml": "pyproject.toml.tmpl",
        "README.md": "README.md.tmpl",
        f"{package}/__init__.py": None,
        f"{package}/plugin.py": "plugin.py.tmpl",
        "tests/test_conformance.py": "tests/test_conformance.py.tmpl",
    }
    try:
        for out, source in files.items():
            path = target / out
            path.parent.mkdir(parents=True, exist_ok=True)
            text = "" if source is None else string.Template(
                template.joinpath(source).read_text(encoding="utf-8")).substitute(values)
            path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{target}: cannot write the plugin ({exc.strerror})", hint="choose a writable folder") from None
    return target
