"""A branch over precomputed per-clip feature vectors (facial action units, MFCC statistics...), so a
corpus that ships features instead of media still trains.

The named vectors (``features = ["au"]`` or ``["au", "mfcc"]``) are concatenated, standardised by
an input batch norm (their scales differ wildly: AU intensities near 1, MFCCs near -60), optionally
joined by speaker metadata and the transcript's sentence embedding, and classified by an MLP with
batch norm and dropout. Input widths are taken from the first batch unless `feature_dims` gives them.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from emofuse.core import FEATURES, METADATA, TEXT, Batch, ComponentConfig, ConfigError, Encoder, EncoderOutput, hookimpl
from emofuse.plugins.encoders.layers import BatchNorm1d, MetadataEmbedding, freeze, keep_frozen_in_eval
from emofuse.plugins.encoders.text_backbone import TextBackbone


class FeaturesConfig(ComponentConfig):
    #: Names of the per-clip vectors to use, as the dataset reader provides them in `Sample.features`.
    features: list[str] = Field(default_factory=lambda: ["au"], min_length=1)
    #: Width of each named vector; missing names are inferred from the first batch.
    feature_dims: dict[str, int] = Field(default_factory=dict)
    hidden_dims: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    use_metadata: bool = True
    metadata_dim: int = Field(16, ge=1, le=512)
    #: A text encoder whose sentence embedding joins the features (e.g. "minilm"); None: no text.
    text_backbone: str | None = None
    max_text_tokens: int = Field(64, ge=4, le=512)
    freeze_backbone: bool = True

    @field_validator("hidden_dims")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError("every hidden width must be >= 1")
        return v

    @model_validator(mode="after")
    def _dims_known_names(self) -> "FeaturesConfig":
        unknown = set(self.feature_dims) - set(self.features)
        if unknown:
            raise ValueError(f"feature_dims names {sorted(unknown)} are not in features {self.features}")
        if any(d < 1 for d in self.feature_dims.values()):
            raise ValueError("feature widths must be >= 1")
        return self


class FeatureVectorEncoder(Encoder):
    """An MLP over precomputed per-clip feature vectors (e.g. action units + MFCCs), with metadata."""

    name: ClassVar[str] = "features"
    modalities: ClassVar[tuple[str, ...]] = (FEATURES, TEXT, METADATA)
    Config: ClassVar[type[ComponentConfig]] = FeaturesConfig
    pretrained_modules: ClassVar[tuple[str, ...]] = ("text_backbone",)

    def __init__(self, config: FeaturesConfig, num_classes: int):
        super().__init__(config, num_classes)
        c = config
        self.text_backbone = TextBackbone(c.text_backbone, max_length=c.max_text_tokens) if c.text_backbone else None
        if c.freeze_backbone:
            freeze(self.text_backbone)
        known = all(n in c.feature_dims for n in c.features)
        width = sum(c.feature_dims[n] for n in c.features) if known else None
        # Lazy modules take their input width from the first batch when the widths are not configured.
        self.input_norm = BatchNorm1d(width) if width else nn.LazyBatchNorm1d()
        side = (c.metadata_dim if c.use_metadata else 0) + (self.text_backbone.dim if self.text_backbone else 0)
        layers: list[nn.Module] = []
        for i, hidden in enumerate(c.hidden_dims):
            if i == 0:
                layers.append(nn.Linear(width + side, hidden) if width else nn.LazyLinear(hidden))
            else:
                layers.append(nn.Linear(c.hidden_dims[i - 1], hidden))
            layers += [BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(c.dropout)]
        self.mlp = nn.Sequential(*layers)
        self.metadata = MetadataEmbedding(c.metadata_dim) if c.use_metadata else None
        self.classifier = nn.Linear(c.hidden_dims[-1], num_classes)
        self.embedding_dim = c.hidden_dims[-1]

    @property
    def backbone_trainable(self) -> bool:
        return self.text_backbone is not None and not self.config.freeze_backbone

    @property
    def cacheable(self) -> bool:
        return self.text_backbone is not None and super().cacheable

    def train(self, mode: bool = True) -> "FeatureVectorEncoder":
        super().train(mode)
        if self.config.freeze_backbone:
            keep_frozen_in_eval([self.text_backbone])
        return self

    def extract(self, batch: Batch) -> list[dict[str, torch.Tensor]] | None:
        """Per clip ``text_embedding`` ``[D]`` when a text backbone is configured; else nothing to cache."""
        if self.text_backbone is None:
            return None
        texts = list(batch.text or [""] * len(batch))
        return [{"text_embedding": t.mean(dim=0)} for t in self.text_backbone.token_embeddings(texts)]

    def _feature_matrix(self, batch: Batch) -> torch.Tensor:
        parts = []
        for name in self.config.features:
            if name not in batch.features:
                have = ", ".join(sorted(batch.features)) or "none"
                raise ConfigError(
                    f"encoder features: the batch has no feature vector {name!r} (it has: {have})",
                    hint="set features=[...] to names the dataset provides, e.g. --set branches.video.features='[\"au\"]'",
                )
            x = batch.features[name].float()
            expected = self.config.feature_dims.get(name)
            if expected is not None and x.shape[-1] != expected:
                raise ConfigError(f"encoder features: {name!r} has width {x.shape[-1]}, feature_dims says {expected}")
            parts.append(x.flatten(1))
        return torch.nan_to_num(torch.cat(parts, dim=-1), nan=0.0, posinf=0.0, neginf=0.0)

    def forward(self, batch: Batch, extracted: dict[str, torch.Tensor] | None = None) -> EncoderOutput:
        x = self.input_norm(self._feature_matrix(batch).to(self.classifier.weight.device))
        has_features = batch.presence(FEATURES)
        x = x * has_features[:, None].to(x.dtype)
        inputs = [x]
        if self.metadata is not None:
            inputs.append(self.metadata(batch))
        if self.text_backbone is not None:
            ex = self.extracted_for(batch, extracted)
            has_text = batch.presence(TEXT)[:, None].to(x.dtype)
            inputs.append(ex["text_embedding"].to(x.dtype) * has_text)
        embedding = self.mlp(torch.cat(inputs, dim=-1))
        return EncoderOutput(logits=self.classifier(embedding), embedding=embedding, present=has_features)


@hookimpl
def register_encoders() -> list[Any]:
    return [FeatureVectorEncoder]

