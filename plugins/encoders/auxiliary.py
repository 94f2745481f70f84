"""An auxiliary classification task learned beside emotion (multi-task): MELD sentiment, RAVDESS
intensity, speaker sex.

A related label shapes the shared embedding (sentiment polarity separates joy from anger); the
encoder returns ``extras["aux_logits"]`` ``[B, K]`` and ``extras["aux_labels"]`` ``[B]`` (-1 where
unknown), and the trainer adds ``weight * cross-entropy`` to the loss and logs it on its own.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from emofuse.core import GENDER_CODES, Batch, ComponentConfig

#: The field read from `Batch.gender` rather than from the reader's extra fields.
GENDER_FIELD = "gender"


class AuxTaskConfig(ComponentConfig):
    #: The reader's `Sample.extra` field holding the auxiliary label ("sentiment" for MELD, "intensity"
    #: for RAVDESS), or "gender" for speaker sex.
    field: str = Field(min_length=1)
    #: The label values, in class order (compared case-insensitively); other values count as unknown.
    classes: list[str] = Field(min_length=2)
    #: Weight of the auxiliary cross-entropy in the training loss.
    weight: float = Field(0.5, ge=0.0, le=100.0)

    @field_validator("classes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        lowered = [c.strip().lower() for c in v]
        if len(set(lowered)) != len(lowered):
            raise ValueError(f"classes must be distinct, got {v}")
        return v


def auxiliary_labels(batch: Batch, task: AuxTaskConfig) -> torch.Tensor:
    """``[B]`` long class indices of `task.field` for every sample of `batch`; -1 where unknown."""
    index = {c.strip().lower(): i for i, c in enumerate(task.classes)}
    b = len(batch)
    if task.field == GENDER_FIELD and batch.gender is not None:
        names = {code: name for name, code in GENDER_CODES.items()}
        values: list[Any] = [names.get(int(g)) for g in batch.gender.tolist()]
    else:
        rows = batch.extra.get("sample_extra") or [{}] * b
        values = [row.get(task.field) for row in rows]
    labels = [index.get(str(v).strip().lower(), -1) if v is not None else -1 for v in values]
    return torch.tensor(labels, dtype=torch.long, device=batch.labels.device)


class AuxiliaryHead(nn.Module):
    """A linear classifier for the auxiliary task over the branch embedding."""

    def __init__(self, embedding_dim: int, task: AuxTaskConfig):
        super().__init__()
        self.task = task
        self.classifier = nn.Linear(embedding_dim, len(task.classes))

    def forward(self, embedding: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The extras an encoder returns: ``aux_logits`` and ``aux_labels``."""
        return {"aux_logits": self.classifier(embedding), "aux_labels": auxiliary_labels(batch, self.task)}
