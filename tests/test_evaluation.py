"""Evaluating a real trained checkpoint: the run's own split, its normaliser, metrics that agree with
scikit-learn and with what the trainer recorded, report files, and modalities removed at test time."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from rich.console import Console
from typer.testing import CliRunner
from sklearn.metrics import accuracy_score, f1_score

from emofuse.cli import app as cli_app
from emofuse.core.config import validate
from emofuse.core.errors import ConfigError
from emofuse.core.apps.evaluation import evaluate_checkpoint, evaluate_and_write
from emofuse.core.data.collate import drop_modalities
from emofuse.core.types import AUDIO, FEATURES, METADATA, TEXT, VIDEO


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_data):
    from emofuse.core.engine.training import train_run

    out = tmp_path_factory.mktemp("eval-run")
    config = validate({
        "name": "au",
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "split": "speaker", "limit": 300},
        "branches": {"video": {"name": "features", "features": ["au"], "hidden_dims": [32]}},
        "train": {"epochs": 6, "batch_size": 32, "lr": 3e-3, "patience": 6, "device": "cpu", "precision": "fp32"},
        "output_dir": str(out),
    })
    result = train_run(config, progress=False, resume=False)
    return result.checkpoint


def test_scores_the_runs_own_test_split_like_the_trainer(checkpoint):
    result = evaluate_checkpoint(checkpoint, split="test", bootstrap=200)
    split = json.loads((checkpoint.parent / "split.json").read_text())
    assert set(result.outputs.ids) <= set(split["splits"]["test"])
    assert result.report.num_samples == len(result.outputs.ids) > 20

    labels = result.outputs.labels.numpy()
    preds = result.outputs.logits.argmax(1).numpy()
    assert result.report.metrics["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert result.report.metrics["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    recorded = json.loads(checkpoint.with_suffix(".json").read_text())["metrics"]["test"]
    assert result.report.metrics["accuracy"] == pytest.approx(recorded["accuracy"], abs=1e-6)
    assert result.report.metrics["accuracy"] > 1 / 8 + 0.1  # action units carry real signal
    lo, hi = result.report.intervals["accuracy"]
    assert lo <= result.report.metrics["accuracy"] <= hi
    np.testing.assert_allclose(result.outputs.probabilities.sum(1).numpy(), 1.0, rtol=1e-5)


def test_removing_the_only_informative_modality_hurts(checkpoint):
    full = evaluate_checkpoint(checkpoint, split="test", bootstrap=0)
    blind = evaluate_checkpoint(checkpoint, split="test", bootstrap=0, drop=[FEATURES])
    assert blind.dropped == (FEATURES,)
    assert blind.report.metrics["accuracy"] < full.report.metrics["accuracy"]


def test_evaluate_writes_json_markdown_and_png_and_the_cli_prints_its_tables(checkpoint, tmp_path, monkeypatch):
    result = evaluate_and_write(checkpoint, split="val", out_dir=tmp_path, bootstrap=100)
    assert set(result.files) >= {"json"} and all(Path(p).exists() for p in result.files.values())
    console = Console(record=True, width=120)
    monkeypatch.setattr(cli_app, "console", console)
    done = CliRunner().invoke(cli_app.app, ["evaluate", str(checkpoint), "--split", "val", "--out",
                                            str(tmp_path / "cli"), "--bootstrap", "0"])
    assert done.exit_code == 0, done.output
    text = console.export_text()
    assert "Macro F1" in text and "Per class" in text and str(tmp_path / "cli") in text
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["split"] == "val" and data["checkpoint"] == str(checkpoint)
    assert data["metrics"]["accuracy"] == pytest.approx(result.report.metrics["accuracy"])
    assert sum(map(sum, data["confusion_matrix"])) == result.report.num_samples
    assert "Confusion matrix" in (tmp_path / "report.md").read_text()
    assert imread(tmp_path / "confusion_matrix.png").ndim == 3


def test_bad_split_name_is_a_clear_error(checkpoint):
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        evaluate_checkpoint(checkpoint, split="dev", bootstrap=0)


def test_drop_modalities_zeroes_and_masks_without_touching_the_input(batch_factory):
    batch = batch_factory(3)
    before = batch.audio.clone()
    out = drop_modalities(batch, [AUDIO, TEXT, VIDEO, FEATURES, METADATA])
    for m in (AUDIO, TEXT, VIDEO, FEATURES, METADATA):
        assert not out.present[m].any()
        assert batch.present[m].all()
    assert out.audio.abs().sum() == 0 and out.video.abs().sum() == 0
    assert out.text == ["", "", ""]
    assert all(v.abs().sum() == 0 for v in out.features.values())
    assert torch.isnan(out.age).all() and (out.gender == 0).all()
    assert torch.equal(batch.audio, before) and batch.text[0]
    with pytest.raises(ConfigError, match="unknown modality 'smell'"):
        drop_modalities(batch, ["smell"])


def test_a_fused_checkpoint_scores_like_the_trainer_whatever_its_branch_order(tmp_path, shared_data):
    """Branches named out of alphabetical order: the feature-level fusion's inputs are positional, so a
    reload must rebuild the branches in the trained order (the sidecar's JSON sorts keys)."""
    from emofuse.core.engine.model_io import load_model
    from emofuse.core.engine.training import train_run

    features = {"name": "features", "hidden_dims": [32]}
    config = validate({
        "name": "fused",
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "split": "speaker", "limit": 240},
        "branches": {"video": {**features, "features": ["au"]}, "audio": {**features, "features": ["mfcc"]}},
        "fusion": {"name": "feature-level", "hidden": 32},
        "train": {"epochs": 4, "batch_size": 32, "lr": 3e-3, "device": "cpu", "precision": "fp32"},
        "fusion_train": {"epochs": 6, "batch_size": 16, "lr": 3e-3, "device": "cpu", "precision": "fp32"},
        "output_dir": str(tmp_path),
    })
    result = train_run(config, progress=False, resume=False)
    assert list(load_model(result.checkpoint).model.branches) == ["video", "audio"]
    for split in ("val", "test"):
        scored = evaluate_checkpoint(result.checkpoint, split=split, bootstrap=0)
        assert scored.report.metrics["accuracy"] == pytest.approx(result.metrics[split]["accuracy"], abs=1e-6)


def test_evaluate_explain_draws_the_first_clips_of_the_split(checkpoint, tmp_path):
    result = evaluate_and_write(checkpoint, split="test", out_dir=tmp_path, bootstrap=0, explain=2)
    assert result.files["explanations"] == tmp_path / "explain" and result.unexplained == 0
    pngs = sorted((tmp_path / "explain").glob("*.png"))
    split = json.loads((checkpoint.parent / "split.json").read_text())
    assert len(pngs) == 2 and {p.stem for p in pngs} <= set(split["splits"]["test"])
    assert imread(pngs[0]).shape[1] >= 300
