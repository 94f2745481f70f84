"""MkDocs hook: `mkdocs` run as a console script puts its own folder (a venv's ``bin/``) first on ``sys.path``,
where griffe would take the ``emofuse`` console script for the package; the API reference needs the package."""
from __future__ import annotations

import sys
from pathlib import Path


def on_startup(**_: object) -> None:
    scripts = Path(sys.argv[0]).resolve().parent
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != scripts]
