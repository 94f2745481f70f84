"""RAVDESS (Livingstone & Russo 2018): everything comes from the file name ``MM-VV-EE-II-SS-RR-AA``.

Works on the speech-only layout (``03-...`` audio files) and the audio-visual one (``01-`` video with
audio, ``02-`` video only), or both side by side: files that differ only in their modality code are
one clip, whose id is the name without that code (``VV-EE-II-SS-RR-AA``). Video comes from the ``01``
/``02`` file; audio from the ``03`` file, else from the ``01`` file's own track.
A per-clip feature table (by default the shared facial-action-unit + MFCC table) can be joined.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import ClassVar, Iterator, Literal

from emofuse.core import (
    AUDIO,
    FEATURES,
    METADATA,
    TEXT,
    VIDEO,
    CorpusReader,
    CorpusReaderConfig,
    DataError,
    Sample,
    files_under,
    hookimpl,
    load_feature_table,
)

log = logging.getLogger("emofuse.data")

EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
STATEMENTS = {1: "Kids are talking by the door", 2: "Dogs are sitting by the door"}
CHANNELS = {1: "speech", 2: "song"}
INTENSITIES = {1: "normal", 2: "strong"}
AUDIO_EXTENSIONS = {".wav", ".ogg", ".oga", ".opus", ".mp3", ".flac", ".m4a", ".aac"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v"}
NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")
#: Feature table shipped beside the corpora (per-clip action units + MFCC-derived values).
SHARED_TABLE = "ravdess-au-mfcc.csv.gz"


class RavdessConfig(CorpusReaderConfig):
    #: Which vocal channels to keep.
    channels: list[Literal["speech", "song"]] = ["speech"]
    #: Per-clip feature table joined by clip id without its modality code: "auto" (the shared
    #: table, when present), None (no join) or a path (relative to the root or the data folder).
    feature_table: str | None = "auto"
    #: Feature set name -> column prefix in the table.
    feature_sets: dict[str, str] = {"au": "au_", "mfcc": "mfcc_"}
    #: Column of the table holding the RAVDESS clip name.
    feature_id_column: str = "clip_id"


class RavdessReader(CorpusReader):
    """RAVDESS speech or audio-visual clips: emotion, intensity, statement, actor and sex from the file name."""

    name: ClassVar[str] = "ravdess"
    Config: ClassVar[type[RavdessConfig]] = RavdessConfig
    default_labels: ClassVar[tuple[str, ...]] = EMOTIONS
    default_root: ClassVar[str] = "ravdess-speech"
    modalities: ClassVar[tuple[str, ...]] = (AUDIO, VIDEO, TEXT, METADATA, FEATURES)

    def samples(self) -> Iterator[Sample]:
        cfg: RavdessConfig = self.config  # type: ignore[assignment]
        root = self.require_root()
        clips: dict[str, dict[int, Path]] = {}
        codes_of: dict[str, tuple[int, ...]] = {}
        for path in files_under(root):
            ext = path.suffix.lower()
            if not path.is_file() or ext not in AUDIO_EXTENSIONS | VIDEO_EXTENSIONS:
                continue
            codes = self._parse(path)
            if codes is None:
                continue
            modality, channel = codes[0], codes[1]
            if CHANNELS[channel] not in cfg.channels:
                continue
            is_video_file = ext in VIDEO_EXTENSIONS
            if (modality == 3) == is_video_file:
                self.bad(path, f"modality code {modality:02d} does not fit a {ext} file")
                continue
            clip_id = "-".join(f"{c:02d}" for c in codes[1:])
            if modality in clips.setdefault(clip_id, {}):
                self.bad(path, f"clip {clip_id} has two files with modality {modality:02d}: "
                               f"{clips[clip_id][modality].name} and {path.name}")
                continue
            clips[clip_id][modality] = path
            codes_of[clip_id] = codes
        if not clips:
            raise DataError(root, "no RAVDESS clips found (names like 03-01-05-01-02-01-12.wav)",
                            hint="point data.options.root at the folder holding Actor_XX/")
        features = self._feature_table(root)
        joined = 0
        for clip_id in sorted(clips):
            files = clips[clip_id]
            _, channel, emotion, intensity, statement, repetition, actor = codes_of[clip_id]
            video = files.get(1) or files.get(2)
            audio = files.get(3) or files.get(1)
            where = audio or video
            label = self.label(EMOTIONS[emotion - 1], where)
            if label is None:
                continue
            feats = features.get(clip_id, {}) if features is not None else {}
            joined += bool(feats)
            yield Sample(
                id=clip_id,
                label=label,
                label_name=self.label_names[label],
                speaker=f"Actor_{actor:02d}",
                gender="male" if actor % 2 == 1 else "female",
                text=STATEMENTS[statement],
                audio_path=str(audio) if audio else None,
                video_path=str(video) if video else None,
                features=feats,
                source=str(where),
                extra={
                    "emotion": EMOTIONS[emotion - 1],
                    "intensity": INTENSITIES[intensity],
                    "statement": statement,
                    "repetition": repetition,
                    "vocal_channel": CHANNELS[channel],
                    "actor": actor,
                    "modality_codes": sorted(files),
                },
            )
        if features is not None and joined < len(clips):
            log.info("ravdess: %d of %d clips have a row in the feature table", joined, len(clips))

    def _parse(self, path: Path) -> tuple[int, ...] | None:
        m = NAME.match(path.stem)
        if not m:
            self.bad(path, "file name is not a RAVDESS code (MM-VV-EE-II-SS-RR-AA)")
            return None
        codes = tuple(int(g) for g in m.groups())
        modality, channel, emotion, intensity, statement, repetition, actor = codes
        problems = []
        if modality not in (1, 2, 3):
            problems.append(f"modality {modality:02d}")
        if channel not in CHANNELS:
            problems.append(f"vocal channel {channel:02d}")
        if not 1 <= emotion <= len(EMOTIONS):
            problems.append(f"emotion {emotion:02d}")
        if intensity not in INTENSITIES:
            problems.append(f"intensity {intensity:02d}")
        if statement not in STATEMENTS:
            problems.append(f"statement {statement:02d}")
        if repetition not in (1, 2):
            problems.append(f"repetition {repetition:02d}")
        if actor < 1:
            problems.append(f"actor {actor:02d}")
        if problems:
            self.bad(path, f"file name has unknown code(s): {', '.join(problems)}")
            return None
        return codes

    def _feature_table(self, root: Path) -> dict | None:
        cfg: RavdessConfig = self.config  # type: ignore[assignment]
        if cfg.feature_table is None or cfg.feature_table.lower() == "none":
            return None
        bases = [root, root.parent] + ([Path(self.data_dir)] if self.data_dir else [])
        if cfg.feature_table.lower() == "auto":
            path = next((b / SHARED_TABLE for b in bases if (b / SHARED_TABLE).is_file()), None)
            if path is None:
                return None
        else:
            path = self.resolve(cfg.feature_table, *bases)
            if path is None or not path.is_file():
                raise DataError(path or cfg.feature_table, "feature table not found",
                                hint="fix data.options.feature_table, or set it to none")
        return load_feature_table(
            path,
            id_column=cfg.feature_id_column,
            feature_sets=cfg.feature_sets,
            key_pattern=r"^\d\d-(\d\d-\d\d-\d\d-\d\d-\d\d-\d\d)$",
            on_bad_row=self.bad,
        )


@hookimpl
def register_datasets():
    return [RavdessReader]
