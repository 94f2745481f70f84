"""Focal loss (Lin et al. 2017): cross-entropy scaled down on easy examples.

``loss_i = -alpha_{y_i} * (1 - p_t)^gamma * log(p_t)`` with ``p_t`` the predicted probability of the
true class. ``gamma = 0, alpha = 1`` is exactly cross-entropy. `alpha` is one number for every class,
one number per class, ``"balanced"`` (inverse class frequency from the training counts) or ``"sqrt-balanced"``.
``logit_adjustment = tau`` shifts the logits by ``tau * log(class prior)`` inside the loss, as cross-entropy's
does: the focal term then weighs easy and hard examples of a balanced classifier.

The batch loss is the plain mean over labelled samples (label >= 0); rows labelled -1 are ignored.
A plain mean, rather than a weight-normalised one, keeps a batch's loss the mean of its shards'
losses, which is what makes one process and several data-parallel ones agree.
"""
from __future__ import annotations

from typing import Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Field

from emofuse.core import ComponentConfig, Loss, class_weight_vector, hookimpl, log_prior_offsets


class FocalLossConfig(ComponentConfig):
    #: One weight for all classes, a list with one per class, "balanced" or "sqrt-balanced" (its root).
    alpha: Union[float, list[float], Literal["balanced", "sqrt-balanced"]] = 1.0
    gamma: float = Field(2.0, ge=0, le=20)
    #: tau of the logit adjustment (as in cross-entropy): 0 is none, 1 targets the balanced error.
    logit_adjustment: float = Field(0.0, ge=0, le=4)


def per_sample_focal(logits: torch.Tensor, labels: torch.Tensor, gamma: float,
                     alpha: torch.Tensor | None) -> torch.Tensor:
    """Focal loss of each row ``[N]`` (labels must be valid class indices)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    log_pt = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    pt = log_pt.exp()
    # (1 - p_t)^gamma with gamma = 0 must be exactly 1, also where p_t == 1.
    modulator = (1.0 - pt).clamp(min=0).pow(gamma) if gamma > 0 else torch.ones_like(pt)
    loss = -modulator * log_pt
    if alpha is not None:
        loss = loss * alpha.to(loss.device)[labels]
    return loss


class FocalLoss(Loss):
    """Focal loss -alpha*(1-p_t)^gamma*log(p_t), scalar or per-class alpha ("balanced" from class counts), and
    optional logit adjustment."""

    name = "focal"
    Config = FocalLossConfig

    def __init__(self, config: FocalLossConfig, num_classes: int, class_counts: torch.Tensor | None = None):
        super().__init__(config, num_classes, class_counts)
        self.gamma = float(config.gamma)
        alpha = class_weight_vector(config.alpha, num_classes, class_counts, where="loss.alpha")
        self.register_buffer("alpha", alpha, persistent=False)
        offsets = log_prior_offsets(config.logit_adjustment, num_classes, class_counts, where="loss.logit_adjustment")
        self.register_buffer("offsets", offsets, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, labels = self.labelled(logits, labels)
        if labels.numel() == 0:
            return logits.sum() * 0.0
        if self.offsets is not None:
            logits = logits.float() + self.offsets
        return per_sample_focal(logits, labels, self.gamma, self.alpha).mean()


@hookimpl
def register_losses():
    return [FocalLoss]
