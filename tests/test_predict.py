"""Prediction on real RAVDESS speech: JSON lines per clip, one clear error per unreadable file while the
others are still predicted, manifests and folders, and the ``emofuse.load(...).predict`` API."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emofuse.core.engine.compose import build_model
from emofuse.core.config import validate
from emofuse.core.apps.evaluation import batches_of, normalizer_of, run_model
from emofuse.core.engine.model_io import save_model
from emofuse.core.apps.predict import load, predict_files
from emofuse.core.types import Sample

LABELS = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
STATEMENT = "Kids are talking by the door"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An audio+text model (mm-lstm over its default audio encoder and the packaged MiniLM) saved as a real checkpoint.

    Its head is untrained: these tests check the prediction plumbing, not accuracy.
    """
    torch.manual_seed(0)
    config = validate({"name": "speech", "branches": {"audio_text": {"name": "mm-lstm", "model_dim": 32,
                                                                      "lstm_hidden": 32, "attention_heads": 4}}})
    model = build_model(config, len(LABELS))
    path = tmp_path_factory.mktemp("predict") / "model.safetensors"
    save_model(path, model, config, LABELS)
    return path


@pytest.fixture(scope="module")
def clips(shared_data) -> list[Path]:
    return sorted((shared_data / "ravdess-speech" / "Actor_02").glob("*.ogg"))[:3]


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return load(checkpoint, device="cpu", batch_size=4, transcribe=False)  # transcription: test_transcription.py


def test_the_cli_prints_the_records_and_exits_1_when_a_clip_failed(tmp_path, checkpoint, clips, monkeypatch):
    import io

    from rich.console import Console
    from typer.testing import CliRunner

    from emofuse.cli import app as cli_app

    corrupt = tmp_path / "truncated.ogg"
    corrupt.write_bytes(clips[0].read_bytes()[:2500])
    errors = Console(record=True, width=200, file=io.StringIO())
    monkeypatch.setattr(cli_app, "err_console", errors)
    result = CliRunner().invoke(cli_app.app, ["predict", str(checkpoint), str(clips[0]), str(corrupt), "--text",
                                              STATEMENT, "--no-transcribe"])
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == [clips[0].stem, "truncated"] and "error" in records[1]
    assert '1 of 2 clips could not be predicted' in errors.export_text()


def test_one_corrupt_file_among_good_ones(tmp_path, checkpoint, clips):
    corrupt = tmp_path / "truncated.ogg"
    corrupt.write_bytes(clips[0].read_bytes()[:2500])
    out = tmp_path / "pred.jsonl"
    returned = predict_files(checkpoint, inputs=[clips[0], corrupt, clips[1], clips[2]], text=STATEMENT, out=out)
    assert sum("error" in r for r in returned) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == json.loads(json.dumps(returned))
    assert [r["id"] for r in records] == [clips[0].stem, "truncated", clips[1].stem, clips[2].stem]
    bad = records[1]
    assert set(bad) == {"id", "path", "error"} and bad["path"] == str(corrupt)
    assert "truncated.ogg" in bad["error"] and "\n" not in bad["error"]
    for r in (records[0], records[2], records[3]):
        assert list(r["probabilities"]) == LABELS
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["modalities"] == ["audio", "text"]
        assert Path(r["path"]).is_file()


def test_api_matches_the_evaluation_path(predictor, checkpoint, clips):
    records = predictor.predict([str(c) for c in clips], text=STATEMENT)
    samples = [Sample(id=c.stem, label=0, text=STATEMENT, audio_path=str(c)) for c in clips]
    loaded = predictor.loaded
    ref = run_model(loaded.model, batches_of(samples, loaded.model.modalities, normalizer_of(loaded), batch_size=2))
    for record, probs in zip(records, ref.probabilities):
        got = torch.tensor([record["probabilities"][n] for n in LABELS])
        torch.testing.assert_close(got, probs, atol=1e-4, rtol=0)
    # Samples go in as they are; without text the model sees audio only
    (record,) = predictor.predict(Sample(id="x", audio_path=str(clips[0])))
    assert record["modalities"] == ["audio"]


