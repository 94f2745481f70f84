"""What the built-in readers share: explicit label sets and mapping, and the bad-row policy.

A reader reports a bad row through `bad()`: with ``on_bad_sample = "error"`` (the default) that
raises `DataError` naming the file and row; with ``"skip"`` the row is left out and recorded in
`skipped`, which the pipeline lists at the end of the run. Nothing is dropped silently; rows whose
label `label_map` maps to None are left out on purpose and counted in `excluded`.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import field_validator

from emofuse.core.errors import ConfigError, DataError
from emofuse.core.interfaces import DatasetReader, DatasetReaderConfig

SKIP_HINT = "fix or remove it, or pass --on-bad-sample skip to leave such samples out"


class CorpusReaderConfig(DatasetReaderConfig):
    """Options of the built-in readers."""

    #: Corpus label -> label in `labels` (or None to leave that class out on purpose),
    #: e.g. ``{"calm": "neutral", "surprised": null}``. Case-insensitive.
    label_map: dict[str, str | None] = {}

    @field_validator("labels", mode="before")
    @classmethod
    def _unique_labels(cls, v: object) -> object:
        if v is None:
            return v
        if isinstance(v, str):  # --labels neutral,happy,sad
            v = v.split(",")
        if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
            return v  # let pydantic report the type error
        cleaned = [s.strip().lower() for s in v]
        if any(not s for s in cleaned):
            raise ValueError("label names must not be empty")
        dupes = sorted({s for s in cleaned if cleaned.count(s) > 1})
        if dupes:
            raise ValueError(f"label set names {', '.join(dupes)} more than once")
        return cleaned


class CorpusReader(DatasetReader):
    """A `DatasetReader` with explicit label mapping and the error-or-skip policy for bad rows."""

    Config: ClassVar[type[CorpusReaderConfig]] = CorpusReaderConfig

    def __init__(self, config: CorpusReaderConfig, data_dir: Path | None = None):
        super().__init__(config, data_dir)
        self.label_names = [s.strip().lower() for s in self.label_names]
        self.on_bad_sample: Literal["error", "skip"] = "error"
        #: (file or row, reason) of every row left out in skip mode.
        self.skipped: list[tuple[str, str]] = []
        #: label -> number of rows left out because `label_map` maps it to None.
        self.excluded: Counter[str] = Counter()
        self._label_index = {name: i for i, name in enumerate(self.label_names)}
        self._label_map = {k.strip().lower(): (v.strip().lower() if v else None) for k, v in config.label_map.items()}
        for source, target in self._label_map.items():
            if target is not None and target not in self._label_index:
                raise ConfigError(
                    f"data.options.label_map: {source!r} maps to {target!r}, which is not in the label set "
                    f"({', '.join(self.label_names)})",
                    hint="add it to --labels or map to one of them",
                )

    def bad(self, where: str | Path, message: str, *, hint: str | None = SKIP_HINT) -> None:
        """Report a bad row or file: raise in error mode, record it in skip mode."""
        if self.on_bad_sample == "skip":
            self.skipped.append((str(where), message))
            return
        raise DataError(where, message, hint=hint)

    def label(self, raw: str | None, where: str | Path) -> int | None:
        """Class index of corpus label `raw`; None when the row is left out (mapped to None, or skipped)."""
        name = (raw or "").strip().lower()
        if not name:
            self.bad(where, "has no emotion label")
            return None
        if name in self._label_map:
            target = self._label_map[name]
            if target is None:
                self.excluded[name] += 1
                return None
            name = target
        index = self._label_index.get(name)
        if index is None:
            self.bad(
                where,
                f"label {raw!r} is not in the label set ({', '.join(self.label_names)})",
                hint="add it to --labels, map it with data.options.label_map, or pass --on-bad-sample skip",
            )
        return index

    def require_root(self) -> Path:
        root = self.root
        if not root.is_dir():
            raise DataError(root, f"{self.name} corpus folder not found", hint="set data.options.root or --data")
        return root

    def resolve(self, path: str | Path | None, *bases: Path) -> Path | None:
        """An option path: absolute as given, else the first of `bases`/path that exists (else the first)."""
        if path is None:
            return None
        p = Path(path).expanduser()
        if p.is_absolute():
            return p
        candidates = [b / p for b in bases if b is not None]
        for c in candidates:
            if c.exists():
                return c
        return candidates[0] if candidates else p


def files_under(root: Path) -> list[Path]:
    """Every file under `root`, sorted, following symlinked folders (a corpus assembled from links to
    actor folders elsewhere); each real folder is read once, so a link cycle ends."""
    found: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        found += [Path(folder) / name for name in names]
    return sorted(found)
