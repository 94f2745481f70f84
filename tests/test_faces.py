"""Faces in real video: detection on the shared CREMA-D clips, a track that follows a face moving
across the frame (a clip made from a real one's frames, shifted), clips without a face reported as
missing video, seeking that decodes fewer frames than reading from the start, and the crop cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emofuse.core.data.decode import decode_all_frames, sample_frames
from emofuse.core.data import faces
from emofuse.core.data.faces import FaceSettings, face_clip, track_faces
from emofuse.core.data.preprocess import NO_FACE, PreprocessSpec, prepare_sample
from emofuse.core.types import VIDEO, Sample
from video_helpers import all_frames, write_video

SETTINGS = FaceSettings()


def clips(shared_data: Path) -> list[Path]:
    found = sorted((shared_data / "crema-d" / "media").glob("*.flv"))
    assert len(found) == 6
    return found


def test_the_haar_detector_finds_the_face_in_every_sampled_frame_of_the_real_clips(shared_data):
    for path in clips(shared_data):
        found = face_clip(path, SETTINGS)
        assert found is not None, path
        assert found.crops.shape == (8, 224, 224, 3) and found.crops.dtype == np.uint8
        assert found.detected.all(), f"{path.name}: {found.detected}"
        # the actor sits in the middle of a 480x360 frame, the face a third of its height
        centre_x = (found.boxes[:, 0] + found.boxes[:, 2]) / 2
        centre_y = (found.boxes[:, 1] + found.boxes[:, 3]) / 2
        height = found.boxes[:, 3] - found.boxes[:, 1]
        assert np.all((0.35 < centre_x) & (centre_x < 0.6)), centre_x
        assert np.all((0.25 < centre_y) & (centre_y < 0.55)), centre_y
        assert np.all((0.25 < height) & (height < 0.5)), height
        # the crop is a face: the middle is brighter and busier than the black border would be
        assert found.crops[:, 80:150, 80:150].std() > 20


@pytest.fixture(scope="module")
def moving_face_clip(shared_data, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A real clip's frames at half size, sliding across a larger grey canvas (left to right, then down)."""
    source = all_frames(clips(shared_data)[3])
    n = len(source)
    canvas_h, canvas_w = 480, 640
    offsets = np.stack([np.linspace(0, canvas_w - 240, n), np.linspace(0, canvas_h - 180, n)], axis=1).round().astype(int)
    frames = []
    for rgb, (x, y) in zip(source, offsets):
        canvas = np.full((canvas_h, canvas_w, 3), 90, dtype=np.uint8)
        canvas[y:y + 180, x:x + 240] = rgb[::2, ::2]
        frames.append(canvas)
    path = write_video(tmp_path_factory.mktemp("moving") / "moving.mp4", frames)
    return path, offsets


def test_the_track_follows_a_face_moving_across_the_frame(moving_face_clip, shared_data):
    path, offsets = moving_face_clip
    found = face_clip(path, SETTINGS)
    assert found is not None and found.detected.sum() >= 7
    still = face_clip(clips(shared_data)[3], SETTINGS)
    sampled = sample_frames(path)
    rate = 30.0
    for i, t in enumerate(sampled.times):
        x, y = offsets[int(round(t * rate))]
        # where the still clip's face lands after halving and shifting, in fractions of the canvas
        sx0, sy0, sx1, sy1 = still.boxes[i] * np.array([480, 360, 480, 360])
        expected = np.array([(x + (sx0 + sx1) / 4) / 640, (y + (sy0 + sy1) / 4) / 480])
        centre = np.array([(found.boxes[i, 0] + found.boxes[i, 2]) / 2, (found.boxes[i, 1] + found.boxes[i, 3]) / 2])
        assert np.abs(centre - expected).max() < 0.04, (i, centre, expected)
    centres = (found.boxes[:, 0] + found.boxes[:, 2]) / 2
    assert np.all(np.diff(centres) > 0)


def test_a_clip_without_a_face_is_missing_video_not_an_error(tmp_path):
    rng = np.random.default_rng(0)
    scene = [np.clip(rng.normal(120, 40, (240, 320, 3)), 0, 255).astype(np.uint8) for _ in range(45)]
    tone = (0.2 * np.sin(np.arange(16000 * 1.5) * 2 * np.pi * 220 / 16000)).astype(np.float32)
    path = write_video(tmp_path / "noface.mp4", scene, audio=tone)
    assert face_clip(path, SETTINGS) is None
    sample = Sample(id="noface", video_path=str(path), audio_path=str(path))
    prepared = prepare_sample(sample, {VIDEO, "audio"}, PreprocessSpec(faces=SETTINGS))
    assert prepared.video is None and prepared.present[VIDEO] is False
    assert prepared.absent_reasons == {VIDEO: NO_FACE}
    assert prepared.audio is not None and prepared.audio.shape[0] > 16000


def box(x: float, y: float, side: float = 100.0, score: float = 5.0) -> np.ndarray:
    return np.array([[x, y, x + side, y + side, score]], dtype=np.float32)


def test_the_tracker_holds_the_last_box_and_ignores_a_far_false_detection():
    none = np.zeros((0, 5), dtype=np.float32)
    far = box(400, 300, 40, score=1.0)  # a small false detection in a corner
    candidates = [none, box(100, 100), np.concatenate([box(110, 100), far]), far, none, box(130, 104),
                  box(140, 104, score=9.0), none]
    track = track_faces(candidates)
    assert track is not None
    assert track.detected.tolist() == [False, True, True, False, False, True, True, False]
    centres = (track.boxes[:, 0] + track.boxes[:, 2]) / 2
    # every box stays on the real face (x 150..190), never jumps to the false one at x 420
    assert np.all((140 < centres) & (centres < 200)), centres
    assert np.all(np.diff(centres) >= -1e-3)  # held or moving right, as the face did
    assert track_faces([none, none]) is None


def test_seeking_decodes_fewer_frames_and_picks_the_same_ones(shared_data, tmp_path):
    frames = [f for clip in clips(shared_data)[:4] for f in all_frames(clip)]  # ~8 s of real video
    path = write_video(tmp_path / "long.mp4", frames, gop=30)
    seek = sample_frames(path, num_frames=8, seek=True)
    linear = sample_frames(path, num_frames=8, seek=False)
    assert seek.times == linear.times
    np.testing.assert_array_equal(seek.rgb(), linear.rgb())
    assert seek.seeks > 0 and seek.decoded < linear.decoded < decode_all_frames(path)
    # a clip with one keyframe (the shared Flash videos) cannot seek: same frames, decoded in one pass
    flv = clips(shared_data)[0]
    assert sample_frames(flv, seek=True).decoded == sample_frames(flv, seek=False).decoded


def test_face_crops_are_cached_and_no_face_is_cached_too(shared_data, tmp_path, monkeypatch):
    path = clips(shared_data)[0]
    first = face_clip(path, SETTINGS, cache_dir=tmp_path, cache_key="clip0")
    calls = []
    monkeypatch.setattr(faces, "faces_in_frames", lambda *a, **k: calls.append(1))
    again = face_clip(path, SETTINGS, cache_dir=tmp_path, cache_key="clip0")
    assert not calls
    np.testing.assert_array_equal(first.crops, again.crops)
    np.testing.assert_array_equal(first.boxes, again.boxes)
    assert face_clip(path, SETTINGS, cache_dir=tmp_path, cache_key="empty") is None and calls == [1]
    assert face_clip(path, SETTINGS, cache_dir=tmp_path, cache_key="empty") is None and calls == [1]
