"""Attention fusion: weighs the branches per sample instead of once for the whole data set.

A small gate reads every branch's log-probabilities (absent branches zeroed) and presence flags and
outputs one score per branch; a softmax over the branches present for that sample turns the scores
into weights, so a clip with a confident audio branch and an unsure video branch can lean on audio
while another clip leans the other way. The gate's last layer starts at zero: training starts from
the plain average of the present branches. One bias per class is added, as in enhanced late fusion.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from emofuse.core import BranchInfo, ComponentConfig, EncoderOutput, Fusion, hookimpl


class AttentionFusionConfig(ComponentConfig):
    hidden: int = Field(32, ge=1, le=4096)
    dropout: float = Field(0.0, ge=0, lt=1)
    class_bias: bool = True


class AttentionFusion(Fusion):
    """Attention fusion: a gate over the branches' predictions gives per-sample branch weights."""

    name = "attention"
    Config = AttentionFusionConfig

    def __init__(self, config: AttentionFusionConfig, num_classes: int, branches: Sequence[BranchInfo]):
        super().__init__(config, num_classes, branches)
        n = len(self.branches)
        self.gate = nn.Sequential(
            nn.Linear(n * num_classes + n, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, n),
        )
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.zeros_(self.gate[-1].bias)
        self.class_bias = nn.Parameter(torch.zeros(num_classes)) if config.class_bias else None
        # Mean weight per branch over the samples scored since the last training step (for report()).
        self.register_buffer("_weight_sum", torch.zeros(n), persistent=False)
        self.register_buffer("_weight_count", torch.zeros(()), persistent=False)

    def branch_weights(self, outputs: Mapping[str, EncoderOutput]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, N] weights summing to 1 over present branches, [B, N, C] masked logits)``."""
        logits, present = self.stacked(outputs)
        log_probs = torch.where(present.unsqueeze(-1), F.log_softmax(logits.float(), dim=-1), 0.0)
        gate_in = torch.cat([log_probs.flatten(1), present.float()], dim=1).to(logits.dtype)
        scores = self.gate(gate_in).float().masked_fill(~present, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        weights = torch.where(present, weights, 0.0)  # a sample with no branch: all weights 0, not NaN
        return weights, logits

    def forward(self, outputs: Mapping[str, EncoderOutput]) -> torch.Tensor:
        weights, logits = self.branch_weights(outputs)
        if self.training:
            self._weight_sum.zero_()
            self._weight_count.zero_()
        else:
            self._weight_sum += weights.detach().sum(0).to(self._weight_sum)
            self._weight_count += weights.shape[0]
        out = (weights.to(logits.dtype).unsqueeze(-1) * logits).sum(dim=1)
        if self.class_bias is not None:
            out = out + self.class_bias.to(out.dtype)
        return out

    def report(self) -> dict[str, Any]:
        rep: dict[str, Any] = {"parameters": sum(p.numel() for p in self.parameters())}
        count = float(self._weight_count)
        if count > 0:
            mean = (self._weight_sum / count).cpu()
            rep["mean_weights"] = {b.name: float(v) for b, v in zip(self.branches, mean)}
            rep["samples"] = int(count)
        if self.class_bias is not None:
            rep["class_bias"] = [float(v) for v in self.class_bias.detach().cpu()]
        return rep


@hookimpl
def register_fusions():
    return [AttentionFusion]
