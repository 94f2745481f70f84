"""Prepared clips -> one normalised `Batch`; `select` takes a sub-batch (for cache misses) and `drop_modalities`
marks modalities absent (to score a model without them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from emofuse.core.data.keys import combine_keys
from emofuse.core.data.normalize import Normalizer
from emofuse.core.data.preprocess import BadSample, PreparedSample, PreprocessSpec
from emofuse.core.errors import ConfigError
from emofuse.core.types import AUDIO, FEATURES, METADATA, MODALITIES, TEXT, VIDEO, Batch


@dataclass
class Collator:
    """A picklable collate_fn: stacks prepared clips, adds presence masks and cache keys, normalises.

    Failed clips (`BadSample`) are not stacked; they travel in ``batch.extra["bad"]`` so the main
    process decides whether to raise or to count them, whatever worker decoded them.
    """

    modalities: frozenset[str]
    spec: PreprocessSpec
    feature_dims: Mapping[str, int]
    normalizer: Normalizer | None = None
    _mean: torch.Tensor = field(init=False, repr=False)
    _std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.modalities = frozenset(self.modalities)
        self._mean = torch.tensor(self.spec.frame_mean, dtype=torch.float32).view(1, 1, 3, 1, 1)
        self._std = torch.tensor(self.spec.frame_std, dtype=torch.float32).view(1, 1, 3, 1, 1)

    def __call__(self, items: Sequence[PreparedSample | BadSample]) -> Batch | list[BadSample]:
        good = [x for x in items if isinstance(x, PreparedSample)]
        bad = [x for x in items if isinstance(x, BadSample)]
        if not good:
            return bad  # nothing to stack; the loader records these and moves on
        batch = self.stack(good)
        batch.extra["bad"] = bad
        return self.normalizer.apply(batch) if self.normalizer is not None else batch

    def stack(self, items: Sequence[PreparedSample]) -> Batch:
        b = len(items)
        present = {m: torch.tensor([x.present[m] for x in items], dtype=torch.bool) for m in MODALITIES}
        features: dict[str, torch.Tensor] = {}
        feature_present: dict[str, torch.Tensor] = {}
        for name, dim in sorted(self.feature_dims.items()):
            out = torch.zeros(b, dim, dtype=torch.float32)
            mask = torch.zeros(b, dtype=torch.bool)
            for i, x in enumerate(items):
                vec = x.features.get(name)
                if vec is not None:
                    out[i] = torch.from_numpy(np.asarray(vec, dtype=np.float32).reshape(-1))
                    mask[i] = True
            features[name] = out
            feature_present[name] = mask
        if self.feature_dims:
            present[FEATURES] = torch.stack(list(feature_present.values())).all(dim=0)
        video = audio = audio_lengths = None
        if VIDEO in self.modalities:
            s, t = self.spec.frame_size, self.spec.num_frames
            raw = torch.zeros(b, t, s, s, 3, dtype=torch.uint8)
            for i, x in enumerate(items):
                if x.video is not None:
                    raw[i] = torch.from_numpy(x.video)
            video = (raw.permute(0, 1, 4, 2, 3).float().div_(255.0) - self._mean) / self._std
            absent = ~torch.tensor([x.video is not None for x in items], dtype=torch.bool)
            video[absent] = 0.0
            present[VIDEO] = ~absent
        if AUDIO in self.modalities:
            lengths = [0 if x.audio is None else int(x.audio.shape[0]) for x in items]
            audio = torch.zeros(b, max(1, max(lengths)), dtype=torch.float32)
            for i, x in enumerate(items):
                if x.audio is not None:
                    audio[i, : lengths[i]] = torch.from_numpy(x.audio)
            audio_lengths = torch.tensor(lengths, dtype=torch.long)
            present[AUDIO] = audio_lengths > 0
        mkeys = {m: [x.modality_keys[m] for x in items] for m in MODALITIES}
        return Batch(
            ids=[x.id for x in items],
            labels=torch.tensor([x.label for x in items], dtype=torch.long),
            present=present,
            video=video,
            audio=audio,
            audio_lengths=audio_lengths,
            text=[x.text for x in items],
            age=torch.tensor([x.age for x in items], dtype=torch.float32),
            gender=torch.tensor([x.gender for x in items], dtype=torch.long),
            speakers=[x.speaker for x in items],
            features=features,
            feature_present=feature_present,
            dialogue_ids=[x.dialogue_id for x in items],
            utterance_indices=[x.utterance_index for x in items],
            extra={
                "keys": [combine_keys({m: mkeys[m][i] for m in MODALITIES}) for i in range(b)],
                "modality_keys": mkeys,
                "sample_extra": [x.tags for x in items],
                "face_boxes": [x.face_boxes for x in items],
                "face_detected": [x.face_detected for x in items],
                "absent_reasons": [x.absent_reasons for x in items],
            },
        )


def select(batch: Batch, indices: Sequence[int]) -> Batch:
    """The sub-batch of rows `indices` (tensors indexed, per-sample lists and dicts of them too)."""
    idx = list(indices)
    n = len(batch)
    index = torch.tensor(idx, dtype=torch.long)

    def take(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
            return value.index_select(0, index.to(value.device))
        if isinstance(value, list) and len(value) == n:
            return [value[i] for i in idx]
        if isinstance(value, dict):
            return {k: take(v) for k, v in value.items()}
        return value

    fields = {k: take(v) for k, v in batch.__dict__.items() if k != "extra"}
    extra = {k: take(v) for k, v in batch.extra.items() if k != "bad"}
    extra["bad"] = []
    if batch.audio is not None and batch.audio_lengths is not None and idx:
        longest = max(1, int(fields["audio_lengths"].max()))
        fields["audio"] = fields["audio"][:, :longest]
    return Batch(**fields, extra=extra)


def drop_modalities(batch: Batch, modalities: Iterable[str]) -> Batch:
    """A copy of `batch` where each of `modalities` is absent: presence False and the data zeroed.

    This is how a model is tested without a modality: encoders and fusions see exactly what they
    would see for clips that never had it.
    """
    modalities = list(modalities)
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ConfigError(f"cannot remove unknown modality {unknown[0]!r}; expected one of {', '.join(MODALITIES)}")
    out = Batch(**{k: v for k, v in batch.__dict__.items()})
    out.present = dict(batch.present)
    n = len(batch)
    for m in modalities:
        out.present[m] = torch.zeros(n, dtype=torch.bool, device=batch.labels.device)
        if m == VIDEO and batch.video is not None:
            out.video = torch.zeros_like(batch.video)
        elif m == AUDIO and batch.audio is not None:
            out.audio = torch.zeros_like(batch.audio)
        elif m == TEXT and batch.text is not None:
            out.text = [""] * n
        elif m == FEATURES:
            out.features = {k: torch.zeros_like(v) for k, v in batch.features.items()}
            out.feature_present = {k: torch.zeros_like(v) for k, v in batch.feature_present.items()}
        elif m == METADATA:
            if batch.age is not None:
                out.age = torch.full_like(batch.age, float("nan"))
            if batch.gender is not None:
                out.gender = torch.zeros_like(batch.gender)
    return out
