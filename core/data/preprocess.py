"""From a `Sample` (paths and metadata) to the arrays of one clip, decoding only the modalities asked for.

Frames are resized to 224x224 and later normalised with ImageNet statistics, which is what the
pretrained image/video backbones expect; audio is 16 kHz mono and left unscaled (speech encoders
normalise each utterance themselves); text stays a string, because each text encoder tokenises
with its own tokenizer. Per-corpus statistics (features, age) are the `Normalizer`'s job.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emofuse.core.data.decode import SAMPLE_RATE, decode_audio, decode_video
from emofuse.core.data.faces import FaceSettings, default_crop_cache, face_clip
from emofuse.core.types import AUDIO, FEATURES, MODALITIES, TEXT, VIDEO, Sample, gender_code

#: ImageNet channel statistics, as used to pretrain the image and video backbones.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """How clips become tensors; part of every cache key, so changing it invalidates cached features."""

    num_frames: int = 8
    frame_size: int = 224
    frame_mean: tuple[float, float, float] = IMAGENET_MEAN
    frame_std: tuple[float, float, float] = IMAGENET_STD
    sample_rate: int = SAMPLE_RATE
    #: Crop audio after this many seconds; None keeps whole clips.
    max_audio_seconds: float | None = None
    #: Detect, track and crop the face in each frame; None keeps whole frames (squeezed to square).
    faces: FaceSettings | None = None
    #: Folder caching face crops (not part of the key: where a result is kept does not change it).
    crop_cache: str | None = None

    def describe(self, modality: str) -> str:
        """The settings that shape `modality`'s tensors, as a stable string for hashing."""
        if modality == VIDEO:
            text = f"T={self.num_frames},S={self.frame_size},mean={self.frame_mean},std={self.frame_std}"
            return text + (f",faces=({self.faces.describe()})" if self.faces is not None else "")
        if modality == AUDIO:
            return f"sr={self.sample_rate},max={self.max_audio_seconds}"
        return ""


NO_FACE = "no face found in any sampled frame"


def preprocess_spec(data_config: Any = None) -> PreprocessSpec:
    """The spec a run's data config asks for (its ``video`` section); defaults without one."""
    video = getattr(data_config, "video", None)
    if video is None or video.faces == "none":
        return PreprocessSpec()
    cache = None
    if video.cache_crops:
        cache = str(video.crop_cache if video.crop_cache is not None else default_crop_cache())
    return PreprocessSpec(faces=FaceSettings(detector=video.faces, margin=video.face_margin), crop_cache=cache)


@dataclass
class PreparedSample:
    """One clip's decoded arrays (video stays uint8 until collation, to keep worker traffic small)."""

    id: str
    label: int
    speaker: str | None
    text: str
    age: float
    gender: int
    present: dict[str, bool]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    video: np.ndarray | None = None  # uint8 [T, S, S, 3]
    #: With face detection: the track's boxes [T, 4] (fractions of the frame) and per-frame detections [T].
    face_boxes: np.ndarray | None = None
    face_detected: np.ndarray | None = None
    #: Modality -> why a clip that has the file still lacks it (e.g. no face found).
    absent_reasons: dict[str, str] = field(default_factory=dict)
    audio: np.ndarray | None = None  # float32 [L]
    modality_keys: dict[str, str] = field(default_factory=dict)
    #: Conversation position, for context models that batch whole dialogues (None outside dialogues).
    dialogue_id: str | None = None
    utterance_index: int | None = None
    #: The reader's scalar `Sample.extra` fields (sentiment, intensity...), e.g. for auxiliary labels.
    tags: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadSample:
    """A sample that failed to decode: what failed (the file, else the id) and why."""

    id: str
    where: str
    reason: str


def prepare_sample(sample: Sample, modalities: set[str] | frozenset[str], spec: PreprocessSpec) -> PreparedSample:
    """Decode the requested media of `sample`; raises `DataError` naming the file when it is bad.

    Absent modalities are not errors: they come back as None with ``present[m] = False``.
    """
    present = {m: sample.has(m) for m in MODALITIES}
    video = audio = boxes = detected = None
    reasons: dict[str, str] = {}
    if VIDEO in modalities and present[VIDEO] and spec.faces is not None:
        key = None
        if spec.crop_cache is not None:
            from emofuse.core.data.keys import modality_key

            key = modality_key(sample, VIDEO, spec=spec)
        found = face_clip(sample.video_path, spec.faces, num_frames=spec.num_frames, size=spec.frame_size,
                          cache_dir=spec.crop_cache, cache_key=key)
        if found is None:  # no face in any sampled frame: the clip has no usable video
            present[VIDEO] = False
            reasons[VIDEO] = NO_FACE
        else:
            video, boxes, detected = found.crops, found.boxes, found.detected
    elif VIDEO in modalities and present[VIDEO]:
        video = decode_video(sample.video_path, num_frames=spec.num_frames, size=spec.frame_size)
    if AUDIO in modalities and present[AUDIO]:
        audio = decode_audio(sample.audio_path, sample_rate=spec.sample_rate, max_seconds=spec.max_audio_seconds)
    age = float(sample.age) if sample.age is not None and not math.isnan(float(sample.age)) else math.nan
    return PreparedSample(
        id=sample.id,
        label=-1 if sample.label is None else int(sample.label),
        speaker=sample.speaker,
        text=(sample.text or "") if present[TEXT] else "",
        age=age,
        gender=gender_code(sample.gender),
        present=present,
        features={k: np.asarray(v, dtype=np.float32) for k, v in sample.features.items()} if present[FEATURES] else {},
        video=video,
        audio=audio,
        face_boxes=boxes,
        face_detected=detected,
        absent_reasons=reasons,
        dialogue_id=sample.dialogue_id,
        utterance_index=sample.utterance_index,
        tags={k: v for k, v in sample.extra.items() if v is None or isinstance(v, (str, int, float, bool))},
    )

