"""The data that travels through emofuse: a `Sample` from a reader, a `Batch` for the models,
an `EncoderOutput` from a branch.

A missing modality is data, not a crash: every batch carries a per-modality presence mask, and
components decide what absence means for them (a zero contribution, a renormalised weight...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

VIDEO = "video"
AUDIO = "audio"
TEXT = "text"
METADATA = "metadata"
FEATURES = "features"
MODALITIES: tuple[str, ...] = (VIDEO, AUDIO, TEXT, METADATA, FEATURES)

#: Gender codes used in `Batch.gender`; 0 means unknown.
GENDER_CODES: Mapping[str, int] = {"unknown": 0, "male": 1, "female": 2}


def gender_code(value: str | None) -> int:
    """Map a free-form gender string (`"M"`, `"Female"`...) to `GENDER_CODES`; unknown -> 0."""
    if not value:
        return 0
    v = str(value).strip().lower()
    if v in ("m", "male", "man"):
        return GENDER_CODES["male"]
    if v in ("f", "female", "woman"):
        return GENDER_CODES["female"]
    return 0


@dataclass
class Sample:
    """One clip as a reader sees it: paths and metadata, nothing decoded yet.

    `features` holds precomputed per-clip vectors by name (e.g. ``{"au": array(35)}``).
    `extra` is for reader-specific fields (sentiment, intensity, dialogue times...).
    """

    id: str
    label: int | None = None
    label_name: str | None = None
    speaker: str | None = None
    age: float | None = None
    gender: str | None = None
    text: str | None = None
    audio_path: str | None = None
    video_path: str | None = None
    features: dict[str, np.ndarray] = field(default_factory=dict)
    dialogue_id: str | None = None
    utterance_index: int | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def has(self, modality: str) -> bool:
        """Whether this sample carries `modality` at all (before any decoding)."""
        if modality == VIDEO:
            return self.video_path is not None
        if modality == AUDIO:
            return self.audio_path is not None
        if modality == TEXT:
            return bool(self.text and self.text.strip())
        if modality == METADATA:
            return self.age is not None or gender_code(self.gender) != 0
        if modality == FEATURES:
            return bool(self.features)
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")


@dataclass
class Batch:
    """A collated batch of B samples; every tensor's first dimension is B.

    - `ids`: B sample ids; `labels`: long ``[B]`` (-1 where unlabelled)
    - `present`: modality -> bool ``[B]``, for every modality in `MODALITIES`
    - `video`: float ``[B, T, 3, H, W]``, normalised, zeros where absent; None when no encoder of
      the run asked for video, and None for an encoder whose frozen features come from the cache
      (the loader then skips decoding; the features arrive as `Encoder.forward`'s `extracted`)
    - `audio`: float ``[B, L]`` mono 16 kHz, right-padded, and `audio_lengths` ``[B]``; None as video
    - `text`: B strings (None where absent); encoders tokenise with their own tokenizer
    - `age`: float ``[B]`` (standardised, NaN unknown); `gender`: long ``[B]`` (`GENDER_CODES`)
    - `speakers`: B speaker ids (None unknown)
    - `features`: name -> float ``[B, D]`` (standardised, zeros where absent) and
      `feature_present`: name -> bool ``[B]``, which rows of that set are real
    - `dialogue_ids`, `utterance_indices`: B entries each (None outside a dialogue): batches of an
      encoder with `Encoder.batches_by_dialogue` hold whole dialogues
    - `extra`: the data pipeline's own bookkeeping (cache keys, clips that failed to decode); not a
      contract for components
    """

    ids: list[str]
    labels: torch.Tensor
    present: dict[str, torch.Tensor]
    video: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    audio_lengths: torch.Tensor | None = None
    text: list[str] | None = None
    age: torch.Tensor | None = None
    gender: torch.Tensor | None = None
    speakers: list[str | None] = field(default_factory=list)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    feature_present: dict[str, torch.Tensor] = field(default_factory=dict)
    dialogue_ids: list[str | None] = field(default_factory=list)
    utterance_indices: list[int | None] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> "Batch":
        """Move every tensor to `device` (non-tensors are kept as they are)."""

        def move(x: Any) -> Any:
            if isinstance(x, torch.Tensor):
                return x.to(device, non_blocking=True)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return Batch(**{k: move(v) for k, v in self.__dict__.items()})

    def presence(self, modality: str) -> torch.Tensor:
        """``[B]`` bool on the labels' device: where `modality` is present (all False when not carried)."""
        mask = self.present.get(modality)
        if mask is None:
            return torch.zeros(len(self), dtype=torch.bool, device=self.labels.device)
        return mask.to(self.labels.device).bool()

    def metadata_tensor(self) -> torch.Tensor:
        """Speaker metadata as a float ``[B, 5]`` tensor: age (standardised by the data normaliser),
        age known, male, female, gender known.

        A shared encoding so every encoder that takes metadata reads it the same way.
        """
        b = len(self)
        device = self.labels.device
        age = self.age if self.age is not None else torch.full((b,), float("nan"), device=device)
        gender = self.gender if self.gender is not None else torch.zeros(b, dtype=torch.long, device=device)
        known = ~torch.isnan(age)
        return torch.stack(
            [
                torch.where(known, age, torch.zeros_like(age)),
                known.float(),
                (gender == GENDER_CODES["male"]).float(),
                (gender == GENDER_CODES["female"]).float(),
                (gender != 0).float(),
            ],
            dim=1,
        )


#: Width of `Batch.metadata_tensor()`.
METADATA_DIM = 5


@dataclass
class EncoderOutput:
    """What a branch returns: class logits ``[B, C]``, an embedding ``[B, D]`` where it has one,
    and which samples it could actually see (``[B]`` bool; False where its modalities were absent)."""

    logits: torch.Tensor
    embedding: torch.Tensor | None = None
    present: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def detached_cpu(self) -> "EncoderOutput":
        """A copy on the CPU, detached from the graph, floats as float32: for keeping outputs across batches."""
        return EncoderOutput(
            logits=self.logits.detach().float().cpu(),
            embedding=None if self.embedding is None else self.embedding.detach().float().cpu(),
            present=None if self.present is None else self.present.detach().cpu(),
            extras={k: v.detach().cpu() for k, v in self.extras.items()},
        )

    def presence(self) -> torch.Tensor:
        """The presence mask, all True when the encoder did not set one."""
        if self.present is None:
            return torch.ones(self.logits.shape[0], dtype=torch.bool, device=self.logits.device)
        return self.present


def pad_sequences(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad tensors of shape ``[L_i, ...]`` to ``[B, max L, ...]``; also return the lengths ``[B]``."""
    lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
    out = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True)
    return out, lengths


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """``[B]`` lengths -> ``[B, L]`` bool mask, True on real positions."""
    max_len = int(lengths.max().item()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
