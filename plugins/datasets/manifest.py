"""A generic manifest (CSV, TSV or JSON Lines, optionally gzipped), one row per clip, for any corpus.

Columns (renamable with ``columns``): id, label, speaker, age, gender, text, audio, video, dialogue,
utterance, partition; feature sets by column prefix (``feature_sets = {"au": "au_"}``) or, in
JSON Lines, one key holding a list. Media paths are relative to ``media_root`` (default: the
manifest's folder); when the reader's ``root`` is set, a media path that leads outside it (``..``,
an absolute path elsewhere) is bad input, so a manifest cannot point the loader at other files.
Only `id` is required; without a label column the rows are unlabelled (for prediction). The label set must be given explicitly with ``labels``.
With ``empty_text = "transcribe"`` a clip without a transcript (empty cell, or no text column) gets one
from its speech (Whisper tiny.en, or the one ``EMOFUSE_TRANSCRIBER`` names, offline;
`emofuse.plugins.transcription`), cached so each clip is transcribed once.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Iterator, Literal

from emofuse.core import (
    AUDIO,
    FEATURES,
    METADATA,
    TEXT,
    VIDEO,
    ConfigError,
    CorpusReader,
    CorpusReaderConfig,
    Sample,
    feature_columns,
    hookimpl,
    is_blank,
    read_table,
    row_features,
)

FIELDS = ("id", "label", "speaker", "age", "gender", "text", "audio", "video", "dialogue", "utterance", "partition")


class ManifestConfig(CorpusReaderConfig):
    #: The manifest file (relative to the root, which defaults to the data folder). Required.
    path: Path
    #: Field -> column name, for manifests whose columns are named otherwise (e.g. {"label": "emotion"}).
    columns: dict[str, str] = {}
    #: Feature set name -> column prefix (or the JSON key holding a list).
    feature_sets: dict[str, str] = {}
    #: Folder that relative media paths start from; default: the manifest's folder.
    media_root: Path | None = None
    #: False: leave the label column unread, every row unlabelled (prediction needs no labels).
    labelled: bool = True
    #: A clip without text (an empty cell in the text column, or no such column): "error" (bad input; only
    #: for an empty cell), "absent" (the clip has no text), or "transcribe" (its speech, transcribed offline).
    empty_text: Literal["error", "absent", "transcribe"] = "error"
    #: True: a quoted field may hold line breaks (one row over several lines). Off by default, so a stray
    #: quote that would swallow the rows up to the next stray quote is an error naming the lines.
    multiline_fields: bool = False
    #: Where "transcribe" keeps the transcripts (JSON); default: $EMOFUSE_CACHE_DIR/transcripts, else
    #: ~/.cache/emofuse/transcripts.
    transcript_cache: Path | None = None


class ManifestReader(CorpusReader):
    """Any corpus described by a CSV/JSONL manifest: id, label, speaker, metadata, text, media paths, features."""

    name: ClassVar[str] = "manifest"
    Config: ClassVar[type[ManifestConfig]] = ManifestConfig
    default_root: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = (VIDEO, AUDIO, TEXT, METADATA, FEATURES)

    def samples(self) -> Iterator[Sample]:
        cfg: ManifestConfig = self.config  # type: ignore[assignment]
        if cfg.empty_text != "transcribe":
            yield from self._rows()
            return
        from emofuse.plugins.transcription import fill_missing_transcripts

        yield from fill_missing_transcripts(list(self._rows()), cfg.transcript_cache)

    def _rows(self) -> Iterator[Sample]:
        cfg: ManifestConfig = self.config  # type: ignore[assignment]
        unknown = sorted(set(cfg.columns) - set(FIELDS))
        if unknown:
            raise ConfigError(f"data.options.columns: unknown field(s) {', '.join(unknown)}",
                              hint=f"fields are {', '.join(FIELDS)}")
        bases = [self.root] if self.config.root is not None or self.data_dir is not None else []
        path = self.resolve(cfg.path, *bases, Path.cwd())
        table = read_table(path, multiline_fields=cfg.multiline_fields)
        col = {f: cfg.columns.get(f, f) for f in FIELDS}
        table.require(col["id"])
        has = {f: col[f] in table.columns for f in FIELDS}
        has["label"] = has["label"] and cfg.labelled
        if has["label"] and not self.label_names:
            raise ConfigError("data.options.labels: a manifest needs its label set given explicitly",
                              hint="e.g. --labels neutral,happy,sad,angry (the order is the class index)")
        feat_cols = feature_columns(table, cfg.feature_sets) if cfg.feature_sets else {}
        media_root = self.resolve(cfg.media_root, path.parent) if cfg.media_root else path.parent
        # Lexical containment (symlinks the data owner placed inside the root keep working).
        fence = Path(os.path.abspath(self.config.root)) if self.config.root is not None else None
        seen: set[str] = set()
        for line, row in table.rows:
            where = table.where(line)
            sample_id = "" if is_blank(row.get(col["id"])) else str(row[col["id"]]).strip()
            if not sample_id:
                self.bad(where, f"empty {col['id']!r}")
                continue
            if sample_id in seen:
                self.bad(where, f"id {sample_id!r} appears twice")
                continue
            seen.add(sample_id)
            label = None
            if has["label"]:
                label = self.label(None if is_blank(row.get(col["label"])) else str(row[col["label"]]), where)
                if label is None:
                    continue
            media: dict[str, str | None] = {"audio": None, "video": None}
            missing = None
            for field in ("audio", "video"):
                value = row.get(col[field]) if has[field] else None
                if is_blank(value):
                    continue
                p = Path(str(value).strip()).expanduser()
                p = p if p.is_absolute() else media_root / p
                if fence is not None and not Path(os.path.abspath(p)).is_relative_to(fence):
                    missing = f"{field} path {str(value).strip()!r} leads outside the data root {fence}"
                    break
                if not p.is_file():
                    missing = f"{field} file {p} does not exist"
                    break
                media[field] = str(p)
            if missing:
                self.bad(where, missing)
                continue
            text = None
            if has["text"]:
                raw = row.get(col["text"])
                text = None if is_blank(raw) else str(raw).strip()
                if text is None and cfg.empty_text == "error":
                    self.bad(where, "empty transcript", hint="fill it, set data.options.empty_text = absent, "
                                                            "or pass --on-bad-sample skip")
                    continue
            age = None
            if has["age"] and not is_blank(row.get(col["age"])):
                try:
                    age = float(row[col["age"]])
                except (TypeError, ValueError):
                    self.bad(where, f"age {row[col['age']]!r} is not a number")
                    continue
            utterance = None
            if has["utterance"] and not is_blank(row.get(col["utterance"])):
                try:
                    utterance = int(row[col["utterance"]])
                except (TypeError, ValueError):
                    self.bad(where, f"utterance index {row[col['utterance']]!r} is not an integer")
                    continue
            features = {}
            if feat_cols:
                features, reason = row_features(table, line, row, feat_cols)
                if features is None:
                    self.bad(where, reason or "bad features")
                    continue
            extra = {}
            if has["partition"] and not is_blank(row.get(col["partition"])):
                extra["partition"] = str(row[col["partition"]]).strip().lower()
            yield Sample(
                id=sample_id,
                label=label,
                label_name=self.label_names[label] if label is not None else None,
                speaker=None if not has["speaker"] or is_blank(row.get(col["speaker"])) else str(row[col["speaker"]]).strip(),
                age=age,
                gender=None if not has["gender"] or is_blank(row.get(col["gender"])) else str(row[col["gender"]]).strip(),
                text=text,
                audio_path=media["audio"],
                video_path=media["video"],
                features=features,
                dialogue_id=None if not has["dialogue"] or is_blank(row.get(col["dialogue"])) else str(row[col["dialogue"]]).strip(),
                utterance_index=utterance,
                source=where,
                extra=extra,
            )


@hookimpl
def register_datasets():
    return [ManifestReader]
