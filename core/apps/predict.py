"""Classifying new clips with a trained checkpoint: `emofuse predict` and ``emofuse.load(path).predict(...)``.

Inputs are media files (audio or video), folders of them, `Sample`s, or a manifest read by the
``manifest`` reader (text, metadata and features per clip). Each clip gives one JSON-able record:
``{"id", "path", "probabilities": {label: p}, "label", "branches": {branch: {label: p} or None},
"modalities", "transcript"}``; a clip that cannot be read gives
``{"id", "path", "error"}`` instead and the others are still predicted. The checkpoint's own
normaliser and label set are used, so predictions match what `evaluate` measured.

A model that reads text gets a transcript for every clip given without one (no ``--text``, an empty
manifest cell): the clip's speech transcribed offline by Whisper tiny.en, or the Whisper that
``EMOFUSE_TRANSCRIBER`` names (`emofuse.plugins.transcription`, cached per clip); its record then carries the
``transcript``. ``transcribe=False`` leaves such clips textless.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from emofuse.core.apps.evaluation import normalizer_of, resolve_device
from emofuse.core.data.dialogue import batch_positions, needs_whole_dialogues
from emofuse.core.data.feature_store import MemoryFeatureStore
from emofuse.core.data.speaker_norm import refuse_checkpoint, refuse_single_clips
from emofuse.core.data.preprocess import preprocess_spec
from emofuse.core.engine.encode import branch_outputs, model_outputs
from emofuse.core.engine.model_io import LoadedModel, load_model
from emofuse.core.errors import ConfigError, DataError, EmofuseError
from emofuse.core.registry import Registry, get_registry
from emofuse.core.types import AUDIO, TEXT, VIDEO, Batch, Sample

AUDIO_EXTENSIONS = frozenset({".wav", ".ogg", ".oga", ".opus", ".mp3", ".flac", ".m4a", ".aac"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v"})
MEDIA_EXTENSIONS = AUDIO_EXTENSIONS | VIDEO_EXTENSIONS
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".csv.gz", ".tsv.gz", ".jsonl.gz")
#: Audio beyond this many seconds is not decoded (a record says so): memory grows with the audio's
#: length (about 37 MB per minute was measured), so an hour-long file would need gigabytes.
DEFAULT_MAX_AUDIO_SECONDS = 60.0
#: The most audio per clip that prediction ever decodes, also for "whole clips" (0 / None): the models read a
#: clip's whole feature sequence at once (Whisper features: about 100 MB per audio minute), so memory cannot be
#: bounded by a window without changing what they compute; five minutes is far beyond any training clip.
MAX_AUDIO_SECONDS_CEILING = 300.0


@dataclass
class DecodedClips:
    """Samples after `Predictor.decode`: the batch of those that decoded (its rows are `decoded`)
    and, for each that did not, the reason."""

    samples: list[Sample]
    batch: Batch | None
    decoded: list[Sample]
    failed: list[tuple[Sample, str]]


@dataclass
class Failure:
    """A clip that could not be predicted, and why (one line)."""

    id: str
    path: str | None
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "error": self.error}


def is_manifest(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in MANIFEST_SUFFIXES)


def media_files(folder: Path) -> list[Path]:
    """Every audio/video file under `folder`, recursively (through symlinked folders), in name order."""
    from emofuse.core.data.corpus import files_under

    return [p for p in files_under(folder) if p.suffix.lower() in MEDIA_EXTENSIONS]


def sample_from_media(path: Path, *, text: str | None = None, modalities: Iterable[str] = (AUDIO, VIDEO),
                      sample_id: str | None = None, by_content: bool = False) -> Sample:
    """A `Sample` for one media file: a video file serves as video and (when it has a track) as audio.

    The header is probed first, so a file that is not media at all fails here with its reason.
    `by_content`: what PyAV finds in the file decides whether it is audio or video, never its name
    (for uploads, which are stored under a neutral name and whose client-given name proves nothing).
    """
    from emofuse.core.data.decode import probe

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file", hint="check the path")
    ext = path.suffix.lower()
    if not by_content and ext not in MEDIA_EXTENSIONS:
        raise DataError(path, f"unsupported file type {ext or '(none)'}",
                        hint=f"give audio ({', '.join(sorted(AUDIO_EXTENSIONS))}) or video "
                             f"({', '.join(sorted(VIDEO_EXTENSIONS))}) files, or a manifest")
    info = probe(path)
    is_video_file = info.has_video if by_content else ext in VIDEO_EXTENSIONS
    wanted = set(modalities)
    audio = str(path) if info.has_audio and AUDIO in wanted else None
    video = str(path) if info.has_video and VIDEO in wanted and is_video_file else None
    if audio is None and video is None:
        raise DataError(path, "has no audio or video stream this model reads",
                        hint=f"the model reads {', '.join(sorted(wanted)) or 'nothing'} from media")
    return Sample(id=sample_id or path.stem, text=text, audio_path=audio, video_path=video, source=str(path))


def samples_from_manifest(
    manifest: Path, label_names: Sequence[str], registry: Registry | None = None, *, transcribe: bool = False
) -> list[Sample | Failure]:
    """Rows of a CSV/TSV/JSONL manifest via the ``manifest`` reader, in the file's order; a bad row
    becomes a failure under its own id. Labels are not read: prediction needs none. With `transcribe`,
    rows without text get their clip's speech transcribed."""
    from emofuse.core.data.tables import read_table

    registry = registry or get_registry()
    cls = registry.cls("dataset", "manifest")
    path = Path(manifest).resolve()
    options = {"path": str(path), "labels": list(label_names), "labelled": False,
               "empty_text": "transcribe" if transcribe else "absent"}
    reader = cls(cls.make_config(options, where="--manifest"), data_dir=None)
    reader.on_bad_sample = "skip"
    samples = list(reader.samples())
    skipped = list(getattr(reader, "skipped", []))
    ids: dict[int, str] = {}
    if skipped:
        id_column = dict(reader.config.columns).get("id", "id")
        ids = {line: str(row.get(id_column) or "").strip() for line, row in read_table(path).rows}
    entries: list[tuple[int, Sample | Failure]] = [(_line_of(s.source), s) for s in samples]
    for where, reason in skipped:
        line = _line_of(where)
        entries.append((line, Failure(id=ids.get(line) or f"{path.name}:{line}", path=where, error=reason)))
    return [entry for _, entry in sorted(entries, key=lambda e: e[0])]


