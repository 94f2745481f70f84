"""Per-frame CNNs that turn video frames into spatial feature maps for MIMAMO's attention.

- ``fer-mini-xception`` (default): the FER-2013 face-expression CNN the `fer` package ships, a real
  pretrained model that works offline; frames become 64x64 grayscale inside, its last residual
  block gives a ``128 x 4 x 4`` map;
- any timm CNN name (``resnet18``, ``mobilenetv3_small_100``...): pretrained weights come from the
  model hub (online, or already in the local cache), from a local file (`weights`), or none
  (``pretrained=False``, random init). Offline without cached weights it fails at once.

Frames arrive ImageNet-normalised ``[N, 3, H, W]``; `face_box` (left, top, right, bottom as
fractions of the frame) crops a fixed face region first, for corpora filmed with a fixed framing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from emofuse.core import ConfigError, MissingDependencyError
from emofuse.plugins.encoders.fer_xception import load_fer_mini_xception, preprocess_faces, rgb_to_gray
from emofuse.plugins.encoders.pretrained import HUB, LOCAL, PACKAGE, hub_offline, resolve_backbone

DEFAULT_FRAME_BACKBONE = "fer-mini-xception"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FaceBox = Sequence[float]


def denormalise(frames: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised ``[N, 3, H, W]`` -> RGB in 0..1."""
    mean = frames.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = frames.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (frames * std + mean).clamp(0.0, 1.0)


def crop_box(frames: torch.Tensor, box: FaceBox | None) -> torch.Tensor:
    """Crop ``[N, C, H, W]`` to a (left, top, right, bottom) box given as fractions; None keeps all."""
    if box is None:
        return frames
    h, w = frames.shape[-2:]
    left, top, right, bottom = box
    x0, x1 = int(round(left * w)), max(int(round(right * w)), int(round(left * w)) + 1)
    y0, y1 = int(round(top * h)), max(int(round(bottom * h)), int(round(top * h)) + 1)
    return frames[..., y0:y1, x0:x1]


class FrameBackbone(nn.Module):
    """Base: normalised frames ``[N, 3, H, W]`` -> feature maps ``[N, out_channels, h, w]``."""

    out_channels: int = 0


class FerFrameBackbone(FrameBackbone):
    """The FER mini-Xception's last residual block over grayscale faces."""

    def __init__(self, weights: str | Path | None = None, face_box: FaceBox | None = None):
        super().__init__()
        self.net = load_fer_mini_xception(weights)
        self.face_box = tuple(face_box) if face_box is not None else None
        self.out_channels = self.net.feature_channels

    def faces(self, frames: torch.Tensor) -> torch.Tensor:
        """The model's input: crop, grayscale, resize, scale to [-1, 1]."""
        rgb = crop_box(denormalise(frames), self.face_box)
        return preprocess_faces(rgb_to_gray(rgb), self.net.input_size)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net.feature_map(self.faces(frames))

    def expression_probabilities(self, frames: torch.Tensor) -> torch.Tensor:
        """FER-2013 class probabilities ``[N, 7]`` (order `fer_xception.FER_LABELS`), for inspection."""
        return self.net(self.faces(frames)).softmax(dim=-1)


class TimmFrameBackbone(FrameBackbone):
    """A timm CNN without its pooling and classifier: ``forward_features`` gives the spatial map."""

    def __init__(self, name: str, *, pretrained: bool = True, weights: str | None = None,
                 face_box: FaceBox | None = None, option: str = "frame_backbone"):
        super().__init__()
        import timm

        if not timm.is_model(name.removeprefix("timm/")) and not name.startswith("hf-hub:"):
            raise ConfigError(
                f"{option}: {name!r} is neither a packaged model ({DEFAULT_FRAME_BACKBONE}), a Keras mini-Xception "
                "file nor a timm model name",
                hint="list timm names with `python -c \"import timm; print(timm.list_models('*resnet*'))\"`",
            )
        kwargs: dict = dict(num_classes=0, global_pool="")
        if weights is not None:
            if not Path(weights).is_file():
                raise ConfigError(f"frame_weights: {weights} is not a file", hint="point it at a timm .safetensors file")
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(Path(weights).resolve())))
        elif pretrained:
            cached = _cached_timm_weights(name)
            if cached is not None:
                kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=cached))
            elif hub_offline():
                raise MissingDependencyError(
                    f"{option} {name!r}: timm's pretrained weights must come from the model hub, which cannot be reached (offline)",
                    hint=f"set frame_weights=FILE to a downloaded .safetensors, frame_pretrained=false for random init, "
                    f"or use the packaged offline default {option}={DEFAULT_FRAME_BACKBONE}",
                )
            else:
                kwargs.update(pretrained=True)
        self.net = timm.create_model(name, **kwargs)
        cfg = getattr(self.net, "pretrained_cfg", {}) or {}
        self.register_buffer("mean", torch.tensor(cfg.get("mean", IMAGENET_MEAN)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", IMAGENET_STD)).view(1, 3, 1, 1), persistent=False)
        self.face_box = tuple(face_box) if face_box is not None else None
        self.out_channels = int(self.net.num_features)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        size = frames.shape[-2:]
        rgb = crop_box(denormalise(frames), self.face_box)
        if rgb.shape[-2:] != size:
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=True)
        fmap = self.net.forward_features((rgb - self.mean) / self.std)
        if fmap.dim() != 4:
            raise ConfigError(
                f"frame_backbone: {type(self.net).__name__} gives {fmap.dim()}-d features, not a spatial map",
                hint="choose a convolutional timm model (resnet18, mobilenetv3_small_100, efficientnet_b0...)",
            )
        return fmap


def _cached_timm_weights(name: str) -> str | None:
    """The local Hugging Face cache's copy of a timm model's pretrained weights, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name.removeprefix("timm/"))
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            return None
        found = try_to_load_from_cache(repo, "model.safetensors")
        return found if isinstance(found, str) else None
    except Exception:  # any cache lookup trouble just means "not cached"
        return None


def make_frame_backbone(
    name: str = DEFAULT_FRAME_BACKBONE,
    *,
    pretrained: bool = True,
    weights: str | None = None,
    face_box: FaceBox | None = None,
    option: str = "frame_backbone",
) -> FrameBackbone:
    """``fer-mini-xception`` (or a local Keras mini-Xception .h5/.hdf5), else a timm CNN name."""
    if face_box is not None:
        left, top, right, bottom = face_box
        if not (0 <= left < right <= 1 and 0 <= top < bottom <= 1):
            raise ConfigError(f"face_box {list(face_box)}: expected 0 <= left < right <= 1 and 0 <= top < bottom <= 1")
    lowered = name.strip().lower()
    if lowered.endswith((".h5", ".hdf5")) or lowered in ("fer", "fer-mini-xception"):
        source = resolve_backbone(name)
        if source.kind not in (LOCAL, PACKAGE):
            raise ConfigError(f"{option}: {name}: no such file")
        if not pretrained:
            raise ConfigError(f"{option}={name} is a pretrained model; frame_pretrained=false applies to timm models")
        return FerFrameBackbone(source.location, face_box=face_box)
    if resolve_backbone(name).kind == HUB or lowered.startswith("hf-hub:"):
        return TimmFrameBackbone(name, pretrained=pretrained, weights=weights, face_box=face_box, option=option)
    raise ConfigError(f"{option}: {name} is a local path; pass a timm model name and frame_weights=PATH instead")
