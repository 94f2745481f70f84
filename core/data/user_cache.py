"""Where per-user caches live that outlive any run (face crops, unpacked packaged models, transcripts,
the plugin listing): one folder per user, readable by that user alone.

A cache can hold what a user's clips contain (transcripts, face crops), so the folder emofuse makes for
them is 0700: every file under it is private, whatever mode the code that wrote it gave it.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


def user_cache_dir(part: str) -> Path:
    """``$EMOFUSE_CACHE_DIR/<part>``, else ``$XDG_CACHE_HOME/emofuse/<part>`` (``~/.cache`` when unset); the
    root is made private (0700) first."""
    root = os.environ.get("EMOFUSE_CACHE_DIR")
    if root:
        return private_folder(Path(root), tighten=False) / part
    return private_folder(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emofuse") / part


def private_folder(folder: Path, *, tighten: bool = True) -> Path:
    """`folder`, made with mode 0700 when absent; with `tighten`, an existing one of this user's that others
    can read (made by an older emofuse) is closed to them too. A folder that cannot be made is left to the
    code that writes into it to report."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if tighten:
            info = folder.stat()
            if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077:
                folder.chmod(stat.S_IMODE(info.st_mode) & 0o700)
    except OSError:
        pass
    return folder
