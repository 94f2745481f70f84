"""Text classifier branch: a transcript -> emotion, through a pretrained text encoder and a head.

The text encoder (BERT family; the packaged MiniLM by default, ``text_backbone = "mpnet"`` for
all-mpnet-base-v2) gives token vectors; frozen, they are cached once per clip. A sequence model reads
the projected tokens (a bidirectional LSTM, or transformer layers), and an MLP head reads its mean and
max over the tokens beside the tokens' mean (and speaker metadata, with ``metadata = true``). With
``sequence_model = "none"`` the head reads the mean token vector alone; ``head = "linear"`` makes that one
linear layer over the backbone's own mean token vector: the plain sentence classifier of a fine-tuning
script. An unfrozen backbone (``freeze_backbone = false``) trains at ``backbone_lr_scale`` times the
head's learning rate. It can read each utterance as ``"Speaker: words"`` and with its neighbouring turns
as a second segment of the encoder's input (batches then hold whole dialogues).

A transcript corpus (the shared MELD) is its home; `mm-lstm` is the audio + text branch.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from emofuse.core import METADATA, TEXT, Batch, ComponentConfig, Encoder, EncoderOutput, hookimpl, lengths_to_mask
from emofuse.plugins.encoders.layers import MetadataEmbedding, classifier_head, freeze, keep_frozen_in_eval
from emofuse.plugins.encoders.sequence import SequenceEncoder, SequenceModel
from emofuse.plugins.encoders.text_backbone import DEFAULT_TEXT_BACKBONE, TextBackbone, masked_mean
from emofuse.plugins.encoders.turn_text import ReadsTranscripts

#: "mlp": projection, batch-normalised hidden layer and dropout; "linear": one linear layer over the text
#: backbone's mean token vector (with sequence_model "none" and no metadata).
HeadKind = Literal["mlp", "linear"]
#: The options that shape `extract`'s output (the head's options do not).
EXTRACT_OPTIONS = ("text_backbone", "max_text_tokens")


class TextClassifierConfig(ComponentConfig):
    #: BERT-family text encoder: "minilm" (packaged, offline), "mpnet", a local folder, or a hub id.
    text_backbone: str = DEFAULT_TEXT_BACKBONE
    #: Keep the text encoder fixed (its token vectors are then cached once per clip).
    freeze_backbone: bool = True
    #: Learning rate of an unfrozen backbone, as a fraction of the head's (`train.lr`).
    backbone_lr_scale: float = Field(0.05, gt=0.0, le=1.0)
    max_text_tokens: int = Field(64, ge=4, le=512)
    #: Turns before each utterance that the text encoder reads with it, as a second segment of its input
    #: (``"Speaker: words"``, nearest first). The branch then batches whole dialogues, and its features are
    #: not cached per clip.
    context_past_turns: int = Field(0, ge=0, le=64)
    #: Turns after each utterance read the same way (offline analysis of whole dialogues only).
    context_future_turns: int = Field(0, ge=0, le=64)
    #: Token budget of that context segment, on top of `max_text_tokens`.
    context_tokens: int = Field(96, ge=0, le=512)
    #: Read each utterance as ``"Speaker: words"`` where the batch names its speaker.
    name_speaker: bool = False
    model_dim: int = Field(128, ge=8, le=4096)
    #: What reads the projected tokens: a bidirectional LSTM, transformer layers, or "none" (the head reads
    #: the mean token vector alone).
    sequence_model: SequenceModel = "lstm"
    lstm_hidden: int = Field(128, ge=4, le=4096)
    lstm_layers: int = Field(1, ge=1, le=4)
    transformer_layers: int = Field(2, ge=1, le=12)
    #: Heads of the transformer layers.
    attention_heads: int = Field(8, ge=1, le=64)
    #: Read the speaker metadata (sex, age) too; transcript corpora (MELD) have none.
    metadata: bool = False
    metadata_dim: int = Field(16, ge=1, le=512)
    #: The classifier on top: "mlp", or "linear" (no projection, no hidden layer: nothing randomly
    #: initialised that a backbone's small learning rate would train slowly).
    head: HeadKind = "mlp"
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    #: Dropout on the head's input (the sequence summary, text and metadata vectors).
    input_dropout: float = Field(0.2, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _consistent(self) -> "TextClassifierConfig":
        if self.model_dim % self.attention_heads:
            raise ValueError(f"model_dim ({self.model_dim}) must be divisible by attention_heads ({self.attention_heads})")
        if self.head == "linear" and (self.sequence_model != "none" or self.metadata):
            raise ValueError('head "linear" reads the text backbone\'s mean token vector alone: it needs '
                             'sequence_model = "none" and metadata = false')
        return self


class TextClassifierEncoder(ReadsTranscripts, Encoder):
    """Text classifier: a pretrained text encoder (frozen or fine-tuned), a BiLSTM, transformer or no sequence
    model over its tokens, and an MLP or linear head."""

    name: ClassVar[str] = "text-classifier"
    modalities: ClassVar[tuple[str, ...]] = (TEXT, METADATA)
    Config: ClassVar[type[ComponentConfig]] = TextClassifierConfig
    pretrained_modules: ClassVar[tuple[str, ...]] = ("text_backbone",)
    extract_options: ClassVar[tuple[str, ...]] = EXTRACT_OPTIONS

    @classmethod
    def modalities_for(cls, config: TextClassifierConfig) -> tuple[str, ...]:  # type: ignore[override]
        """Text; metadata too when the branch reads it."""
        return (TEXT, METADATA) if config.metadata else (TEXT,)

    def __init__(self, config: TextClassifierConfig, num_classes: int):
        super().__init__(config, num_classes)
        c = config
        self.modalities = self.modalities_for(c)  # type: ignore[misc]
        self.text_backbone = TextBackbone(c.text_backbone, max_length=c.max_text_tokens)
        if c.freeze_backbone:
            freeze(self.text_backbone)
        d = c.model_dim
        linear_head = c.head == "linear"
        self.text_proj = nn.Identity() if linear_head else nn.Sequential(nn.Linear(self.text_backbone.dim, d),
                                                                         nn.LayerNorm(d))
        self.sequence = None if c.sequence_model == "none" else SequenceEncoder(
            c.sequence_model, d, lstm_hidden=c.lstm_hidden, lstm_layers=c.lstm_layers,
            transformer_layers=c.transformer_layers, heads=c.attention_heads, dropout=c.dropout)
        sequence_dim = self.sequence.out_dim if self.sequence is not None else 0
        self.metadata = MetadataEmbedding(c.metadata_dim) if c.metadata else None
        self.input_dropout = nn.Dropout(c.input_dropout)
        if linear_head:
            self.head, self.classifier = nn.Identity(), nn.Linear(self.text_backbone.dim, num_classes)
        else:
            fused = 2 * sequence_dim + d + (c.metadata_dim if c.metadata else 0)
            self.head, self.classifier = classifier_head(fused, d, num_classes, c.dropout)
        self.embedding_dim = self.text_backbone.dim if linear_head else d

    def train(self, mode: bool = True) -> "TextClassifierEncoder":
        super().train(mode)
        if self.config.freeze_backbone:
            keep_frozen_in_eval([self.text_backbone])
        return self

    # -- the frozen part ---------------------------------------------------------------------
    def extract(self, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """Per clip: ``text_tokens`` ``[T, D_text]``."""
        tokens = self.utterance_tokens(batch)
        return [{"text_tokens": t} for t in tokens]

    # -- the trainable head ------------------------------------------------------------------
    def forward(self, batch: Batch, extracted: dict[str, torch.Tensor] | None = None) -> EncoderOutput:
        ex = self.extracted_for(batch, extracted)
        dtype = self.classifier.weight.dtype
        device = self.classifier.weight.device
        text = ex["text_tokens"].to(dtype)
        lengths = ex.get("text_tokens_lengths", torch.full((len(batch),), text.shape[1], dtype=torch.long)).to(device)
        has_text = batch.presence(TEXT)
        tokens = self.text_proj(text)
        text_summary = masked_mean(tokens, lengths) * has_text[:, None].to(dtype)
        if self.sequence is None:
            sequence_summary = tokens.new_zeros(tokens.shape[0], 0)
        else:
            sequence_summary = self._pooled_sequence(tokens, lengths.clamp_min(1)) * has_text[:, None].to(dtype)
        parts = [sequence_summary, text_summary]
        if self.metadata is not None:
            parts.append(self.metadata(batch))
        embedding = self.head(self.input_dropout(torch.cat(parts, dim=-1)))
        return EncoderOutput(logits=self.classifier(embedding), embedding=embedding, present=has_text)

    def _pooled_sequence(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The sequence model over ``[B, L, d]``, then mean and max over the real positions: ``[B, 2 * out_dim]``."""
        seq = self.sequence(x, lengths)
        valid = lengths_to_mask(lengths, seq.shape[1])
        peak = seq.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        return torch.cat([masked_mean(seq, lengths), peak], dim=-1)


@hookimpl
def register_encoders() -> list[Any]:
    return [TextClassifierEncoder]
