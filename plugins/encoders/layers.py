"""Small building blocks the branch encoders share: freezing backbones, batch norm that tolerates
a batch of one and padded sequences, and the speaker-metadata embedding."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from emofuse.core import METADATA_DIM, Batch


def freeze(module: nn.Module | None) -> None:
    """Stop gradients into `module` and keep it in eval mode (batch-norm statistics and dropout fixed)."""
    if module is None:
        return
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def keep_frozen_in_eval(modules: Iterable[nn.Module | None]) -> None:
    """After ``Module.train()``: put frozen backbones back in eval mode."""
    for m in modules:
        if m is not None:
            m.eval()


class BatchNorm1d(nn.BatchNorm1d):
    """Batch norm that uses its running statistics for a training batch of one sample
    (plain batch norm raises there; a last partial batch of one is common)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def masked_norm(norm: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A row-wise norm (batch norm, `RunningStandardizer`) over the real positions of a padded
    ``[B, C, L]`` sequence; padding stays zero and does not enter the statistics."""
    rows = x.transpose(1, 2)[mask]  # [N_valid, C]
    if rows.shape[0] == 0:
        return torch.zeros_like(x)
    out = torch.zeros_like(x.transpose(1, 2))
    out[mask] = norm(rows)
    return out.transpose(1, 2)


class MetadataEmbedding(nn.Module):
    """Speaker age and gender (`Batch.metadata_tensor`, 5 values) -> a small learned vector."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(METADATA_DIM, dim), nn.ReLU())

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net(batch.metadata_tensor().to(self.net[0].weight.dtype))


def classifier_head(in_dim: int, hidden: int, num_classes: int, dropout: float) -> tuple[nn.Sequential, nn.Linear]:
    """Linear -> batch norm -> ReLU -> dropout (the embedding), then a linear layer to the classes."""
    body = nn.Sequential(nn.Linear(in_dim, hidden), BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout))
    return body, nn.Linear(hidden, num_classes)


class RunningStandardizer(nn.Module):
    """Zero-mean, unit-variance scaling of ``[N, C]`` rows by statistics accumulated over all training
    rows seen so far (a cumulative average, not the current batch's).

    Batch norm over a few clips' frames rescales each batch by its own speakers' statistics; for
    utterance-level cues (loudness, pitch range) that jitter swamps the signal. These statistics
    settle within a few batches, are buffers (so checkpoints carry them) and are fixed in eval mode.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("var", torch.ones(num_features))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def _update(self, rows: torch.Tensor) -> None:
        n = float(rows.shape[0])
        batch_mean = rows.mean(dim=0)
        batch_var = rows.var(dim=0, unbiased=False)
        total = float(self.count) + n
        delta = batch_mean - self.mean
        self.var.copy_((self.var * float(self.count) + batch_var * n + delta.pow(2) * float(self.count) * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.fill_(total)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.training and rows.shape[0] > 0:
            self._update(rows.detach().to(self.mean.dtype))
        return (rows - self.mean) / torch.sqrt(self.var + self.eps)


class LayerMix(nn.Module):
    """A learned softmax-weighted sum of a pretrained encoder's layers (the SUPERB recipe): ``[..., L * D]``
    (layer-major, as `audio_backbone.stack_layers` makes it) -> ``[..., D]``. Starts as the plain mean."""

    def __init__(self, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        self.logits = nn.Parameter(torch.zeros(num_layers))

    @property
    def weights(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = x.unflatten(-1, (self.num_layers, -1))
        return (layers * self.weights.to(x.dtype)[:, None]).sum(dim=-2)
