"""Zero-shot video emotion: the FER-2013 classifier on tracked face crops, its classes mapped by name.

The model is MIMAMO started from the FER prior (``prior_labels``) with no training: its learned
classifier is zero, so its output is exactly the prior. `emofuse zero-shot` scores it on a corpus's
video clips, per clip (frame probabilities averaged) and per sampled frame, and can save it as a
checkpoint that `emofuse predict` reads like any other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from emofuse.core.config import DataConfig, RunConfig, validate
from emofuse.core.data.preprocess import preprocess_spec
from emofuse.core.data.readers import build_reader
from emofuse.core.engine.compose import ComposedModel, build_model
from emofuse.core.errors import ConfigError
from emofuse.core.registry import Registry
from emofuse.core.types import VIDEO, Sample

BRANCH = "video"


def zero_shot_config(label_names: Sequence[str], data: DataConfig | None = None) -> RunConfig:
    """A run config whose one branch is MIMAMO started from the FER prior over `label_names` (no text)."""
    raw: dict[str, Any] = {
        "name": "fer-zero-shot",
        "branches": {BRANCH: {"name": "mimamo", "prior_labels": list(label_names), "text_backbone": None}},
    }
    if data is not None:
        raw["data"] = data.model_dump(mode="json")
    return validate(raw)


def zero_shot_model(config: RunConfig, num_classes: int, registry: Registry | None = None) -> ComposedModel:
    torch.manual_seed(0)  # the untrained layers do not reach the output, but keep checkpoints identical
    return build_model(config, num_classes, registry=registry).eval()


@dataclass
class ZeroShotReport:
    """Accuracy per clip and per sampled frame; clips whose video had no face are counted apart."""

    label_names: list[str]
    clip_ids: list[str] = field(default_factory=list)
    clip_labels: list[int] = field(default_factory=list)
    clip_predictions: list[int] = field(default_factory=list)
    frame_labels: list[int] = field(default_factory=list)
    frame_predictions: list[int] = field(default_factory=list)
    without_face: list[str] = field(default_factory=list)

    @staticmethod
    def _accuracy(labels: list[int], predictions: list[int]) -> float:
        return sum(a == b for a, b in zip(labels, predictions)) / len(labels) if labels else float("nan")

    @property
    def clip_accuracy(self) -> float:
        return self._accuracy(self.clip_labels, self.clip_predictions)

    @property
    def frame_accuracy(self) -> float:
        return self._accuracy(self.frame_labels, self.frame_predictions)

    def to_dict(self) -> dict[str, Any]:
        names = self.label_names
        return {
            "clips": len(self.clip_ids), "clip_accuracy": self.clip_accuracy,
            "frames": len(self.frame_labels), "frame_accuracy": self.frame_accuracy,
            "without_face": list(self.without_face),
            "per_clip": [{"id": i, "label": names[y], "predicted": names[p]}
                         for i, y, p in zip(self.clip_ids, self.clip_labels, self.clip_predictions)],
        }


@torch.no_grad()
def evaluate_zero_shot(model: ComposedModel, samples: Sequence[Sample], label_names: Sequence[str],
                       config: RunConfig, *, batch_size: int = 8) -> ZeroShotReport:
    """Run the zero-shot model over labelled video clips (faces tracked as `config.data.video` says)."""
    from emofuse.core.apps.evaluation import batches_of

    clips = [s for s in samples if s.has(VIDEO) and s.label is not None and s.label >= 0]
    if not clips:
        raise ConfigError("no labelled clip with video to score", hint="pick a corpus with video (--dataset crema-d)")
    report = ZeroShotReport(list(label_names))
    for batch in batches_of(clips, [VIDEO], None, batch_size=batch_size, spec=preprocess_spec(config.data)):
        logits, outputs = model(batch)
        frames = outputs[BRANCH].extras["prior_frame_probabilities"]  # [B, T, C]
        for row, clip_id in enumerate(batch.ids):
            if not bool(batch.present[VIDEO][row]):
                report.without_face.append(clip_id)
                continue
            label = int(batch.labels[row])
            report.clip_ids.append(clip_id)
            report.clip_labels.append(label)
            report.clip_predictions.append(int(logits[row].argmax()))
            report.frame_labels += [label] * frames.shape[1]
            report.frame_predictions += frames[row].argmax(dim=-1).tolist()
    return report


def zero_shot(data: DataConfig, *, save: Path | None = None, registry: Registry | None = None) -> ZeroShotReport:
    """`emofuse zero-shot`: score the FER prior on every labelled video clip of `data`'s corpus; with
    `save`, also write it as a checkpoint for `emofuse predict`."""
    reader = build_reader(data, registry)
    if hasattr(reader, "on_bad_sample"):
        reader.on_bad_sample = data.on_bad_sample
    samples = list(reader.samples())
    label_names = list(reader.label_names)
    config = zero_shot_config(label_names, data)
    model = zero_shot_model(config, len(label_names), registry)
    report = evaluate_zero_shot(model, samples, label_names, config)
    if save is not None:
        from emofuse.core.engine.model_io import save_model

        save_model(Path(save), model, config, label_names)
    return report


__all__ = ["ZeroShotReport", "evaluate_zero_shot", "zero_shot", "zero_shot_config", "zero_shot_model"]
