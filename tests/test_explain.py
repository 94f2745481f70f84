"""Explanations and video prediction end to end on a real CREMA-D clip: `predict --explain` writes a PNG
per clip, the boxes come from the face track, each branch's share adds up to the fused scores, a
clip without a face is predicted from its audio with its video reported missing, and
`explanation_png` gives the bytes a service can send."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emofuse.core.apps.explain import Explanation, explain_samples, explanation_png
from emofuse.core.apps.predict import load, predict_files
from emofuse.core.config import validate
from emofuse.core.data.preprocess import NO_FACE
from emofuse.core.engine.compose import build_model
from emofuse.core.engine.model_io import save_model
from video_helpers import write_video

LABELS = ["neutral", "happy", "sad", "angry", "fearful", "disgust"]
PNG = b"\x89PNG\r\n\x1a\n"


def fused_checkpoint(folder: Path, fusion: str) -> Path:
    """Video (MIMAMO from the FER prior) + audio-text (mm-lstm), fused; heads untrained (plumbing, not accuracy)."""
    torch.manual_seed(0)
    config = validate({
        "name": "av", "data": {"dataset": "crema-d"}, "fusion": {"name": fusion},
        "branches": {
            "video": {"name": "mimamo", "prior_labels": LABELS, "text_backbone": None, "hidden_dim": 32, "attention_dim": 8},
            "audio_text": {"name": "mm-lstm", "model_dim": 32, "lstm_hidden": 32, "attention_heads": 4},
        },
    })
    path = folder / fusion / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_model(path, build_model(config, len(LABELS)), config, LABELS)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return fused_checkpoint(tmp_path_factory.mktemp("explain"), "enhanced-late")


@pytest.fixture(scope="module")
def clip(shared_data) -> Path:
    return shared_data / "crema-d" / "media" / "1001_DFA_HAP_XX.flv"


@pytest.fixture(scope="module")
def no_face_clip(tmp_path_factory, clip) -> Path:
    """Noise for video, the real clip's speech for audio."""
    from emofuse.core.data.decode import decode_audio

    rng = np.random.default_rng(0)
    scene = [np.clip(rng.normal(120, 40, (240, 320, 3)), 0, 255).astype(np.uint8) for _ in range(60)]
    return write_video(tmp_path_factory.mktemp("noface") / "noface.mp4", scene, audio=decode_audio(clip))


def test_predict_explain_writes_a_png_per_clip_on_a_real_video(tmp_path, checkpoint, clip, no_face_clip):
    out = tmp_path / "pred.jsonl"
    records = predict_files(checkpoint, inputs=[clip, no_face_clip], text="Don't forget a jacket", out=out,
                            explain_dir=tmp_path / "explain")
    assert not any("error" in r for r in records)
    with_face, without = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(with_face["probabilities"]) == LABELS
    assert sum(with_face["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert with_face["modalities"] == ["audio", "text", "video"] and "absent" not in with_face
    # the clip without a face: predicted from audio and text, its video reported missing
    assert without["modalities"] == ["audio", "text"] and without["absent"] == {"video": NO_FACE}
    for record in (with_face, without):
        png = Path(record["explanation"])
        assert png.parent == tmp_path / "explain" and png.read_bytes().startswith(PNG)
    from PIL import Image

    with Image.open(with_face["explanation"]) as image:
        assert image.size[0] >= 1000 and image.size[1] >= 400


def test_an_explanation_holds_the_face_track_attention_and_shares_that_add_up(checkpoint, clip, no_face_clip):
    predictor = load(checkpoint, device="cpu")
    entries = predictor.to_samples([clip, no_face_clip], text="Don't forget a jacket")
    explained, blind = explain_samples(predictor, entries)
    assert isinstance(explained, Explanation) and explained.label in LABELS
    assert explained.crops.shape == (8, 224, 224, 3) and explained.attention.shape[0] == 8
    assert explained.attention.sum(axis=(1, 2)) == pytest.approx(np.ones(8), abs=1e-4)
    assert explained.frames.shape[0] == 8 and explained.detected.all()
    centres = (explained.boxes[:, :2] + explained.boxes[:, 2:]) / 2
    assert np.all((centres > 0.25) & (centres < 0.6))  # on the actor's face, mid-frame
    # enhanced-late: the fused logits are exactly the branches' weighted logits plus the class bias
    logits = np.log(explained.probabilities)
    total = sum(explained.contributions.values())
    np.testing.assert_allclose(total - total.mean(), logits - logits.mean(), atol=1e-4)
    assert set(explained.contributions) == {"video", "audio_text", "class bias"}
    assert blind.crops is None and blind.absent == {"video": NO_FACE}
    assert set(blind.branch_probabilities) == {"audio_text"}


def test_a_fusion_without_its_own_decomposition_gets_leave_one_out_shares(tmp_path, clip):
    predictor = load(fused_checkpoint(tmp_path, "attention"), device="cpu")
    entries = predictor.to_samples([clip], text="Don't forget a jacket")
    batch, decoded, bad = predictor.decode_for_explanation(entries)
    final, parts, outputs = predictor.branch_contributions(batch)
    assert not bad and set(parts) == {"video", "audio_text"}
    fusion = predictor.model.fusion
    from dataclasses import replace

    video_only = fusion({"video": outputs["video"],
                         "audio_text": replace(outputs["audio_text"], present=torch.zeros(1, dtype=torch.bool))})
    torch.testing.assert_close(parts["audio_text"], final - video_only.float())


def test_explanation_png_returns_the_bytes_of_one_clip(checkpoint, clip, tmp_path):
    predictor = load(checkpoint, device="cpu")
    data = explanation_png(predictor, clip, text="Don't forget a jacket")
    assert data.startswith(PNG) and len(data) > 20_000
    from emofuse.core.errors import DataError

    missing = tmp_path / "gone.mp4"
    with pytest.raises(DataError, match="gone.mp4"):
        explanation_png(predictor, missing)


def test_the_cli_zero_shot_model_predicts_a_real_clip_with_an_explanation(tmp_path, shared_data, clip, monkeypatch):
    from typer.testing import CliRunner

    from emofuse.cli.app import app

    runner = CliRunner()
    model = tmp_path / "fer.safetensors"
    result = runner.invoke(app, ["zero-shot", "--data", str(shared_data), "--dataset", "crema-d", "--save", str(model)])
    assert result.exit_code == 0, result.output
    assert "sampled frame" in result.output and "48" in result.output and model.is_file()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["predict", str(model), str(clip), "--explain"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(record["probabilities"]) == LABELS and record["modalities"] == ["video"]
    assert record["explanation"] == str(Path("explanations") / "1001_DFA_HAP_XX.png")
    assert (tmp_path / record["explanation"]).read_bytes().startswith(PNG)
