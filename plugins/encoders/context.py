"""Dialogue context over any branch: an utterance's emotion depends on the turns before it and on who speaks.

`dialogue-context` wraps an inner encoder (``inner = {name = "mm-lstm", ...}``), takes its
per-utterance embeddings, arranges the batch's utterances as dialogues in turn order
(`emofuse.core.data.dialogue`), adds a speaker-change signal and a within-dialogue speaker
embedding, and runs an LSTM or transformer over the turns: causal by default (only past turns,
usable live), or bidirectional (offline analysis). Each utterance is classified from its own
embedding joined with its context vector. Train with whole dialogues per batch
(`DialogueBatchSampler`); a batch without dialogue ids is single-turn dialogues, so no context.

The inner encoder's frozen part is this encoder's frozen part (`extract` delegates), so its cached
features are shared by every context setting.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from emofuse.core import (
    MODALITIES,
    Batch,
    ComponentConfig,
    ComponentRef,
    ConfigError,
    DialogueLayout,
    Encoder,
    EncoderOutput,
    dialogue_layout,
    hookimpl,
)
from emofuse.plugins.encoders.auxiliary import AuxiliaryHead, AuxTaskConfig
from emofuse.plugins.encoders.layers import classifier_head

SequenceModel = Literal["lstm", "transformer"]
Direction = Literal["causal", "bidirectional", "none"]


class ContextConfig(ComponentConfig):
    #: The per-utterance encoder (any registered encoder with an embedding) and its options.
    inner: ComponentRef = Field(default_factory=lambda: ComponentRef(name="mm-lstm"))
    #: What runs over a dialogue's turns.
    sequence_model: SequenceModel = "lstm"
    #: causal: past turns only (live use); bidirectional: the whole dialogue (offline); none: no context.
    direction: Direction = "causal"
    hidden_dim: int = Field(128, ge=8, le=4096)
    layers: int = Field(1, ge=1, le=8)
    #: Attention heads of the transformer (must divide hidden_dim).
    heads: int = Field(4, ge=1, le=64)
    #: Speakers told apart within one dialogue; later ones share the last embedding.
    max_speakers: int = Field(8, ge=1, le=256)
    speaker_dim: int = Field(16, ge=1, le=512)
    #: Turn positions the transformer embeds; later turns share the last position.
    max_turns: int = Field(128, ge=1, le=4096)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    #: An auxiliary label learned beside emotion (e.g. ``{field = "sentiment", classes = [...]}``).
    aux_task: AuxTaskConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> "ContextConfig":
        if self.sequence_model == "transformer" and self.hidden_dim % self.heads:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be divisible by heads ({self.heads})")
        if self.sequence_model == "lstm" and self.direction == "bidirectional" and self.hidden_dim % 2:
            raise ValueError(f"a bidirectional LSTM splits hidden_dim ({self.hidden_dim}) in two: make it even")
        if self.inner.name == "dialogue-context":
            raise ValueError("inner cannot itself be dialogue-context")
        return self


class TurnSequenceModel(nn.Module):
    """LSTM or transformer over ``[D, T, H]`` turns with a padding mask; causal or bidirectional."""

    def __init__(self, kind: SequenceModel, dim: int, layers: int, heads: int, max_turns: int, dropout: float,
                 causal: bool):
        super().__init__()
        self.kind, self.causal = kind, causal
        if kind == "lstm":
            self.lstm = nn.LSTM(dim, dim if causal else dim // 2, num_layers=layers, batch_first=True,
                                bidirectional=not causal, dropout=dropout if layers > 1 else 0.0)
        else:
            self.position = nn.Embedding(max_turns, dim)
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                               batch_first=True, norm_first=True)
            self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)

    def forward(self, turns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lengths = mask.sum(dim=1)
        if self.kind == "lstm":
            packed = pack_padded_sequence(turns, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=turns.shape[1])
            return out
        t = turns.shape[1]
        positions = torch.arange(t, device=turns.device).clamp_max(self.position.num_embeddings - 1)
        x = turns + self.position(positions)[None]
        attn_mask = nn.Transformer.generate_square_subsequent_mask(t, device=turns.device, dtype=torch.bool) \
            if self.causal else None
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = torch.isinf(attn_mask)
        out = self.transformer(x, mask=attn_mask, src_key_padding_mask=~mask)
        return self.norm(out) * mask[..., None].to(out.dtype)


class DialogueContextEncoder(Encoder):
    """Dialogue context over any branch's utterance embeddings: speaker-aware causal/bidirectional LSTM or transformer."""

    name: ClassVar[str] = "dialogue-context"
    #: Declared for the registry; each instance reads what its inner encoder reads.
    modalities: ClassVar[tuple[str, ...]] = MODALITIES
    Config: ClassVar[type[ComponentConfig]] = ContextConfig

    @classmethod
    def modalities_for(cls, config: ContextConfig) -> tuple[str, ...]:  # type: ignore[override]
        """The inner encoder's modalities, primary first."""
        from emofuse.core import get_registry

        inner = get_registry().cls("encoder", config.inner.name)
        return inner.modalities_for(inner.make_config(config.inner.options, where="dialogue-context.inner"))

    def __init__(self, config: ContextConfig, num_classes: int):
        super().__init__(config, num_classes)
        from emofuse.core import build_encoder

        c = config
        self.inner = build_encoder(c.inner, num_classes, where="dialogue-context.inner")
        if not self.inner.embedding_dim:
            raise ConfigError(f"dialogue-context.inner: encoder {c.inner.name!r} returns no embedding to build context on",
                              hint="choose an inner encoder with an embedding (mm-lstm, features, mimamo...)")
        self.modalities = tuple(self.inner.modalities)  # type: ignore[misc]
        self.pretrained_modules = tuple(f"inner.{m}" for m in self.inner.pretrained_modules)  # type: ignore[misc]
        e, h = self.inner.embedding_dim, c.hidden_dim
        self.input = nn.Sequential(nn.Linear(e, h), nn.LayerNorm(h), nn.Dropout(c.dropout))
        if c.direction != "none":
            self.speaker_change = nn.Embedding(3, h)  # first turn / same speaker / new speaker
            self.speaker = nn.Embedding(c.max_speakers, h)
            self.turns = TurnSequenceModel(c.sequence_model, h, c.layers, c.heads, c.max_turns, c.dropout,
                                           causal=c.direction == "causal")
        joined = h if c.direction == "none" else 2 * h
        self.head, self.classifier = classifier_head(joined, h, num_classes, c.dropout)
        self.aux = AuxiliaryHead(h, c.aux_task) if c.aux_task is not None else None
        #: Weight of the auxiliary loss (the trainer reads it); 0 without an auxiliary task.
        self.aux_weight = c.aux_task.weight if c.aux_task is not None else 0.0
        self.embedding_dim = h
        #: The layout of the latest forward's batch, for inspection.
        self.last_layout: DialogueLayout | None = None

    # -- the frozen part is the inner encoder's ----------------------------------------------
    def extract(self, batch: Batch) -> list[dict[str, torch.Tensor]] | None:
        return self.inner.extract(batch)

    @property
    def cacheable(self) -> bool:
        return self.inner.cacheable

    @property
    def backbone_trainable(self) -> bool:
        return self.inner.backbone_trainable

    @property
    def backbone_lr_scale(self) -> float:
        """The inner encoder's learning-rate factor for its unfrozen backbone (1 when it has none)."""
        return float(self.inner.backbone_lr_scale)

    @property
    def batches_by_dialogue(self) -> bool:
        """Whether training needs whole dialogues per batch (the trainer then batches by dialogue): for the
        context over turns, or because the inner encoder reads neighbouring turns itself."""
        return self.config.direction != "none" or bool(self.inner.batches_by_dialogue)

    def fingerprint(self) -> str:
        """The inner encoder's: the cached features do not depend on the context options."""
        return self.inner.fingerprint()

    # -- context -------------------------------------------------------------------------------
    def forward(self, batch: Batch, extracted: dict[str, torch.Tensor] | None = None) -> EncoderOutput:
        inner = self.inner(batch, extracted)
        x = self.input(inner.embedding.to(self.classifier.weight.dtype))
        if self.config.direction == "none":
            joined = x
        else:
            layout = dialogue_layout(batch)
            self.last_layout = layout
            speaker = layout.speaker_index.clamp_max(self.speaker.num_embeddings - 1)
            turns = layout.gather(x) + self.speaker_change(layout.speaker_change) + self.speaker(speaker)
            turns = turns * layout.mask[..., None].to(turns.dtype)
            context = layout.scatter(self.turns(turns, layout.mask), len(batch))
            joined = torch.cat([x, context], dim=-1)
        embedding = self.head(joined)
        extras = dict(inner.extras)
        if self.aux is not None:
            extras.update(self.aux(embedding, batch))
        return EncoderOutput(logits=self.classifier(embedding), embedding=embedding, present=inner.present,
                             extras=extras)


@hookimpl
def register_encoders() -> list[Any]:
    return [DialogueContextEncoder]
