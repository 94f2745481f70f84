"""Cross-corpus evaluation on real clips: a model trained on RAVDESS scored on EmoDB over the classes both
name, metrics against scikit-learn over those classes, the clips and classes left out, and the baselines
fit on the model's own training clips."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, recall_score

from emofuse.core.apps.cross_corpus import evaluate_cross_corpus, shared_classes
from emofuse.core.errors import ConfigError

#: Clips of every EmoDB class, two of them bored (a class RAVDESS lacks).
EMODB_CLIPS = ("03a01Fa", "03a01Nc", "03a01Wa", "03a02Ta", "03a04Ad", "08a02Fe", "08a02La", "08a02Na",
               "08a02Tb", "08a02Wc", "08a02Ab", "09a02La", "09a01Ea")


@pytest.fixture(scope="module")
def ravdess_speech_checkpoint(tmp_path_factory, shared_data):
    from emofuse.core.config import validate
    from emofuse.core.engine.training import train_run

    config = validate({
        "name": "speech", "output_dir": str(tmp_path_factory.mktemp("speech")),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "limit": 64},
        "branches": {"speech": {"name": "mm-lstm", "audio_backbone": "log-mel", "model_dim": 32, "lstm_hidden": 32,
                                "attention_heads": 4}},
        "train": {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu", "precision": "fp32"},
    })
    return train_run(config, progress=False, resume=False).checkpoint


@pytest.fixture(scope="module")
def emodb_folder(tmp_path_factory, shared_data):
    folder = tmp_path_factory.mktemp("emodb")
    for name in EMODB_CLIPS:
        shutil.copy(shared_data / "emodb" / "wav" / f"{name}.ogg", folder / f"{name}.ogg")
    return folder


def test_shared_classes_by_name_and_what_each_side_has_alone():
    ravdess = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
    emodb = ["neutral", "bored", "happy", "sad", "angry", "fearful", "disgust"]
    shared = shared_classes(ravdess, emodb)
    assert shared.names == ["neutral", "happy", "sad", "angry", "fearful", "disgust"]
    assert shared.model_index == [0, 2, 3, 4, 5, 6]
    assert shared.model_only == ["calm", "surprised"] and shared.corpus_only == {"bored": 0}
    with pytest.raises(ConfigError, match="share 1 class.*label_map"):
        shared_classes(["neutral", "calm"], ["neutral", "bored"])


def test_a_ravdess_model_scored_on_emodb_over_the_shared_classes(ravdess_speech_checkpoint, emodb_folder,
                                                                 shared_data):
    result = evaluate_cross_corpus(ravdess_speech_checkpoint, "emodb", data_dir=shared_data,
                                   options={"root": str(emodb_folder)}, bootstrap=50, baseline=True)
    assert (result.source, result.dataset) == ("ravdess", "emodb")
    assert result.shared.corpus_only == {"bored": 2}  # 08a02La, 09a02La left out and counted
    assert len(result.outputs.ids) == len(EMODB_CLIPS) - 2 and result.report.num_samples == 11

    # the prediction is the most probable shared class; the metrics are scikit-learn's over those classes
    index = result.shared.model_index
    truth = np.array([index.index(int(label)) for label in result.outputs.labels])
    pred = result.outputs.logits[:, index].argmax(dim=1).numpy()
    assert result.report.label_names == result.shared.names
    assert result.report.metrics["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert result.report.metrics["macro_f1"] == pytest.approx(
        f1_score(truth, pred, average="macro", labels=range(6), zero_division=0))
    present = sorted(set(truth))
    assert result.report.metrics["uar"] == pytest.approx(
        recall_score(truth, pred, average="macro", labels=present, zero_division=0))

    rows = {r["key"]: r for r in result.baselines}
    assert "baseline:majority" in rows and "baseline:speech" in rows
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and -1.0 <= row["model_minus_baseline"] <= 1.0
    # the majority class answers one shared class for every clip
    assert any(rows["baseline:majority"]["accuracy"] == pytest.approx((truth == c).mean()) for c in range(6))
    assert result.to_dict()["corpus_only_clips"] == {"bored": 2}


def test_the_cli_scores_a_checkpoint_on_another_corpus_and_writes_the_report(ravdess_speech_checkpoint, emodb_folder,
                                                                            tmp_path):
    import json

    from typer.testing import CliRunner

    from emofuse.cli.app import app

    data = tmp_path / "data"
    (data / "emodb").mkdir(parents=True)
    for clip in emodb_folder.iterdir():
        (data / "emodb" / clip.name).symlink_to(clip)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["evaluate", str(ravdess_speech_checkpoint), "--dataset", "emodb", "--data",
                                      str(data), "--out", str(out), "--bootstrap", "20", "--without", "text"])
    assert result.exit_code == 0, result.output
    assert "over the 6 classes both name" in result.output and "bored (2 clips)" in result.output
    written = json.loads((out / "cross_corpus.json").read_text())
    assert written["shared_classes"] == ["neutral", "happy", "sad", "angry", "fearful", "disgust"]
    assert written["dropped_modalities"] == ["text"] and written["num_samples"] == 11
    assert (out / "confusion_matrix.png").is_file() and (out / "cross_corpus.md").is_file()

    refused = CliRunner().invoke(app, ["evaluate", str(ravdess_speech_checkpoint), "--dataset", "emodb",
                                       "--split", "val", "--data", str(data)])
    assert refused.exit_code == 2 and "--dataset scores every clip" in refused.output


def test_a_corpus_feature_table_no_branch_reads_is_not_scaled_or_warned_about(shared_data, tmp_path, caplog):
    """EmoDB -> RAVDESS: RAVDESS joins its action-unit table, which a speech model trained on EmoDB never saw."""
    from emofuse.core.config import validate
    from emofuse.core.engine.training import train_run

    config = validate({
        "name": "emodb-speech", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "emodb", "data_dir": str(shared_data), "limit": 48},
        "branches": {"speech": {"name": "mm-lstm", "audio_backbone": "log-mel", "model_dim": 32, "lstm_hidden": 32,
                                "attention_heads": 4}},
        "train": {"epochs": 1, "batch_size": 16, "seed": 0, "device": "cpu", "precision": "fp32"},
    })
    checkpoint = train_run(config, progress=False, resume=False).checkpoint
    folder = tmp_path / "ravdess" / "Actor_01"
    folder.mkdir(parents=True)
    for name in ("03-01-01-01-01-01-01", "03-01-03-01-01-01-01", "03-01-04-01-01-01-01", "03-01-02-01-01-01-01"):
        shutil.copy(shared_data / "ravdess-speech" / "Actor_01" / f"{name}.ogg", folder / f"{name}.ogg")
    with caplog.at_level("WARNING"):
        result = evaluate_cross_corpus(checkpoint, "ravdess", data_dir=shared_data,
                                       options={"root": str(tmp_path / "ravdess")}, bootstrap=0)
    assert result.report.num_samples == 3 and result.shared.corpus_only["calm"] == 1
    assert "no training statistics" not in caplog.text
