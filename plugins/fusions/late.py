"""Late fusion over frozen branches: a learnable weight per branch, plus (enhanced) a bias per class.

``weighted-late``: ``out = sum_i w_i * logits_i`` (one trainable weight per branch).
``enhanced-late``: the same plus one trainable bias per class (2 branches, 7 classes: 9 parameters).

A branch absent for a sample (``EncoderOutput.present`` False) contributes nothing, and the weights
of the branches that are present are rescaled to the same total, so a clip without video is scored
by the audio branch at full strength rather than at its share of the weight. With every branch
present the rescaling is exactly 1 and its gradient exactly 0, i.e. the reference formula.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from pydantic import Field, field_validator
from torch import nn

from emofuse.core import BranchInfo, ComponentConfig, ConfigError, EncoderOutput, Fusion, hookimpl

_EPS = 1e-8


def weight_shares(weights: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """Each weight as a share of the total magnitude (sign kept), for reports."""
    w = weights.detach().float().cpu()
    total = float(w.abs().sum())
    return {n: (float(v) / total if total > 0 else 0.0) for n, v in zip(names, w)}


class WeightedLateConfig(ComponentConfig):
    #: Initial weight per branch (in branch order); None starts every branch at 1/N.
    init_weights: Optional[list[float]] = None

    @field_validator("init_weights")
    @classmethod
    def _finite(cls, v: Optional[list[float]]) -> Optional[list[float]]:
        if v is not None and any(x != x or abs(x) == float("inf") for x in v):
            raise ValueError("initial weights must be finite numbers")
        return v


class WeightedLateFusion(Fusion):
    """Weighted late fusion: out = sum_i w_i * logits_i, one learnable weight per frozen branch."""

    name = "weighted-late"
    Config = WeightedLateConfig

    def __init__(self, config: WeightedLateConfig, num_classes: int, branches: Sequence[BranchInfo]):
        super().__init__(config, num_classes, branches)
        n = len(self.branches)
        init = config.init_weights if config.init_weights is not None else [1.0 / n] * n
        if len(init) != n:
            raise ConfigError(f"fusion.init_weights: {len(init)} values for {n} branches "
                              f"({', '.join(b.name for b in self.branches)})")
        self.weights = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    def weighted_terms(self, outputs: Mapping[str, EncoderOutput]) -> torch.Tensor:
        """``[B, N, C]``: each branch's weighted logits, present branches' weights rescaled to the full total."""
        logits, present = self.stacked(outputs)
        w = self.weights.to(logits.dtype)
        masked = present.to(logits.dtype) * w  # [B, N]
        present_total = masked.sum(dim=1, keepdim=True)
        # Rescale the present branches' weights to the full total; a sample with no branch gets 0.
        safe = present_total.abs() > _EPS
        scale = torch.where(safe, w.sum() / torch.where(safe, present_total, torch.ones_like(present_total)),
                            torch.zeros_like(present_total))
        return masked.unsqueeze(-1) * logits * scale.unsqueeze(-1)

    def combine(self, outputs: Mapping[str, EncoderOutput]) -> torch.Tensor:
        return self.weighted_terms(outputs).sum(dim=1)

    def contributions(self, outputs: Mapping[str, EncoderOutput]) -> dict[str, torch.Tensor]:
        terms = self.weighted_terms(outputs)
        return {b.name: terms[:, i] for i, b in enumerate(self.branches)}

    def forward(self, outputs: Mapping[str, EncoderOutput]) -> torch.Tensor:
        return self.combine(outputs)

    def report(self) -> dict[str, Any]:
        names = [b.name for b in self.branches]
        return {
            "weights": weight_shares(self.weights, names),
            "raw_weights": {n: float(v) for n, v in zip(names, self.weights.detach().cpu())},
        }


class EnhancedLateConfig(WeightedLateConfig):
    #: Initial value of every class bias.
    init_bias: float = Field(0.0, ge=-100, le=100)


class EnhancedLateFusion(WeightedLateFusion):
    """Enhanced late fusion: weighted late fusion plus one learnable bias per class."""

    name = "enhanced-late"
    Config = EnhancedLateConfig

    def __init__(self, config: EnhancedLateConfig, num_classes: int, branches: Sequence[BranchInfo]):
        super().__init__(config, num_classes, branches)
        self.class_bias = nn.Parameter(torch.full((num_classes,), float(config.init_bias)))

    def forward(self, outputs: Mapping[str, EncoderOutput]) -> torch.Tensor:
        out = self.combine(outputs)
        return out + self.class_bias.to(out.dtype)

    def contributions(self, outputs: Mapping[str, EncoderOutput]) -> dict[str, torch.Tensor]:
        parts = super().contributions(outputs)
        first = next(iter(parts.values()))
        parts["class bias"] = self.class_bias.to(first.dtype).expand_as(first)
        return parts

    def report(self) -> dict[str, Any]:
        rep = super().report()
        # Indexed by class; the trainer names the classes (see emofuse.core.engine.fusion_stage.name_report).
        rep["class_bias"] = [float(v) for v in self.class_bias.detach().cpu()]
        return rep


@hookimpl
def register_fusions():
    return [WeightedLateFusion, EnhancedLateFusion]
