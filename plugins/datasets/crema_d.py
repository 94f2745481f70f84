"""CREMA-D (Cao et al. 2014): ``ACTOR_SENTENCE_EMOTION_LEVEL`` file names, demographics from a CSV.

Any of the corpus' folders may be present (AudioWAV, AudioMP3, VideoFlash, VideoMP4, or one flat
folder): files with one stem are one clip. Video comes from ``.flv``/``.mp4``; audio from ``.wav``,
else ``.mp3``, else the video file's own track. Age and sex are joined from `VideoDemographics.csv`
by actor; the transcript is the sentence the code names.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Iterator

from emofuse.core import (
    AUDIO,
    METADATA,
    TEXT,
    VIDEO,
    CorpusReader,
    CorpusReaderConfig,
    DataError,
    Sample,
    files_under,
    hookimpl,
    is_blank,
    read_table,
)

#: Emotion codes -> label names (named as in RAVDESS so label sets carry across corpora).
EMOTIONS = {"NEU": "neutral", "HAP": "happy", "SAD": "sad", "ANG": "angry", "FEA": "fearful", "DIS": "disgust"}
LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
#: The twelve sentences of CREMA-D, by code.
SENTENCES = {
    "IEO": "It's eleven o'clock",
    "TIE": "That is exactly what happened",
    "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about",
    "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold",
    "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment",
    "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before",
    "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}
AUDIO_PREFERENCE = (".wav", ".mp3")
VIDEO_PREFERENCE = (".flv", ".mp4")
NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")


class CremaDConfig(CorpusReaderConfig):
    #: Demographics table (relative to the root); None to leave age and sex unknown.
    demographics: str | None = "VideoDemographics.csv"


class CremaDReader(CorpusReader):
    """CREMA-D clips: 6 emotions, actor age and sex from VideoDemographics.csv, the spoken sentence as text."""

    name: ClassVar[str] = "crema-d"
    Config: ClassVar[type[CremaDConfig]] = CremaDConfig
    default_labels: ClassVar[tuple[str, ...]] = ("neutral", "happy", "sad", "angry", "fearful", "disgust")
    default_root: ClassVar[str] = "crema-d"
    modalities: ClassVar[tuple[str, ...]] = (AUDIO, VIDEO, TEXT, METADATA)

    def samples(self) -> Iterator[Sample]:
        root = self.require_root()
        demographics = self._demographics(root)
        clips: dict[str, dict[str, Path]] = {}
        for path in files_under(root):
            ext = path.suffix.lower()
            if not path.is_file() or ext not in AUDIO_PREFERENCE + VIDEO_PREFERENCE:
                continue
            files = clips.setdefault(path.stem, {})
            if ext in files:
                self.bad(path, f"clip {path.stem} has two {ext} files: {files[ext]} and {path}")
                continue
            files[ext] = path
        if not clips:
            raise DataError(root, "no CREMA-D clips found (names like 1001_DFA_ANG_XX.wav)",
                            hint="point data.options.root at the CREMA-D folder")
        for stem in sorted(clips):
            files = clips[stem]
            video = next((files[e] for e in VIDEO_PREFERENCE if e in files), None)
            audio = next((files[e] for e in AUDIO_PREFERENCE if e in files), None) or video
            where = audio or video
            m = NAME.match(stem)
            if not m:
                self.bad(where, "file name is not a CREMA-D code (ACTOR_SENTENCE_EMOTION_LEVEL)")
                continue
            actor, sentence, emotion, level = m.groups()
            if sentence not in SENTENCES or emotion not in EMOTIONS or level not in LEVELS:
                unknown = [c for c, known in ((sentence, SENTENCES), (emotion, EMOTIONS), (level, LEVELS))
                           if c not in known]
                self.bad(where, f"file name has unknown code(s): {', '.join(unknown)}")
                continue
            label = self.label(EMOTIONS[emotion], where)
            if label is None:
                continue
            person = demographics.get(actor, {}) if demographics is not None else {}
            if demographics is not None and not person:
                self.bad(where, f"actor {actor} has no row in the demographics table",
                         hint="add the actor to VideoDemographics.csv, or set data.options.demographics = none")
                continue
            yield Sample(
                id=stem,
                label=label,
                label_name=self.label_names[label],
                speaker=actor,
                age=person.get("age"),
                gender=person.get("sex"),
                text=SENTENCES[sentence],
                audio_path=str(audio) if audio else None,
                video_path=str(video) if video else None,
                source=str(where),
                extra={
                    "emotion": EMOTIONS[emotion],
                    "level": LEVELS[level],
                    "sentence": sentence,
                    "race": person.get("race"),
                    "ethnicity": person.get("ethnicity"),
                },
            )

    def _demographics(self, root: Path) -> dict[str, dict] | None:
        cfg: CremaDConfig = self.config  # type: ignore[assignment]
        if cfg.demographics is None or cfg.demographics.lower() == "none":
            return None
        path = self.resolve(cfg.demographics, root, root.parent)
        if path is None or not path.is_file():
            raise DataError(path or cfg.demographics, "CREMA-D demographics table not found",
                            hint="set data.options.demographics to its path, or to none")
        table = read_table(path)
        table.require("ActorID", "Age", "Sex")
        out: dict[str, dict] = {}
        for line, row in table.rows:
            actor = str(row["ActorID"]).strip()
            try:
                age = None if is_blank(row["Age"]) else float(row["Age"])
            except ValueError:
                self.bad(table.where(line), f"age {row['Age']!r} is not a number")
                continue
            out[actor] = {
                "age": age,
                "sex": None if is_blank(row["Sex"]) else str(row["Sex"]).strip(),
                "race": row.get("Race"),
                "ethnicity": row.get("Ethnicity"),
            }
        return out


@hookimpl
def register_datasets():
    return [CremaDReader]
