"""Cross-entropy with optional label smoothing, class weights and logit adjustment.

Class weights are a list (one per class), ``"balanced"`` (inverse class frequency from the
training counts) or ``"sqrt-balanced"`` (its square root). ``logit_adjustment = tau`` adds
``tau * log(class prior)`` to the logits inside the loss only (see `emofuse.core.engine.class_balance`):
the model's own logits then favour rare classes as a balanced classifier would, without reweighting.
The batch loss is the plain mean over labelled rows (label >= 0), not PyTorch's weight-normalised
mean, so a batch's loss is the mean of its shards' losses (data-parallel runs then match a single
process).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field

from emofuse.core import ComponentConfig, Loss, class_weight_vector, hookimpl, log_prior_offsets


class CrossEntropyConfig(ComponentConfig):
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    #: None (unweighted), a list with one weight per class, "balanced" (N / (C n_c)) or "sqrt-balanced" (its root).
    class_weights: Optional[Union[list[float], Literal["balanced", "sqrt-balanced"]]] = None
    #: tau of the logit-adjusted loss: 0 is plain cross-entropy, 1 targets the balanced error.
    logit_adjustment: float = Field(0.0, ge=0, le=4)


class CrossEntropyLoss(Loss):
    """Cross-entropy, with optional label smoothing, class weights (a list, "balanced" or "sqrt-balanced")
    and logit adjustment."""

    name = "cross-entropy"
    Config = CrossEntropyConfig

    def __init__(self, config: CrossEntropyConfig, num_classes: int, class_counts: torch.Tensor | None = None):
        super().__init__(config, num_classes, class_counts)
        weights = class_weight_vector(config.class_weights, num_classes, class_counts, where="loss.class_weights")
        self.register_buffer("weights", weights, persistent=False)
        offsets = log_prior_offsets(config.logit_adjustment, num_classes, class_counts, where="loss.logit_adjustment")
        self.register_buffer("offsets", offsets, persistent=False)
        self.label_smoothing = float(config.label_smoothing)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, labels = self.labelled(logits, labels)
        if labels.numel() == 0:
            return logits.sum() * 0.0
        logits = logits.float()
        if self.offsets is not None:
            logits = logits + self.offsets
        per_sample = F.cross_entropy(
            logits, labels, weight=self.weights, label_smoothing=self.label_smoothing, reduction="none"
        )
        return per_sample.mean()


@hookimpl
def register_losses():
    return [CrossEntropyLoss]
