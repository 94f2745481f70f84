"""Audio-visual corpus layouts read end to end into batches of face crops and audio: RAVDESS's
``01-`` (video with audio) and ``02-`` (video only) files, CREMA-D's ``.mp4`` video; where no separate
audio file exists the audio comes from the video's own track. The videos are made in tmp folders from
the real CREMA-D clips' frames and sound."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from emofuse.core.config import DataConfig
from emofuse.core.data.decode import decode_audio
from emofuse.core.data.pipeline import make_batch
from emofuse.core.data.preprocess import preprocess_spec
from emofuse.core.engine.compose import build_reader
from emofuse.core.types import AUDIO, METADATA, TEXT, VIDEO
from video_helpers import all_frames, write_video

MODALITIES = {VIDEO, AUDIO, TEXT, METADATA}


@pytest.fixture(scope="module")
def media(shared_data) -> Path:
    return shared_data / "crema-d" / "media"


def remux(source: Path, target: Path, *, with_audio: bool = True) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_video(target, all_frames(source), audio=decode_audio(source) if with_audio else None)


def test_ravdess_audio_visual_files_give_face_crops_and_audio_from_the_video_track(tmp_path, media):
    root = tmp_path / "ravdess"
    remux(media / "1001_DFA_HAP_XX.flv", root / "Actor_01" / "01-01-03-01-01-01-01.mp4")
    remux(media / "1001_DFA_ANG_XX.flv", root / "Actor_01" / "02-01-05-01-01-01-01.mp4", with_audio=False)
    data = DataConfig(dataset="ravdess", data_dir=tmp_path, options={"root": str(root), "feature_table": None})
    samples = {s.id: s for s in build_reader(data).samples()}
    happy, angry = samples["01-03-01-01-01-01"], samples["01-05-01-01-01-01"]
    assert happy.video_path == happy.audio_path and happy.video_path.endswith("01-01-03-01-01-01-01.mp4")
    assert angry.video_path.endswith("02-01-05-01-01-01-01.mp4") and angry.audio_path is None
    batch = make_batch([happy, angry], MODALITIES, None, spec=preprocess_spec(data))
    assert batch.video.shape == (2, 8, 3, 224, 224)
    assert batch.present[VIDEO].tolist() == [True, True]
    assert batch.present[AUDIO].tolist() == [True, False]
    assert batch.audio_lengths[0] == pytest.approx(16000 * 1.87, rel=0.05)
    assert all(bool(d.all()) for d in batch.extra["face_detected"])
    assert batch.text == ["Kids are talking by the door"] * 2


def test_crema_d_mp4_video_reads_end_to_end_with_its_own_audio(tmp_path, media, shared_data):
    root = tmp_path / "crema-d"
    remux(media / "1001_DFA_SAD_XX.flv", root / "VideoMP4" / "1001_DFA_SAD_XX.mp4")
    shutil.copy(shared_data / "crema-d" / "VideoDemographics.csv", root / "VideoDemographics.csv")
    data = DataConfig(dataset="crema-d", data_dir=tmp_path, options={"root": str(root)})
    (sample,) = build_reader(data).samples()
    assert sample.video_path == sample.audio_path and sample.video_path.endswith(".mp4")
    assert sample.label_name == "sad" and sample.age is not None
    batch = make_batch([sample], MODALITIES, None, spec=preprocess_spec(data))
    assert batch.present[VIDEO].item() and batch.present[AUDIO].item() and batch.present[METADATA].item()
    boxes = batch.extra["face_boxes"][0]
    assert boxes.shape == (8, 4) and np.all((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
    # whole frames instead, when asked: data.video.faces = "none"
    whole = DataConfig(dataset="crema-d", data_dir=tmp_path, options={"root": str(root)}, video={"faces": "none"})
    plain = make_batch([sample], MODALITIES, None, spec=preprocess_spec(whole))
    assert plain.present[VIDEO].item() and plain.extra["face_boxes"] == [None]
    assert not np.allclose(plain.video.numpy(), batch.video.numpy())
