"""Multimodal LSTM branch: speech audio + transcript text (+ speaker metadata) -> emotion.

A frozen text encoder (BERT family; the packaged MiniLM by default) gives token vectors, a frozen
audio encoder (Wav2Vec2 family, or a log-mel / eGeMAPS front end) gives frame vectors. Audio frames
pass a learned strided convolutional front end (to about 25 frames/s), then attend to the text
tokens with 8-head attention (audio queries, text keys and values, plus a learned "no text" slot
so a clip without a transcript still has something to attend to); a bidirectional LSTM reads the
text-aware audio sequence; its mean and max over time, the mean and standard deviation of the
normalised audio features themselves (statistics pooling: an utterance-level path that learns fast
from few clips), the text's mean vector and the speaker metadata feed a batch-normalised head with
dropout.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from emofuse.core.component import ComponentConfig
from emofuse.core.hookspecs import hookimpl
from emofuse.core.interfaces import Encoder
from emofuse.core.types import AUDIO, METADATA, TEXT, Batch, EncoderOutput, lengths_to_mask
from emofuse.plugins.encoders.audio_backbone import DEFAULT_AUDIO_BACKBONE, make_audio_backbone
from emofuse.plugins.encoders.layers import (
    BatchNorm1d,
    MetadataEmbedding,
    RunningStandardizer,
    classifier_head,
    freeze,
    keep_frozen_in_eval,
    masked_norm,
    presence,
)
from emofuse.plugins.encoders.text_backbone import DEFAULT_TEXT_BACKBONE, TextBackbone, masked_mean

#: Frame rate the audio front end brings every backbone down to, roughly.
TARGET_FRAME_RATE = 25.0


class MMLSTMConfig(ComponentConfig):
    #: BERT-family text encoder: "minilm" (packaged, offline), a local folder, or a hub id (bert-base-uncased).
    text_backbone: str = DEFAULT_TEXT_BACKBONE
    #: "log-mel" (default), "egemaps" (needs emofuse[egemaps]), or a Wav2Vec2-family hub id / local folder
    #: (facebook/wav2vec2-base).
    audio_backbone: str = DEFAULT_AUDIO_BACKBONE
    #: Keep the pretrained encoders fixed (their outputs are then cached once per clip).
    freeze_backbone: bool = True
    max_text_tokens: int = Field(64, ge=4, le=512)
    model_dim: int = Field(128, ge=8, le=4096)
    attention_heads: int = Field(8, ge=1, le=64)
    lstm_hidden: int = Field(128, ge=4, le=4096)
    lstm_layers: int = Field(1, ge=1, le=4)
    metadata_dim: int = Field(16, ge=1, le=512)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "MMLSTMConfig":
        if self.model_dim % self.attention_heads:
            raise ValueError(f"model_dim ({self.model_dim}) must be divisible by attention_heads ({self.attention_heads})")
        return self


class ConvFrontEnd(nn.Module):
    """Input standardisation over real frames, then stride-2 conv blocks (conv, batch norm, ReLU) that
    bring the frame rate down to about `TARGET_FRAME_RATE`; padded frames stay zero throughout."""

    def __init__(self, in_dim: int, out_dim: int, frame_rate: float, dropout: float):
        super().__init__()
        self.input_norm = RunningStandardizer(in_dim)
        n_down = max(0, round(math.log2(max(frame_rate / TARGET_FRAME_RATE, 1.0))))
        convs, norms = [], []
        dim = in_dim
        for _ in range(max(n_down, 1)):
            stride = 2 if n_down else 1
            convs.append(nn.Conv1d(dim, out_dim, kernel_size=5, stride=stride, padding=2))
            norms.append(BatchNorm1d(out_dim))
            dim = out_dim
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)
        self.dropout = nn.Dropout(dropout)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (sequence ``[B, F', out_dim]``, its lengths, utterance statistics ``[B, 2 * in_dim]``)."""
        x = frames.transpose(1, 2)  # [B, D, F]
        mask = lengths_to_mask(lengths, x.shape[-1])
        x = masked_norm(self.input_norm, x, mask)
        stats = utterance_statistics(x, mask)
        for conv, norm in zip(self.convs, self.norms):
            x = conv(x)
            if conv.stride[0] == 2:
                lengths = torch.div(lengths + 1, 2, rounding_mode="floor")
            x = torch.relu(masked_norm(norm, x, lengths_to_mask(lengths, x.shape[-1])))
        return self.dropout(x.transpose(1, 2)), lengths, stats