def test_errors_for_missing_unsupported_and_non_media_files(tmp_path, predictor, clips):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    records = predictor.predict([tmp_path / "missing.mp3", notes, junk, clips[0]])
    assert [("error" in r) for r in records] == [True, True, True, False]
    assert "no such file" in records[0]["error"]
    assert "unsupported file type .txt" in records[1]["error"]
    assert "junk.wav" in records[2]["error"] and "on-bad-sample" not in records[2]["error"]


def test_folder_and_manifest_inputs(tmp_path, predictor, clips):
    folder = tmp_path / "clips"
    folder.mkdir()
    for c in clips[:2]:
        (folder / c.name).write_bytes(c.read_bytes())
    records = predictor.predict(folder, text=STATEMENT)
    assert [r["id"] for r in records] == [c.stem for c in clips[:2]]

    manifest = tmp_path / "clips.csv"
    manifest.write_text(
        "id,audio,text,gender\n"
        f"a,{clips[0]},{STATEMENT},female\n"
        f"b,{tmp_path / 'gone.ogg'},{STATEMENT},female\n"
        f"c,{clips[1]},,male\n"
    )
    records = predictor.predict(manifest)
    by_id = {r["id"]: r for r in records if "error" not in r}
    assert set(by_id) == {"a", "c"}
    assert by_id["a"]["modalities"] == ["audio", "metadata", "text"]
    assert by_id["c"]["modalities"] == ["audio", "metadata"]  # an empty transcript is an absent text
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and "gone.ogg" in errors[0]["error"]


def test_top_level_emofuse_load(checkpoint, clips):
    import emofuse
    from emofuse.core.apps.predict import Predictor

    predictor = emofuse.load(checkpoint, device="cpu")
    assert isinstance(predictor, Predictor) and predictor.label_names == LABELS
    (record,) = predictor.predict(clips[0], text=STATEMENT)
    assert record["id"] == clips[0].stem and record["label"] in LABELS


def test_long_audio_is_capped_with_a_warning(checkpoint, clips):
    from emofuse.core.apps.predict import DEFAULT_MAX_AUDIO_SECONDS

    assert DEFAULT_MAX_AUDIO_SECONDS is not None and DEFAULT_MAX_AUDIO_SECONDS <= 120  # bounded by default
    capped = load(checkpoint, device="cpu", max_audio_seconds=1.0)
    seen = []
    (speech,) = [enc for enc in capped.model.branches.values() if "audio" in enc.modalities]
    original = speech.forward

    def spy(batch, *args, **kwargs):
        seen.append(batch.audio.shape[1])
        return original(batch, *args, **kwargs)

    speech.forward = spy
    (record,) = capped.predict([clips[0]], text=STATEMENT)
    assert seen == [16_000]  # the model saw one second of a ~3.5 s clip
    assert "first 1 s" in record["warning"] and list(record["probabilities"]) == LABELS
    (whole,) = load(checkpoint, device="cpu", max_audio_seconds=None).predict([clips[0]], text=STATEMENT)
    assert "warning" not in whole


def test_a_manifest_for_prediction_needs_no_labels_and_names_each_row(tmp_path, checkpoint, clips):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,label,text,audio\na,joyful,{STATEMENT},{clips[0]}\nb,,{STATEMENT},{clips[1]}\n"
                        f"c,angry,{STATEMENT},{tmp_path / 'gone.ogg'}\nd,not-a-label,{STATEMENT},{tmp_path / 'gone2.ogg'}\n")
    out = tmp_path / "pred.jsonl"
    assert sum("error" in r for r in predict_files(checkpoint, manifest=manifest, out=out)) == 2
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    assert set(by_id) == {"a", "b", "c", "d"}  # each row under its own id, in the manifest's order
    assert [r["id"] for r in records] == ["a", "b", "c", "d"]
    assert "probabilities" in by_id["a"] and "probabilities" in by_id["b"]
    assert "gone.ogg does not exist" in by_id["c"]["error"] and "gone2.ogg does not exist" in by_id["d"]["error"]
