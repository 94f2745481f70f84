"""Classifying new clips with a trained checkpoint: `emofuse predict` and ``emofuse.load(path).predict(...)``.

Inputs are media files (audio or video), folders of them, `Sample`s, or a manifest read by the
``manifest`` reader (text, metadata and features per clip). Each clip gives one JSON-able record:
``{"id", "path", "probabilities": {label: p}, "label"}``; a clip that cannot be read gives
``{"id", "path", "error"}`` instead and the others are still predicted. The checkpoint's own
normaliser and label set are used, so predictions match what `evaluate` measured.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from emofuse.core.data.preprocess import preprocess_spec
from emofuse.core.errors import ConfigError, DataError, EmofuseError
from emofuse.core.apps.evaluation import normalizer_of, resolve_device
from emofuse.core.engine.model_io import LoadedModel, load_model
from emofuse.core.registry import Registry, get_registry
from emofuse.core.types import AUDIO, VIDEO, Sample

AUDIO_EXTENSIONS = frozenset({".wav", ".ogg", ".oga", ".opus", ".mp3", ".flac", ".m4a", ".aac"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".m4v"})
MEDIA_EXTENSIONS = AUDIO_EXTENSIONS | VIDEO_EXTENSIONS
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".csv.gz", ".tsv.gz", ".jsonl.gz")


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
    """Every audio/video file under `folder`, recursively, in name order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS)


def sample_from_media(path: Path, *, text: str | None = None, modalities: Iterable[str] = (AUDIO, VIDEO)) -> Sample:
    """A `Sample` for one media file: a video file serves as video and (when it has a track) as audio.

    The header is probed first, so a file that is not media at all fails here with its reason.
    """
    from emofuse.core.data.decode import probe

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such file", hint="check the path")
    ext = path.suffix.lower()
    if ext not in MEDIA_EXTENSIONS:
        raise DataError(path, f"unsupported file type {ext or '(none)'}",
                        hint=f"give audio ({', '.join(sorted(AUDIO_EXTENSIONS))}) or video "
                             f"({', '.join(sorted(VIDEO_EXTENSIONS))}) files, or a manifest")
    info = probe(path)
    wanted = set(modalities)
    audio = str(path) if info.has_audio and AUDIO in wanted else None
    video = str(path) if info.has_video and VIDEO in wanted and ext in VIDEO_EXTENSIONS else None
    if audio is None and video is None:
        raise DataError(path, "has no audio or video stream this model reads",
                        hint=f"the model reads {', '.join(sorted(wanted)) or 'nothing'} from media")
    return Sample(id=path.stem, text=text, audio_path=audio, video_path=video, source=str(path))


def samples_from_manifest(
    manifest: Path, label_names: Sequence[str], registry: Registry | None = None
) -> tuple[list[Sample], list[Failure]]:
    """Rows of a CSV/TSV/JSONL manifest via the ``manifest`` reader; bad rows become failures."""
    registry = registry or get_registry()
    cls = registry.cls("dataset", "manifest")
    options = {"path": str(Path(manifest).resolve()), "labels": list(label_names), "empty_text": "absent"}
    reader = cls(cls.make_config(options, where="--manifest"), data_dir=None)
    reader.on_bad_sample = "skip"
    samples = list(reader.samples())
    failures = [Failure(id=_where_id(where), path=where, error=reason) for where, reason in getattr(reader, "skipped", [])]
    return samples, failures


def _where_id(where: str) -> str:
    return Path(str(where).split(":")[0]).name


def _path_of(sample: Sample) -> str | None:
    return sample.video_path or sample.audio_path or sample.source