def utterance_statistics(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean and standard deviation over the real frames of ``[B, D, F]``: ``[B, 2D]`` (statistics pooling)."""
    m = mask[:, None, :].to(x.dtype)
    count = m.sum(dim=-1).clamp_min(1.0)
    mean = (x * m).sum(dim=-1) / count
    var = (((x - mean[..., None]) ** 2) * m).sum(dim=-1) / count
    return torch.cat([mean, torch.sqrt(var + 1e-6)], dim=-1)


class MultimodalLSTMEncoder(Encoder):
    """Multimodal LSTM: text + audio encoders, 8-head audio-to-text attention, BiLSTM, speaker metadata."""

    name: ClassVar[str] = "mm-lstm"
    modalities: ClassVar[tuple[str, ...]] = (AUDIO, TEXT, METADATA)
    Config: ClassVar[type[ComponentConfig]] = MMLSTMConfig
    pretrained_modules: ClassVar[tuple[str, ...]] = ("text_backbone", "audio_backbone")

    def __init__(self, config: MMLSTMConfig, num_classes: int):
        super().__init__(config, num_classes)
        c = config
        self.text_backbone = TextBackbone(c.text_backbone, max_length=c.max_text_tokens)
        self.audio_backbone = make_audio_backbone(c.audio_backbone)
        if c.freeze_backbone:
            freeze(self.text_backbone)
            freeze(self.audio_backbone)
        d = c.model_dim
        self.audio_front = ConvFrontEnd(self.audio_backbone.dim, d, self.audio_backbone.frame_rate, c.dropout)
        self.text_proj = nn.Sequential(nn.Linear(self.text_backbone.dim, d), nn.LayerNorm(d))
        self.no_text = nn.Parameter(torch.zeros(1, 1, d))
        self.cross_attention = nn.MultiheadAttention(d, c.attention_heads, dropout=c.dropout, batch_first=True)
        self.attention_norm = nn.LayerNorm(d)
        self.lstm = nn.LSTM(d, c.lstm_hidden, num_layers=c.lstm_layers, batch_first=True, bidirectional=True,
                            dropout=c.dropout if c.lstm_layers > 1 else 0.0)
        self.metadata = MetadataEmbedding(c.metadata_dim)
        fused = 2 * self.audio_backbone.dim + 4 * c.lstm_hidden + d + c.metadata_dim
        self.head, self.classifier = classifier_head(fused, d, num_classes, c.dropout)
        self.embedding_dim = d
        #: Audio-to-text attention weights ``[B, F', 1 + T]`` of the latest forward (slot 0 = no text).
        self.last_attention: torch.Tensor | None = None

    @property
    def backbone_trainable(self) -> bool:
        return not self.config.freeze_backbone

    def train(self, mode: bool = True) -> "MultimodalLSTMEncoder":
        super().train(mode)
        if self.config.freeze_backbone:
            keep_frozen_in_eval([self.text_backbone, self.audio_backbone])
        return self

    # -- the frozen part ---------------------------------------------------------------------
    def extract(self, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """Per clip: ``text_tokens`` ``[T, D_text]`` and ``audio_frames`` ``[F, D_audio]``
        (one zero frame where the audio is absent)."""
        b = len(batch)
        texts = list(batch.text or [""] * b)
        tokens = self.text_backbone.token_embeddings(texts)
        has_audio = presence(batch, AUDIO)
        waves: list[torch.Tensor] = []
        for i in range(b):
            if batch.audio is None or not bool(has_audio[i]):
                waves.append(torch.zeros(0))
                continue
            n = int(batch.audio_lengths[i]) if batch.audio_lengths is not None else batch.audio.shape[1]
            waves.append(batch.audio[i, :n])
        real = [i for i, w in enumerate(waves) if w.numel() > 0]
        frames = dict(zip(real, self.audio_backbone([waves[i] for i in real]))) if real else {}
        device = batch.labels.device
        out = []
        for i in range(b):
            audio = frames.get(i)
            if audio is None:
                audio = torch.zeros(1, self.audio_backbone.dim, device=device)
            out.append({"text_tokens": tokens[i], "audio_frames": audio})
        return out

    # -- the trainable head ------------------------------------------------------------------
    def forward(self, batch: Batch, extracted: dict[str, torch.Tensor] | None = None) -> EncoderOutput:
        ex = self.extracted_for(batch, extracted)
        dtype = self.classifier.weight.dtype
        b = len(batch)
        device = self.classifier.weight.device
        audio = ex["audio_frames"].to(dtype)
        audio_len = ex.get("audio_frames_lengths", torch.full((b,), audio.shape[1], dtype=torch.long)).to(device)
        text = ex["text_tokens"].to(dtype)
        text_len = ex.get("text_tokens_lengths", torch.full((b,), text.shape[1], dtype=torch.long)).to(device)
        has_audio, has_text = presence(batch, AUDIO), presence(batch, TEXT)

        a, a_len, audio_stats = self.audio_front(audio, audio_len)
        a_len = a_len.clamp_min(1)
        t = self.text_proj(text)
        text_mask = lengths_to_mask(text_len, t.shape[1]) & has_text[:, None]
        keys = torch.cat([self.no_text.expand(b, -1, -1), t], dim=1)
        ignore = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=device), ~text_mask], dim=1)
        attended, weights = self.cross_attention(a, keys, keys, key_padding_mask=ignore, need_weights=True)
        self.last_attention = weights.detach()
        a = self.attention_norm(a + attended)

        packed = pack_padded_sequence(a, a_len.cpu(), batch_first=True, enforce_sorted=False)
        seq, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=a.shape[1])
        valid = lengths_to_mask(a_len, seq.shape[1])
        mean = masked_mean(seq, a_len)
        peak = seq.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        audio_summary = torch.cat([audio_stats, mean, peak], dim=-1) * has_audio[:, None].to(dtype)
        text_summary = masked_mean(t, text_len) * has_text[:, None].to(dtype)

        embedding = self.head(torch.cat([audio_summary, text_summary, self.metadata(batch)], dim=-1))
        return EncoderOutput(logits=self.classifier(embedding), embedding=embedding, present=has_audio,
                             extras={"audio_text_attention": weights})


@hookimpl
def register_encoders() -> list[Any]:
    return [MultimodalLSTMEncoder]
