"""Components of the example plugin, registered through emofuse's hooks."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

# The public plugin API: everything a plugin needs, from one module.
from emofuse.core import AUDIO, Batch, ComponentConfig, Encoder, EncoderOutput, Fusion, hookimpl

SAMPLE_RATE = 16_000


class ProsodyConfig(ComponentConfig):
    frame_ms: float = Field(25.0, gt=1, le=200)
    hop_ms: float = Field(10.0, gt=1, le=200)
    hidden: int = Field(32, ge=4, le=1024)
    dropout: float = Field(0.2, ge=0, lt=1)


class ProsodyEncoder(Encoder):
    """Energy and zero-crossing contours of the waveform, pooled by a GRU (a tiny audio branch)."""

    name = "prosody"
    modalities = (AUDIO,)
    Config = ProsodyConfig

    def __init__(self, config: ProsodyConfig, num_classes: int):
        super().__init__(config, num_classes)
        self.frame = int(SAMPLE_RATE * config.frame_ms / 1000)
        self.hop = int(SAMPLE_RATE * config.hop_ms / 1000)
        self.gru = nn.GRU(4, config.hidden, batch_first=True)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden, num_classes)
        self.embedding_dim = config.hidden

    def contours(self, audio: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` waveform -> ``[B, T, 4]``: log energy, zero-crossing rate and their deltas."""
        if audio.shape[1] < self.frame:
            audio = F.pad(audio, (0, self.frame - audio.shape[1]))
        frames = audio.unfold(1, self.frame, self.hop)
        energy = torch.log(frames.pow(2).mean(-1) + 1e-6)
        zcr = (frames[..., 1:] * frames[..., :-1] < 0).float().mean(-1)
        feats = torch.stack([energy, zcr], -1)
        delta = torch.diff(feats, dim=1, prepend=feats[:, :1])
        return torch.cat([feats, delta], -1)

    def forward(self, batch: Batch, extracted=None) -> EncoderOutput:
        feats = self.contours(batch.audio)
        lengths = ((batch.audio_lengths - self.frame).clamp(min=0) // self.hop + 1).clamp(max=feats.shape[1])
        packed = nn.utils.rnn.pack_padded_sequence(feats, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        emb = self.dropout(h[-1])
        return EncoderOutput(self.head(emb), emb, present=batch.present[AUDIO])


class ProductOfExpertsConfig(ComponentConfig):
    init_temperature: float = Field(1.0, gt=0)


class ProductOfExpertsFusion(Fusion):
    """Sum of the branches' log-probabilities, one learnable temperature per branch."""

    name = "product-of-experts"
    Config = ProductOfExpertsConfig

    def __init__(self, config: ProductOfExpertsConfig, num_classes: int, branches: Sequence):
        super().__init__(config, num_classes, branches)
        self.log_temperature = nn.Parameter(torch.full((len(self.branches),), float(config.init_temperature)).log())

    def forward(self, outputs: Mapping[str, EncoderOutput]) -> torch.Tensor:
        temps = self.log_temperature.exp()
        total = 0
        for i, out in enumerate(self.ordered(outputs)):
            present = out.presence().unsqueeze(1)
            # torch.where, not `mask * ...`: an absent branch's logits may be NaN, and 0 * NaN is NaN
            total = total + torch.where(present, F.log_softmax(out.logits / temps[i], dim=1), 0.0)
        return total

    def report(self) -> dict:
        return {"temperature": {b.name: float(t) for b, t in zip(self.branches, self.log_temperature.exp())}}


@hookimpl
def register_encoders():
    return [ProsodyEncoder]


@hookimpl
def register_fusions():
    return [ProductOfExpertsFusion]