class Predictor:
    """A loaded checkpoint ready to classify clips; build one with `load`."""

    def __init__(self, loaded: LoadedModel, *, device: str | torch.device = "auto", batch_size: int = 8,
                 registry: Registry | None = None):
        self.loaded = loaded
        self.model = loaded.model.eval()
        self.label_names = list(loaded.label_names)
        self.modalities = sorted(loaded.model.modalities)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.normalizer = normalizer_of(loaded)
        self.spec = preprocess_spec(loaded.config.data)
        self.registry = registry
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
                    samples, failures = samples_from_manifest(path, self.label_names, self.registry)
                    out += failures + samples
                else:
                    out.append(self._media(path, text))
            except EmofuseError as exc:
                out.append(Failure(path.stem, str(path), exc.message))
        return out

    def _media(self, path: Path, text: str | None) -> Sample | Failure:
        try:
            return sample_from_media(path, text=text, modalities=self.modalities)
        except EmofuseError as exc:
            return Failure(path.stem, str(path), exc.message)

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

    @torch.no_grad()
    def predict_samples(self, samples: Sequence[Sample]) -> list[dict[str, Any]]:
        """One record per sample, in order; a clip that fails to decode becomes an error record."""
        from emofuse.core.data.pipeline import make_batch

        records: list[dict[str, Any]] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = list(samples[start:start + self.batch_size])
            batch, decoded, bad = self._decode(make_batch, chunk)
            by_position: dict[int, dict[str, Any]] = {id(s): Failure(s.id, _path_of(s), reason).to_dict() for s, reason in bad}
            if batch is not None:
                logits, _ = self.model(batch.to(self.device))
                probs = logits.float().softmax(dim=1).cpu()
                for row, sample in enumerate(decoded):
                    p = probs[row].tolist()
                    best = max(range(len(p)), key=p.__getitem__)
                    by_position[id(sample)] = {
                        "id": sample.id,
                        "path": _path_of(sample),
                        "label": self.label_names[best],
                        "probabilities": {name: round(float(v), 6) for name, v in zip(self.label_names, p)},
                        "modalities": sorted(m for m in self.modalities if bool(batch.present[m][row])),
                    }
                    reasons = batch.extra.get("absent_reasons", [{}] * len(decoded))[row]
                    if reasons:  # e.g. a video without a face: predicted from the other modalities
                        by_position[id(sample)]["absent"] = dict(reasons)
            records += [by_position[id(s)] for s in chunk]
        return records

    @torch.no_grad()
    def branch_contributions(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """(final logits ``[B, C]``, each branch's share of them ``[B, C]``, the branch outputs).

        A fusion that is a sum of per-branch terms reports them itself (`Fusion.contributions`:
        weight x logits for the late fusions); for any other fusion a branch's share is what the
        fused logits lose when that branch is marked absent. A single branch owns all of its logits.
        """
        from dataclasses import replace

        batch = batch.to(self.device)
        outputs = self.model.branch_outputs(batch)
        fusion = self.model.fusion
        if fusion is None:
            ((name, only),) = outputs.items()
            return only.logits.float(), {name: only.logits.float()}, outputs
        ordered = list(outputs.values())
        final = fusion(ordered).float()
        parts = fusion.contributions(ordered)
        if parts is None:
            parts = {}
            for i, name in enumerate(outputs):
                absent = torch.zeros_like(ordered[i].presence())
                without = [replace(o, present=absent) if j == i else o for j, o in enumerate(ordered)]
                parts[name] = final - fusion(without).float()
        return final, {k: v.detach().float() for k, v in parts.items()}, outputs

    def decode_for_explanation(self, samples: Sequence[Sample]):
        """(batch or None, the samples in it, [(sample, reason)]), decoded as `predict` decodes them."""
        from emofuse.core.data.pipeline import make_batch

        return self._decode(make_batch, list(samples))

    def _decode(self, make_batch, chunk: list[Sample]):
        """(batch or None, the samples in it, [(sample, reason)]): bad clips are left out and named."""
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
                return batch, decoded, bad
        good, bad = [], []
        for sample in chunk:  # clip by clip: duplicate ids, or every clip of the chunk failed
            try:
                make_batch([sample], self.modalities, self.normalizer, on_bad_sample="error", spec=self.spec)
                good.append(sample)
            except EmofuseError as exc:
                bad.append((sample, exc.message))
        if not good:
            return None, [], bad
        return make_batch(good, self.modalities, self.normalizer, on_bad_sample="error", spec=self.spec), good, bad

    @staticmethod
    def _reason(sample: Sample, reasons: Mapping[str, str]) -> str:
        for path in (sample.video_path, sample.audio_path):
            if path and str(path) in reasons:
                reason = reasons[str(path)]
                return reason if str(path) in reason else f"{path}: {reason}"
        return f"{_path_of(sample)}: could not be decoded"


def load(checkpoint: str | Path, *, device: str | torch.device = "auto", batch_size: int = 8,
         registry: Registry | None = None) -> Predictor:
    """Load a checkpoint for prediction: ``emofuse.load("runs/x/model.safetensors").predict(["a.wav"])``."""
    return Predictor(load_model(Path(checkpoint), registry=registry), device=device, batch_size=batch_size,
                     registry=registry)


def predict_cli(
    checkpoint: Path,
    *,
    inputs: Sequence[Path] = (),
    manifest: Path | None = None,
    text: str | None = None,
    out: Path | None = None,
    explain_dir: Path | None = None,
) -> int:
    """`emofuse predict`: JSON lines to `out` (or stdout); returns how many clips failed.

    With `explain_dir`, each predicted clip also gets ``<id>.png`` there (see `explain`), named in
    its record's ``explanation`` field.

    The CLI exits 1 when any clip failed, so scripts notice, while every readable clip is still
    predicted and written.
    """
    items: list[Path] = list(inputs)
    if manifest is not None:
        items.append(Path(manifest))
    if not items:
        raise ConfigError("nothing to predict", hint="pass media files, a folder, or --manifest FILE")
    predictor = load(checkpoint)
    entries = predictor.to_samples(items, text=text)
    records = predictor.records(entries)
    if explain_dir is not None:
        from emofuse.core.apps.explain import write_explanations

        written = write_explanations(predictor, [e for e in entries if isinstance(e, Sample)], explain_dir)
        for record in records:
            if record["id"] in written and "error" not in record:
                record["explanation"] = str(written[record["id"]])
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
        sys.stdout.flush()
    failures = sum(1 for r in records if "error" in r)
    if failures:
        print(f"{failures} of {len(records)} clips could not be predicted (see their \"error\" field)", file=sys.stderr)
    return failures


__all__ = ["Failure", "Predictor", "load", "predict_cli", "sample_from_media", "samples_from_manifest"]