def _line_of(where: str | None) -> int:
    tail = str(where or "").rpartition(":")[2]
    return int(tail) if tail.isdigit() else 0


def _path_of(sample: Sample) -> str | None:
    return sample.video_path or sample.audio_path or sample.source


class Predictor:
    """A loaded checkpoint ready to classify clips; build one with `load`."""

    def __init__(self, loaded: LoadedModel, *, device: str | torch.device = "auto", batch_size: int = 8,
                 registry: Registry | None = None, max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
                 transcribe: bool = True, feature_memory: int = 256):

        if max_audio_seconds is not None and not 0 < max_audio_seconds <= MAX_AUDIO_SECONDS_CEILING:
            raise ConfigError(f"max_audio_seconds {max_audio_seconds!r} must be a number of seconds above 0 and at most "
                              f"{MAX_AUDIO_SECONDS_CEILING:g}, the ceiling (memory grows about 100 MB per audio minute)",
                              hint=f"or None (--max-audio-seconds 0) for whole clips up to {MAX_AUDIO_SECONDS_CEILING:g} s")
        refuse_single_clips(loaded.config, f"model {loaded.config.name!r}")  # per-speaker: a lone clip has no statistics
        self.whole_clips = max_audio_seconds is None
        max_audio_seconds = MAX_AUDIO_SECONDS_CEILING if max_audio_seconds is None else max_audio_seconds
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.label_names = list(loaded.label_names)
        self.modalities = sorted(loaded.model.modalities)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        #: Decoding settings: the run's (its face settings), with long audio cut at `max_audio_seconds`.
        self.spec = dataclasses.replace(preprocess_spec(loaded.config.data), max_audio_seconds=max_audio_seconds)
        self.normalizer = normalizer_of(loaded)
        self.registry = registry
        #: Transcribe the speech of clips that come without text (only when the model reads text).
        self.transcribe = transcribe and TEXT in self.modalities
        #: Frozen features of the `feature_memory` clips scored last, in memory only (a clip explained after its
        #: prediction does not run the backbones again); nothing is written to disk. None keeps nothing.
        self.store = MemoryFeatureStore(max_entries=feature_memory) if feature_memory else None
        self.model.to(self.device)

    # -- inputs -------------------------------------------------------------------------------------
    def to_samples(self, items: Any, *, text: str | None = None) -> list[Sample | Failure]:
        """Media paths, folders, manifests and `Sample`s -> one `Sample` or `Failure` per clip, in input order."""
        if isinstance(items, (str, Path, Sample)):
            items = [items]
        out: list[Sample | Failure] = []
        for item in items:
            if isinstance(item, Sample):
                out.append(item)
                continue
            path = Path(item)
            try:
                if path.is_dir():
                    found = media_files(path)
                    if not found:
                        raise DataError(path, "folder holds no audio or video files")
                    out += [self._media(media, text) for media in found]
                elif is_manifest(path):
                    out += samples_from_manifest(path, self.label_names, self.registry, transcribe=self.transcribe)
                else:
                    out.append(self._media(path, text))
            except EmofuseError as exc:
                out.append(Failure(path.stem, str(path), exc.message))
        return self.with_transcripts(out) if self.transcribe else out

    def media_modalities(self, text: str | None) -> list[str]:
        """What to read from a media file given with `text`: the model's modalities, plus the sound track
        of a text-reading model's clip that comes without text (to transcribe it)."""
        return self.modalities + [AUDIO] if self.transcribe and text is None and AUDIO not in self.modalities \
            else self.modalities

    def _media(self, path: Path, text: str | None) -> Sample | Failure:
        try:
            return sample_from_media(path, text=text, modalities=self.media_modalities(text))
        except EmofuseError as exc:
            return Failure(path.stem, str(path), exc.message)

    def with_transcripts(self, entries: list[Sample | Failure]) -> list[Sample | Failure]:
        """Fill missing transcripts from the clips' speech; drop the sound track again where the model does not
        read audio."""
        from dataclasses import replace

        from emofuse.plugins.transcription import fill_missing_transcripts

        positions = [i for i, e in enumerate(entries) if isinstance(e, Sample)]
        samples = [entries[i] for i in positions]
        try:
            filled = fill_missing_transcripts(samples)  # type: ignore[arg-type]
        except EmofuseError:  # one clip's sound cannot be read: the others are still transcribed, and that
            filled = []       # clip goes on without text (its decoding then reports what is wrong with it)
            for sample in samples:
                try:
                    filled += fill_missing_transcripts([sample])  # type: ignore[list-item]
                except EmofuseError:
                    filled.append(sample)
        out = list(entries)
        for i, sample in zip(positions, filled):
            out[i] = sample if AUDIO in self.modalities else replace(sample, audio_path=None)
        return out

    # -- prediction ---------------------------------------------------------------------------------
    def predict(self, items: Any, *, text: str | None = None) -> list[dict[str, Any]]:
        """One record per clip, in input order: ``probabilities`` and ``label``, or ``error``.

        `items`: a path or `Sample`, or a list of them; paths may be media files, folders or manifests.
        `text` is the transcript given to every media file (manifests carry their own).
        """
        return self.records(self.to_samples(items, text=text))

    def records(self, entries: Sequence[Sample | Failure]) -> list[dict[str, Any]]:
        """Predict the `Sample`s of `to_samples`' output; its failures become error records, in order."""
        samples = [e for e in entries if isinstance(e, Sample)]
        predicted = iter(self.predict_samples(samples))
        return [next(predicted) if isinstance(e, Sample) else e.to_dict() for e in entries]

    def predict_samples(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        """One record per sample, in order; a clip that fails to decode becomes an error record."""
        records: dict[int, dict[str, Any]] = {}
        by_dialogue = needs_whole_dialogues(self.model)  # a context model sees whole dialogues, as in training
        for positions in batch_positions(samples, self.batch_size, by_dialogue=by_dialogue):
            chunk = [samples[i] for i in positions]
            records.update(zip(positions, self.score(self.decode(chunk))))
        return [records[i] for i in range(len(samples))]

    def decode(self, samples: Sequence[Sample]) -> DecodedClips:
        """Decode and normalise `samples` as one batch; bad clips are left out and named with their reason.

        Split from `score` so a caller (the prediction service) can batch and time the two steps.
        """
        from emofuse.core.data.pipeline import make_batch

        chunk = list(samples)
        ids = [s.id for s in chunk]
        if len(set(ids)) == len(ids):
            try:
                batch = make_batch(chunk, self.modalities, self.normalizer, on_bad_sample="skip", spec=self.spec)
            except EmofuseError:
                batch = None  # none decoded: find each one's reason below
            if batch is not None:
                kept = set(batch.ids)
                reasons = dict(batch.extra.get("skipped", []))
                decoded = [s for s in chunk if s.id in kept]
                bad = [(s, self._reason(s, reasons)) for s in chunk if s.id not in kept]
                return DecodedClips(chunk, batch, decoded, bad)
        good, bad = [], []
        for sample in chunk:  # clip by clip: duplicate ids, or every clip of the chunk failed
            try:
                make_batch([sample], self.modalities, self.normalizer, on_bad_sample="error", spec=self.spec)
                good.append(sample)
            except EmofuseError as exc:
                bad.append((sample, exc.message))
        if not good:
            return DecodedClips(chunk, None, [], bad)
        return DecodedClips(chunk, make_batch(good, self.modalities, self.normalizer, on_bad_sample="error", spec=self.spec),
                            good, bad)

    @torch.no_grad()
    def score(self, clips: DecodedClips) -> list[dict[str, Any]]:
        """One record per sample of `clips`, in order: the fused probabilities, each branch's own
        probabilities (None for a branch whose modalities the clip lacks), the modalities read and
        the transcript the model read (None when it read none)."""
        by_position: dict[int, dict[str, Any]] = {
            id(s): Failure(s.id, _path_of(s), reason).to_dict() for s, reason in clips.failed}
        if clips.batch is not None:
            batch = clips.batch.to(self.device)
            logits, outputs = model_outputs(self.model, batch, self.store)
            probs = logits.float().softmax(dim=1).cpu()
            branch_probs = {name: (out.logits.float().softmax(dim=1).cpu(), out.presence().cpu())
                            for name, out in outputs.items()}
            for row, sample in enumerate(clips.decoded):
                modalities = sorted(m for m in self.modalities if bool(batch.present[m][row]))
                by_position[id(sample)] = {
                    "id": sample.id,
                    "path": _path_of(sample),
                    "label": self.label_names[int(probs[row].argmax())],
                    "probabilities": self._by_label(probs[row]),
                    "branches": {name: self._by_label(p[row]) if bool(seen[row]) else None
                                 for name, (p, seen) in branch_probs.items()},
                    "modalities": modalities,
                    "transcript": sample.text if TEXT in modalities else None,
                }
                if sample.extra.get("transcribed"):  # the text came from Whisper, not from the caller
                    by_position[id(sample)]["transcribed"] = True
                warning = self._cropped(batch, row)
                if warning:
                    by_position[id(sample)]["warning"] = warning
                reasons = batch.extra.get("absent_reasons", [{}] * len(clips.decoded))[row]
                if reasons:  # e.g. a video without a face: predicted from the other modalities
                    by_position[id(sample)]["absent"] = dict(reasons)
        return [by_position[id(s)] for s in clips.samples]

    def _by_label(self, probabilities: torch.Tensor) -> dict[str, float]:
        return {name: round(float(v), 6) for name, v in zip(self.label_names, probabilities.tolist())}

    def _cropped(self, batch: Any, row: int) -> str | None:
        cap = self.spec.max_audio_seconds
        if cap is None or batch.audio is None or batch.audio_lengths is None or not bool(batch.present[AUDIO][row]):
            return None
        if int(batch.audio_lengths[row]) < int(cap * self.spec.sample_rate):
            return None
        if self.whole_clips:
            return (f"audio longer than {cap:g} s, the ceiling of whole-clip decoding: only its first {cap:g} s were "
                    "used (cut the file into parts to score the rest)")
        return f"audio longer than {cap:g} s: only its first {cap:g} s were used (raise --max-audio-seconds)"

    @torch.no_grad()
    def branch_contributions(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """(final logits ``[B, C]``, each branch's share of them ``[B, C]``, the branch outputs).

        A fusion that is a sum of per-branch terms reports them itself (`Fusion.contributions`:
        weight x logits for the late fusions); for any other fusion a branch's share is what the
        fused logits lose when that branch is marked absent. A single branch owns all of its logits.
        """
        from dataclasses import replace

        batch = batch.to(self.device)
        outputs = branch_outputs(self.model, batch, self.store)
        fusion = self.model.fusion
        if fusion is None:
            ((name, only),) = outputs.items()
            return only.logits.float(), {name: only.logits.float()}, outputs
        final = fusion(outputs).float()
        parts = fusion.contributions(outputs)
        if parts is None:
            parts = {}
            for name, out in outputs.items():
                without = {**outputs, name: replace(out, present=torch.zeros_like(out.presence()))}
                parts[name] = final - fusion(without).float()
        return final, {k: v.detach().float() for k, v in parts.items()}, outputs

    def decode_for_explanation(self, samples: Sequence[Sample]):
        """(batch or None, the samples in it, [(sample, reason)]), decoded as `predict` decodes them."""
        clips = self.decode(list(samples))
        return clips.batch, clips.decoded, clips.failed

    @staticmethod
    def _reason(sample: Sample, reasons: Mapping[str, str]) -> str:
        for path in (sample.video_path, sample.audio_path):
            if path and str(path) in reasons:
                reason = reasons[str(path)]
                return reason if str(path) in reason else f"{path}: {reason}"
        return f"{_path_of(sample)}: could not be decoded"


def load(checkpoint: str | Path, *, device: str | torch.device = "auto", batch_size: int = 8,
         registry: Registry | None = None, max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
         transcribe: bool = True, feature_memory: int = 256) -> Predictor:
    """Load a checkpoint for prediction: ``emofuse.load("runs/x/model.safetensors").predict(["a.wav"])``.

    Audio longer than `max_audio_seconds` is cut there (its record carries a ``warning``); None decodes it
    whole up to `MAX_AUDIO_SECONDS_CEILING` (300 s), cut there too. With `transcribe`, clips without text get their speech transcribed (when the model reads text).
    `feature_memory`: how many clips' frozen features are kept in memory for reuse (0: none)."""
    refuse_checkpoint(checkpoint)  # before the weights load: a per-speaker (transductive) model takes no lone clips
    return Predictor(load_model(Path(checkpoint), registry=registry), device=device, batch_size=batch_size,
                     registry=registry, max_audio_seconds=max_audio_seconds, transcribe=transcribe,
                     feature_memory=feature_memory)


def predict_files(
    checkpoint: Path,
    *,
    inputs: Sequence[Path] = (),
    manifest: Path | None = None,
    text: str | None = None,
    out: Path | None = None,
    max_audio_seconds: float | None = DEFAULT_MAX_AUDIO_SECONDS,
    explain_dir: Path | None = None,
    transcribe: bool = True,
) -> list[dict[str, Any]]:
    """`emofuse predict`: one record per clip (an unreadable clip's has an ``error`` field; the others
    are still predicted), also written as JSON lines to `out` when given.

    With `explain_dir`, each predicted clip also gets ``<id>.png`` there (see `explain`), named in
    its record's ``explanation`` field.
    """
    items: list[Path] = list(inputs)
    if manifest is not None:
        items.append(Path(manifest))
    if not items:
        raise ConfigError("nothing to predict", hint="pass media files, a folder, or --manifest FILE")
    predictor = load(checkpoint, max_audio_seconds=max_audio_seconds, transcribe=transcribe)
    entries = predictor.to_samples(items, text=text)
    records = predictor.records(entries)
    if explain_dir is not None:
        from emofuse.core.apps.explain import write_explanations

        written = write_explanations(predictor, [e for e in entries if isinstance(e, Sample)], explain_dir)
        for record in records:
            if record["id"] in written and "error" not in record:
                record["explanation"] = str(written[record["id"]])
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json_lines(records), encoding="utf-8")
    return records


def json_lines(records: Sequence[Mapping[str, Any]]) -> str:
    """Records as JSON lines (non-ASCII kept as it is)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


__all__ = ["DecodedClips", "Failure", "Predictor", "json_lines", "load", "predict_files", "sample_from_media", "samples_from_manifest"]
