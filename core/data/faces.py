"""Faces in video clips: detect the face in each sampled frame, link the boxes into one track, crop.

MIMAMO's frame CNN and its spatial attention expect a face filling the picture; a user's clip has
the face anywhere, small, moving, or not at all. Per clip: the encoder's frames are decoded (seeking,
`decode.sample_frames`), a pretrained detector finds face candidates in each, `track_faces` keeps
the candidates that form one face moving smoothly (a frame without one takes the track's last box)
and smooths the boxes over time, and `crop_faces` cuts square crops with a margin. A clip where no
frame has a face gives None: the caller marks its video absent (the missing-modality mask).

Detectors sit behind `FaceDetector`; the built-in one is OpenCV's Haar cascade shipped in
``opencv-python-headless`` (offline, no weights to download): 48 of 48 sampled frames of the shared
CREMA-D clips, about 27 ms a frame at 240 px (see benchmarks/README.md). Crops are cached on disk
(a `FeatureCache` namespace per setting), keyed like the video modality.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from emofuse.core.data.decode import sample_frames
from emofuse.core.data.user_cache import user_cache_dir
from emofuse.core.errors import ConfigError, MissingDependencyError

#: Detectors by the name `data.video.faces` accepts.
DETECTORS = ("haar",)
OPENCV_HINT = "install OpenCV 4 (it ships the Haar cascades; OpenCV 5 dropped them): pip install 'opencv-python-headless>=4.8,<5'"


@dataclass(frozen=True)
class FaceSettings:
    """How faces are found and cropped; part of the video cache key."""

    detector: str = "haar"
    #: Added on every side of the (square) face box, as a fraction of its side.
    margin: float = 0.25
    #: Frames are scaled so their shorter side is this many pixels before detection (speed).
    detect_size: int = 240
    #: Smallest face looked for, as a fraction of the frame's shorter side.
    min_face: float = 0.12
    #: A candidate further than this many box sides from the track's last box is another face (or a
    #: false detection), not the tracked one.
    max_jump: float = 1.5

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"face detector {self.detector!r} is unknown; expected one of {', '.join(DETECTORS)}")
        if not 0 <= self.margin <= 2:
            raise ConfigError(f"face margin {self.margin}: expected 0..2 (a fraction of the face box's side)")

    def describe(self) -> str:
        return ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))


class FaceDetector(Protocol):
    """Face candidates in one RGB frame: float ``[K, 5]`` rows of (x0, y0, x1, y1, score) in pixels."""

    def detect(self, rgb: np.ndarray) -> np.ndarray: ...


def _cv2():
    try:
        import cv2
    except ImportError:
        raise MissingDependencyError("face detection needs OpenCV, which is not installed", hint=OPENCV_HINT) from None
    return cv2


def _limit_opencv_threads(cv2) -> None:
    """OpenCV's own thread pool follows ``--threads`` (EMOFUSE_THREADS): DataLoader workers already
    take the cores, and more threads than cores only wait for each other."""
    threads = os.environ.get("EMOFUSE_THREADS")
    if threads and threads.isdigit():
        cv2.setNumThreads(int(threads))


class HaarFaceDetector:
    """OpenCV's frontal-face Haar cascade (Viola-Jones), on a grayscale, equalised, downscaled frame.

    OpenCV does not promise that one classifier may be used from several threads, and `make_batch`
    decodes on a thread pool, so each thread loads its own (a few ms).
    """

    CASCADE = "haarcascade_frontalface_default.xml"

    def __init__(self, settings: FaceSettings):
        self.settings = settings
        self._local = threading.local()
        cv2 = _cv2()
        _limit_opencv_threads(cv2)
        self.path = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / self.CASCADE
        if not self.path.is_file():
            raise MissingDependencyError(f"OpenCV {cv2.__version__} ships no {self.CASCADE}", hint=OPENCV_HINT)

    def _classifier(self):
        found = getattr(self._local, "classifier", None)
        if found is None:
            found = _cv2().CascadeClassifier(str(self.path))
            self._local.classifier = found
        return found

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """A fast pass on the frame scaled to `detect_size`; when it finds nothing, one more at full size
        (a small face has too few pixels left after scaling)."""
        cv2 = _cv2()
        gray = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        scale = min(1.0, self.settings.detect_size / min(gray.shape))
        found = self._detect_at(gray, scale)
        if len(found) == 0 and scale < 1.0:
            found = self._detect_at(gray, 1.0)
        return found

    def _detect_at(self, gray: np.ndarray, scale: float) -> np.ndarray:
        cv2 = _cv2()
        if scale < 1.0:
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        smallest = max(20, int(self.settings.min_face * min(gray.shape)))
        boxes, _, weights = self._classifier().detectMultiScale3(
            gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest), outputRejectLevels=True)
        if len(boxes) == 0:
            return np.zeros((0, 5), dtype=np.float32)
        boxes = np.asarray(boxes, dtype=np.float32) / scale
        out = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:], np.asarray(weights, np.float32).reshape(-1, 1)], 1)
        return out.astype(np.float32)


_detectors: dict[FaceSettings, FaceDetector] = {}


def detector_for(settings: FaceSettings) -> FaceDetector:
    """The (shared) detector of `settings`."""
    if settings not in _detectors:
        _detectors[settings] = HaarFaceDetector(settings)
    return _detectors[settings]


# -- the track ----------------------------------------------------------------------------------


@dataclass
class FaceTrack:
    """One face over T frames: square boxes ``[T, 4]`` (x0, y0, x1, y1 in pixels) and which frames
    had a detection of their own (``[T]`` bool; the others hold the track's last box)."""

    boxes: np.ndarray
    detected: np.ndarray


def _centre_side(box: np.ndarray) -> tuple[float, float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, max(box[2] - box[0], box[3] - box[1])


def _nearest(candidates: np.ndarray, previous: np.ndarray, max_jump: float) -> np.ndarray | None:
    """The candidate that continues `previous`: near it and of a similar size, else None."""
    if len(candidates) == 0:
        return None
    px, py, ps = _centre_side(previous)
    best, best_distance = None, None
    for box in candidates:
        x, y, s = _centre_side(box)
        distance = float(np.hypot(x - px, y - py)) / ps
        if distance <= max_jump and 0.5 <= s / ps <= 2.0 and (best_distance is None or distance < best_distance):
            best, best_distance = box, distance
    return best


def track_faces(candidates: list[np.ndarray], *, max_jump: float = 1.5) -> FaceTrack | None:
    """Link per-frame candidates (``[K, 5]`` each) into one face track; None when no frame has a face.

    The track starts at the frame whose best candidate scores highest (the surest face) and grows
    forward and backward, each frame taking the candidate nearest the previous box; a frame with
    none that fits (no face, or only a far-away false detection) holds the last box. The centres
    and sides are then smoothed over neighbouring frames (weights 1-2-1), so the crop follows the
    face without jitter.
    """
    t = len(candidates)
    scored = [(float(c[:, 4].max()), i) for i, c in enumerate(candidates) if len(c)]
    if not scored:
        return None
    _, anchor = max(scored)
    chosen: list[np.ndarray | None] = [None] * t
    chosen[anchor] = candidates[anchor][int(np.argmax(candidates[anchor][:, 4]))][:4]
    for order in (range(anchor + 1, t), range(anchor - 1, -1, -1)):
        last = chosen[anchor]
        for i in order:
            found = _nearest(candidates[i][:, :4], last, max_jump)
            if found is not None:
                chosen[i] = last = found
    detected = np.array([c is not None for c in chosen])
    filled: list[np.ndarray] = []
    for i in range(t):  # hold the last box; frames before the first detection take the first one
        box = chosen[i]
        if box is None:
            box = filled[-1] if filled else next(b for b in chosen if b is not None)
        filled.append(np.asarray(box, dtype=np.float64))
    geometry = np.array([_centre_side(b) for b in filled])
    padded = np.concatenate([geometry[:1], geometry, geometry[-1:]])
    smooth = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    half = smooth[:, 2:3] / 2
    boxes = np.concatenate([smooth[:, :2] - half, smooth[:, :2] + half], axis=1)
    return FaceTrack(boxes.astype(np.float32), detected)


def crop_faces(frames: np.ndarray, boxes: np.ndarray, *, size: int, margin: float) -> np.ndarray:
    """Square crops ``[T, size, size, 3]`` around `boxes`, grown by `margin`; outside the frame is black."""
    cv2 = _cv2()
    out = np.zeros((len(frames), size, size, 3), dtype=np.uint8)
    for i, (frame, box) in enumerate(zip(frames, boxes)):
        x, y, side = _centre_side(box)
        side *= 1 + 2 * margin
        # An affine warp does crop, pad and resize in one step, with sub-pixel accuracy. Frames are
        # decoded at most MAX_DECODE_SIDE wide, so a face is rarely shrunk by more than 2-3x here.
        s = size / side
        matrix = np.array([[s, 0, (side / 2 - x) * s], [0, s, (side / 2 - y) * s]], dtype=np.float64)
        out[i] = cv2.warpAffine(frame, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out


# -- one clip -----------------------------------------------------------------------------------


@dataclass
class FaceClip:
    """A clip's face crops ``[T, S, S, 3]`` uint8, the track's boxes ``[T, 4]`` as fractions of the
    frame (x0, y0, x1, y1; may reach past 0..1 near the border) and which frames had a detection."""

    crops: np.ndarray
    boxes: np.ndarray
    detected: np.ndarray

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"crops": torch.from_numpy(self.crops), "boxes": torch.from_numpy(self.boxes),
                "detected": torch.from_numpy(self.detected.astype(np.uint8))}

    @classmethod
    def from_tensors(cls, stored: dict[str, torch.Tensor]) -> "FaceClip | None":
        if "crops" not in stored:
            return None  # stored "no face"
        return cls(stored["crops"].numpy(), stored["boxes"].numpy(), stored["detected"].numpy().astype(bool))


def faces_in_frames(frames: np.ndarray, settings: FaceSettings, *, size: int) -> FaceClip | None:
    """Detect, track and crop in decoded RGB frames ``[T, H, W, 3]``; None when no frame has a face."""
    detector = detector_for(settings)
    track = track_faces([detector.detect(f) for f in frames], max_jump=settings.max_jump)
    if track is None:
        return None
    h, w = frames.shape[1:3]
    crops = crop_faces(frames, track.boxes, size=size, margin=settings.margin)
    fractions = track.boxes / np.array([w, h, w, h], dtype=np.float32)
    return FaceClip(crops, fractions.astype(np.float32), track.detected)


#: Frames are decoded at most this large (longer side) before detection and cropping.
MAX_DECODE_SIDE = 960


def face_clip(path: str | os.PathLike, settings: FaceSettings, *, num_frames: int = 8, size: int = 224,
              cache_dir: str | os.PathLike | None = None, cache_key: str | None = None) -> FaceClip | None:
    """The face crops of the clip at `path` (None: no face in any sampled frame).

    With `cache_dir` and `cache_key` (the video modality key: file identity and settings), the
    result, "no face" included, is read from and written to a `FeatureCache` there.
    """
    cache = _crop_cache(cache_dir) if cache_dir is not None and cache_key is not None else None
    namespace = crop_namespace(settings, num_frames, size)
    if cache is not None:
        (stored,) = cache.get_many(namespace, [cache_key])
        if stored is not None:
            return FaceClip.from_tensors(stored)
    frames = sample_frames(path, num_frames=num_frames).rgb(MAX_DECODE_SIDE)
    found = faces_in_frames(frames, settings, size=size)
    if cache is not None:
        cache.put_many(namespace, [cache_key], [found.tensors() if found is not None else {}])
    return found


def crop_namespace(settings: FaceSettings, num_frames: int, size: int) -> str:
    digest = hashlib.sha256(f"{settings.describe()}|T={num_frames}|S={size}".encode()).hexdigest()[:12]
    return f"face-crops-{settings.detector}-{digest}"


def default_crop_cache() -> Path:
    """``$EMOFUSE_CACHE_DIR/face-crops``, else ``$XDG_CACHE_HOME/emofuse/face-crops`` (``~/.cache``)."""
    return user_cache_dir("face-crops")


_caches: dict[str, object] = {}
_caches_lock = threading.Lock()


def _crop_cache(root: str | os.PathLike):
    from emofuse.core.data.cache import FeatureCache

    key = str(Path(root).resolve())
    with _caches_lock:
        if key not in _caches:
            _caches[key] = FeatureCache(key)
        return _caches[key]


__all__ = ["DETECTORS", "FaceClip", "FaceDetector", "FaceSettings", "FaceTrack", "HaarFaceDetector", "crop_faces",
           "default_crop_cache", "detector_for", "face_clip", "faces_in_frames", "track_faces"]
