"""Where per-user caches live that outlive any run (face crops, unpacked packaged models)."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(part: str) -> Path:
    """``$EMOFUSE_CACHE_DIR/<part>``, else ``$XDG_CACHE_HOME/emofuse/<part>`` (``~/.cache`` when unset)."""
    root = os.environ.get("EMOFUSE_CACHE_DIR")
    if root:
        return Path(root) / part
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emofuse" / part
