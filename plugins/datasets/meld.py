"""MELD (Poria et al. 2019): utterances of Friends dialogues from the corpus' CSVs, clips when present.

Each partition CSV (train/dev/test) that exists is read; a clip ``dia{D}_utt{U}.mp4`` in that
partition's clip folder becomes the sample's video and audio. The corpus' own partition is kept in
``Sample.extra["partition"]`` (unless ``use_given_partition`` is false), which the pipeline uses
for ``split = "speaker"``: MELD's main speakers appear in every partition, so the corpus partition
is the meaningful held-out split.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Iterator

from emofuse.core import (
    AUDIO,
    TEXT,
    VIDEO,
    CorpusReader,
    CorpusReaderConfig,
    DataError,
    Sample,
    hookimpl,
    is_blank,
    read_table,
)

EMOTIONS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
REQUIRED = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
OPTIONAL = ("Sentiment", "Season", "Episode", "StartTime", "EndTime", "Sr No.")


class MeldConfig(CorpusReaderConfig):
    #: Partition -> transcript CSV (relative to the root; a plain ``.csv`` is tried when the ``.gz`` is absent).
    partitions: dict[str, str] = {
        "train": "train_sent_emo.csv.gz",
        "dev": "dev_sent_emo.csv.gz",
        "test": "test_sent_emo.csv.gz",
    }
    #: Partition -> folder of its ``dia{D}_utt{U}.mp4`` clips (relative to the root).
    clip_dirs: dict[str, str] = {
        "train": "train_splits",
        "dev": "dev_splits_complete",
        "test": "output_repeated_splits_test",
    }
    #: Keep the corpus partition in ``extra["partition"]`` so the pipeline can use it as the split.
    use_given_partition: bool = True


class MeldReader(CorpusReader):
    """MELD utterances: transcript, speaker, dialogue and utterance index, clips when present."""

    name: ClassVar[str] = "meld"
    Config: ClassVar[type[MeldConfig]] = MeldConfig
    default_labels: ClassVar[tuple[str, ...]] = EMOTIONS
    default_root: ClassVar[str] = "meld"
    modalities: ClassVar[tuple[str, ...]] = (TEXT, AUDIO, VIDEO)

    def samples(self) -> Iterator[Sample]:
        cfg: MeldConfig = self.config  # type: ignore[assignment]
        root = self.require_root()
        found = False
        for partition, filename in cfg.partitions.items():
            path = root / filename
            if not path.is_file() and path.suffix == ".gz" and path.with_suffix("").is_file():
                path = path.with_suffix("")
            if not path.is_file():
                continue
            found = True
            clip_dir = root / cfg.clip_dirs[partition] if partition in cfg.clip_dirs else None
            yield from self._partition(partition, path, clip_dir if clip_dir and clip_dir.is_dir() else None)
        if not found:
            raise DataError(root, f"none of the MELD transcripts were found ({', '.join(cfg.partitions.values())})",
                            hint="point data.options.root at the MELD folder, or set data.options.partitions")

    def _partition(self, partition: str, path: Path, clip_dir: Path | None) -> Iterator[Sample]:
        cfg: MeldConfig = self.config  # type: ignore[assignment]
        table = read_table(path)
        table.require(*REQUIRED)
        seen: set[str] = set()
        for line, row in table.rows:
            where = table.where(line)
            try:
                dialogue, utterance = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
            except (TypeError, ValueError):
                self.bad(where, f"Dialogue_ID {row['Dialogue_ID']!r} / Utterance_ID {row['Utterance_ID']!r} "
                                "are not integers")
                continue
            sample_id = f"{partition}-dia{dialogue}_utt{utterance}"
            if sample_id in seen:
                self.bad(where, f"utterance dia{dialogue}_utt{utterance} appears twice")
                continue
            seen.add(sample_id)
            text = "" if is_blank(row["Utterance"]) else str(row["Utterance"]).strip()
            if not text:
                self.bad(where, "empty transcript (Utterance)")
                continue
            speaker = "" if is_blank(row["Speaker"]) else str(row["Speaker"]).strip()
            if not speaker:
                self.bad(where, "empty Speaker")
                continue
            label = self.label(row["Emotion"], where)
            if label is None:
                continue
            clip = clip_dir / f"dia{dialogue}_utt{utterance}.mp4" if clip_dir is not None else None
            clip_path = str(clip) if clip is not None and clip.is_file() else None
            extra = {k.lower().replace(" ", "_").replace(".", ""): row[k] for k in OPTIONAL if k in row}
            extra["emotion"] = str(row["Emotion"]).strip().lower()
            if cfg.use_given_partition:
                extra["partition"] = partition
            else:
                extra["corpus_partition"] = partition
            yield Sample(
                id=sample_id,
                label=label,
                label_name=self.label_names[label],
                speaker=speaker,
                text=text,
                audio_path=clip_path,
                video_path=clip_path,
                dialogue_id=f"{partition}-{dialogue}",
                utterance_index=utterance,
                source=where,
                extra=extra,
            )


@hookimpl
def register_datasets():
    return [MeldReader]
