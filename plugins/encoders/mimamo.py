"""MIMAMO Net branch: video frames (+ transcript text + speaker metadata) -> emotion.

Per frame, a frozen pretrained CNN gives a spatial feature map; a learned attention map over it
pools the regions that matter (the face's salient parts), a bidirectional GRU reads the 8 frames
in order, the transcript's sentence embedding modulates the result (FiLM: a per-feature scale and
shift predicted from the text), the speaker's age and gender join, and a batch-normalised head
with dropout classifies. The attention maps are returned in ``EncoderOutput.extras["attention"]``
and kept on `last_attention` for inspection.

With ``prior_labels`` (the corpus's labels in class order) and the FER mini-Xception backbone, the
head starts from that network's own expression classifier: the clip's FER probabilities, averaged
over frames and mapped onto the labels by name (`fer_prior`), are added as log-probabilities with a
learnable weight, and the learned classifier starts at zero, so before training the branch *is* the
zero-shot FER classifier and training learns corrections to it.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from emofuse.core import METADATA, TEXT, VIDEO, Batch, ComponentConfig, ConfigError, Encoder, EncoderOutput, hookimpl
from emofuse.plugins.encoders.fer_prior import PRIOR_FLOOR, fer_label_map, map_fer_probabilities
from emofuse.plugins.encoders.frame_backbone import DEFAULT_FRAME_BACKBONE, FerFrameBackbone, make_frame_backbone
from emofuse.plugins.encoders.layers import (
    MetadataEmbedding,
    classifier_head,
    freeze,
    keep_frozen_in_eval,
)
from emofuse.plugins.encoders.text_backbone import DEFAULT_TEXT_BACKBONE, TextBackbone


class MimamoConfig(ComponentConfig):
    #: "fer-mini-xception" (packaged, pretrained, offline), a Keras mini-Xception .h5, or a timm CNN name.
    frame_backbone: str = DEFAULT_FRAME_BACKBONE
    #: For timm names: load pretrained weights (hub, local cache or `frame_weights`); false = random init.
    frame_pretrained: bool = True
    #: For timm names: a local .safetensors file with the model's weights.
    frame_weights: str | None = None
    #: Fixed face region (left, top, right, bottom as fractions of the frame) cropped before the CNN;
    #: for whole frames (data.video.faces = "none") of a corpus filmed with one framing.
    face_box: tuple[float, float, float, float] | None = None
    #: BERT-family text encoder for the text-fusion layer; None leaves text out.
    text_backbone: str | None = DEFAULT_TEXT_BACKBONE
    max_text_tokens: int = Field(64, ge=4, le=512)
    #: Keep the pretrained CNN and text encoder fixed (their outputs are then cached once per clip).
    freeze_backbone: bool = True
    hidden_dim: int = Field(128, ge=8, le=4096)
    attention_dim: int = Field(64, ge=4, le=4096)
    temporal_layers: int = Field(1, ge=1, le=4)
    metadata_dim: int = Field(16, ge=1, le=512)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    #: The corpus's labels in class order: start the head from the FER-2013 classifier's expressions
    #: mapped onto them by name (needs frame_backbone = "fer-mini-xception"); None: a plain head.
    prior_labels: list[str] | None = None

    @field_validator("hidden_dim")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (the bidirectional GRU splits it in two)")
        return v


class SpatialAttentionPool(nn.Module):
    """Scores every position of a ``[N, C, h, w]`` map (1x1 conv -> tanh -> 1x1 conv), softmaxes the
    scores over space and returns the weighted sum ``[N, C]`` and the map ``[N, h, w]`` (sums to 1)."""

    def __init__(self, channels: int, attention_dim: int):
        super().__init__()
        self.score = nn.Sequential(nn.Conv2d(channels, attention_dim, 1), nn.Tanh(), nn.Conv2d(attention_dim, 1, 1))

    def forward(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = fmap.shape
        weights = self.score(fmap).view(n, h * w).softmax(dim=-1)
        pooled = torch.bmm(fmap.view(n, c, h * w), weights.unsqueeze(-1)).squeeze(-1)
        return pooled, weights.view(n, h, w)


class MimamoEncoder(Encoder):
    """MIMAMO Net: per-frame CNN + spatial attention + GRU over frames, text FiLM, speaker metadata."""

    name: ClassVar[str] = "mimamo"
    modalities: ClassVar[tuple[str, ...]] = (VIDEO, TEXT, METADATA)
    Config: ClassVar[type[ComponentConfig]] = MimamoConfig
    pretrained_modules: ClassVar[tuple[str, ...]] = ("frame_backbone", "text_backbone")

    @classmethod
    def modalities_for(cls, config: MimamoConfig) -> tuple[str, ...]:
        """Without a text backbone the transcript is not read (and so never needs transcribing)."""
        return cls.modalities if config.text_backbone else tuple(m for m in cls.modalities if m != TEXT)

    def __init__(self, config: MimamoConfig, num_classes: int):
        super().__init__(config, num_classes)
        c = config
        self.modalities = self.modalities_for(c)
        self.frame_backbone = make_frame_backbone(
            c.frame_backbone, pretrained=c.frame_pretrained, weights=c.frame_weights, face_box=c.face_box
        )
        self.text_backbone = TextBackbone(c.text_backbone, max_length=c.max_text_tokens) if c.text_backbone else None
        if c.freeze_backbone:
            freeze(self.frame_backbone)
            freeze(self.text_backbone)
        channels = self.frame_backbone.out_channels
        self.project = nn.Sequential(nn.Conv2d(channels, c.hidden_dim, 1), nn.BatchNorm2d(c.hidden_dim), nn.ReLU())
        self.attention = SpatialAttentionPool(c.hidden_dim, c.attention_dim)
        self.temporal = nn.GRU(c.hidden_dim, c.hidden_dim // 2, num_layers=c.temporal_layers,
                               batch_first=True, bidirectional=True,
                               dropout=c.dropout if c.temporal_layers > 1 else 0.0)
        self.film = nn.Linear(self.text_backbone.dim, 2 * c.hidden_dim) if self.text_backbone else None
        if self.film is not None:  # start as the identity: text has to earn its influence
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.metadata = MetadataEmbedding(c.metadata_dim)
        self.head, self.classifier = classifier_head(c.hidden_dim + c.metadata_dim, c.hidden_dim, num_classes, c.dropout)
        self.embedding_dim = c.hidden_dim
        self.prior_map: list[int | None] | None = None
        if c.prior_labels is not None:
            self._start_from_fer_prior(c.prior_labels, num_classes)
        #: Attention maps ``[B, T, h, w]`` of the latest forward pass, detached.
        self.last_attention: torch.Tensor | None = None
        self._map_shape: dict[tuple[int, int], tuple[int, ...]] = {}

    def _start_from_fer_prior(self, labels: list[str], num_classes: int) -> None:
        if not isinstance(self.frame_backbone, FerFrameBackbone):
            raise ConfigError("prior_labels needs frame_backbone = \"fer-mini-xception\" (the prior is its classifier)")
        if len(labels) != num_classes:
            raise ConfigError(f"prior_labels names {len(labels)} labels, the data set has {num_classes} classes",
                              hint="give the data set's labels in class order")
        self.prior_map = fer_label_map(labels)
        self.prior_weight = nn.Parameter(torch.ones(()))
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def fer_frame_probabilities(self, maps: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]``: each frame's FER-2013 probabilities mapped onto the corpus labels."""
        b, t = maps.shape[:2]
        fer = self.frame_backbone.net.logits_from_map(maps.flatten(0, 1).float()).softmax(dim=-1)
        return map_fer_probabilities(fer, self.prior_map).view(b, t, -1)

    @property
    def backbone_trainable(self) -> bool:
        return not self.config.freeze_backbone

    def train(self, mode: bool = True) -> "MimamoEncoder":
        super().train(mode)
        if self.config.freeze_backbone:
            keep_frozen_in_eval([self.frame_backbone, self.text_backbone])
        return self

    # -- the frozen part ---------------------------------------------------------------------
    def _feature_map_shape(self, height: int, width: int, device: torch.device) -> tuple[int, ...]:
        key = (height, width)
        if key not in self._map_shape:
            with torch.no_grad():
                was_training = self.frame_backbone.training
                self.frame_backbone.eval()
                probe = self.frame_backbone(torch.zeros(1, 3, height, width, device=device))
                self.frame_backbone.train(was_training)
            self._map_shape[key] = tuple(probe.shape[1:])
        return self._map_shape[key]

    def extract(self, batch: Batch) -> list[dict[str, torch.Tensor]]:
        """Per clip: ``frame_maps`` ``[T, C, h, w]`` (zeros where the video is absent) and, with a
        text backbone, ``text_embedding`` ``[D]`` (the mean of its token vectors)."""
        b = len(batch)
        device = batch.labels.device
        if batch.video is not None:
            video = batch.video
            t, height, width = video.shape[1], video.shape[-2], video.shape[-1]
        else:
            video, t, height, width = None, 8, 224, 224
        shape = self._feature_map_shape(height, width, device)
        maps = torch.zeros(b, t, *shape, device=device)
        has_video = batch.presence(VIDEO)
        if video is not None and bool(has_video.any()):
            idx = has_video.nonzero().flatten()
            frames = video[idx].flatten(0, 1)
            maps[idx] = self.frame_backbone(frames).view(len(idx), t, *shape).to(maps.dtype)
        out = [{"frame_maps": maps[i]} for i in range(b)]
        if self.text_backbone is not None:
            texts = batch.text or [""] * b
            for item, tokens in zip(out, self.text_backbone.token_embeddings(list(texts))):
                item["text_embedding"] = tokens.mean(dim=0)
        return out

    # -- the trainable head ------------------------------------------------------------------
    def forward(self, batch: Batch, extracted: dict[str, torch.Tensor] | None = None) -> EncoderOutput:
        ex = self.extracted_for(batch, extracted)
        maps = ex["frame_maps"]
        b, t = maps.shape[:2]
        # A clip without video reads zero maps, as `extract` gives it: features cached before the video was
        # marked absent (scoring without video) must not reach the output.
        maps = torch.where(batch.presence(VIDEO).view(b, *[1] * (maps.dim() - 1)), maps, torch.zeros_like(maps))
        x = self.project(maps.flatten(0, 1).to(self.classifier.weight.dtype))
        pooled, attention = self.attention(x)
        frames, _ = self.temporal(pooled.view(b, t, -1))
        h = frames.mean(dim=1)
        if self.film is not None and "text_embedding" in ex:
            has_text = batch.presence(TEXT).to(h.dtype)[:, None]
            scale, shift = self.film(ex["text_embedding"].to(h.dtype)).chunk(2, dim=-1)
            h = h * (1.0 + scale * has_text) + shift * has_text
        embedding = self.head(torch.cat([h, self.metadata(batch)], dim=-1))
        attention = attention.view(b, t, *attention.shape[-2:])
        self.last_attention = attention.detach()
        logits = self.classifier(embedding)
        extras = {"attention": attention}
        if self.prior_map is not None:
            frame_probs = self.fer_frame_probabilities(maps)
            prior = frame_probs.mean(dim=1).clamp_min(PRIOR_FLOOR).log().to(logits.dtype)
            has_video = batch.presence(VIDEO).to(logits.dtype)[:, None]
            logits = logits + self.prior_weight.to(logits.dtype) * prior * has_video
            extras["prior_frame_probabilities"] = frame_probs.detach()
        return EncoderOutput(
            logits=logits,
            embedding=embedding,
            present=batch.presence(VIDEO),
            extras=extras,
        )


@hookimpl
def register_encoders() -> list[Any]:
    return [MimamoEncoder]
