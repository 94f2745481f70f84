"""Feature-level fusion: one classifier over the concatenated embeddings of every branch.

Late fusions only mix the branches' final votes; this fusion sees what each branch saw (its
embedding, or its logits when it has no embedding), so it can learn interactions between them.
Absent branches feed zeros plus a presence flag, so the classifier knows the difference between a
missing modality and a neutral one.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from pydantic import Field
from torch import nn

from emofuse.core import BranchInfo, ComponentConfig, EncoderOutput, Fusion, hookimpl


class FeatureLevelConfig(ComponentConfig):
    hidden: int = Field(128, ge=1, le=8192)
    dropout: float = Field(0.2, ge=0, lt=1)


class FeatureLevelFusion(Fusion):
    """Feature-level fusion: an MLP over the branches' concatenated embeddings and presence flags."""

    name = "feature-level"
    Config = FeatureLevelConfig
    uses_embeddings = True

    def __init__(self, config: FeatureLevelConfig, num_classes: int, branches: Sequence[BranchInfo]):
        super().__init__(config, num_classes, branches)
        #: Per branch: True when its embedding is read, False when its logits stand in for it.
        self.reads_embedding = [b.embedding_dim > 0 for b in self.branches]
        self.input_dims = [b.embedding_dim if b.embedding_dim > 0 else num_classes for b in self.branches]
        width = sum(self.input_dims) + len(self.branches)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Sequential(
            nn.Linear(width, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, num_classes),
        )

    def branch_input(self, index: int, output: EncoderOutput) -> torch.Tensor:
        x = output.embedding if self.reads_embedding[index] else output.logits
        if x is None:
            raise ValueError(f"branch {self.branches[index].name!r} declared an embedding of width "
                             f"{self.input_dims[index]} but returned none")
        if x.shape[-1] != self.input_dims[index]:
            raise ValueError(f"branch {self.branches[index].name!r}: expected width {self.input_dims[index]}, got {x.shape[-1]}")
        return x

    def forward(self, outputs: Mapping[str, EncoderOutput]) -> torch.Tensor:
        parts, flags = [], []
        for i, out in enumerate(self.ordered(outputs)):
            present = out.presence()
            x = self.branch_input(i, out)
            parts.append(torch.where(present.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device)))
            flags.append(present.to(x.dtype))
        dtype = parts[0].dtype
        features = torch.cat([p.to(dtype) for p in parts] + [torch.stack(flags, 1).to(dtype)], dim=1)
        return self.classifier(self.norm(features))

    def report(self) -> dict[str, Any]:
        """Each branch's share of the first layer's weight magnitude: a rough reliance measure."""
        first = self.classifier[0].weight.detach().abs().float().cpu()  # [hidden, width]
        shares, start = {}, 0
        for b, dim in zip(self.branches, self.input_dims):
            shares[b.name] = float(first[:, start:start + dim].sum())
            start += dim
        total = sum(shares.values()) or 1.0
        return {
            "inputs": {b.name: ("embedding" if e else "logits") + f"[{d}]"
                       for b, e, d in zip(self.branches, self.reads_embedding, self.input_dims)},
            "weight_share": {k: v / total for k, v in shares.items()},
            "parameters": sum(p.numel() for p in self.parameters()),
        }


@hookimpl
def register_fusions():
    return [FeatureLevelFusion]
