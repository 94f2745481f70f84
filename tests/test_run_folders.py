"""Run folders are protected: names stay inside --output, a finished run is not replaced by another
config without --overwrite, and one folder trains one run at a time (a lock)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from filelock import FileLock

from emofuse.core.config import DataConfig, TrainConfig, validate
from emofuse.core.engine.run_files import LOCK_FILE, train_settings
from emofuse.core.engine.training import train_run
from emofuse.core.errors import ConfigError

DATA = {"dataset": "ravdess", "limit": 120}


@pytest.fixture(scope="module")
def bundle(shared_data):
    from emofuse.core.data.pipeline import load_data

    return load_data(DataConfig(**DATA), {"features", "metadata"})


def _config(tmp: Path, name: str = "run", **train):
    return validate({"name": name, "output_dir": str(tmp), "data": DATA,
                     "branches": {"video": {"name": "features", "features": ["au"], "hidden_dims": [16]}},
                     "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, **train}})


def test_a_changed_config_does_not_replace_a_finished_run_without_overwrite(tmp_path, bundle):
    first = train_run(_config(tmp_path), data=bundle, progress=False)
    model = tmp_path / "run" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"train\.lr.*--overwrite"):
        train_run(_config(tmp_path, lr=1e-2), data=bundle, progress=False)
    assert model.stat().st_mtime_ns == stamp
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    # the same config again reuses the finished run; a device or worker change is not another config
    assert train_run(_config(tmp_path, num_workers=1), data=bundle, progress=False).metrics == first.metrics
    replaced = train_run(_config(tmp_path, lr=1e-2), data=bundle, progress=False, overwrite=True)
    assert model.stat().st_mtime_ns != stamp and replaced.history != first.history
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]


def test_a_folder_another_training_holds_is_refused(tmp_path, bundle):
    (tmp_path / "busy").mkdir()
    with FileLock(str(tmp_path / "busy" / LOCK_FILE)):
        with pytest.raises(ConfigError, match="another training"):
            train_run(_config(tmp_path, "busy"), data=bundle, progress=False)
    train_run(_config(tmp_path, "busy"), data=bundle, progress=False)  # free again once released


@pytest.mark.parametrize("name", ["../x", "../../x", "/tmp/abs", "a/../../x", "..", ".", ""])
def test_run_names_stay_inside_the_output_folder(tmp_path, name):
    with pytest.raises(ConfigError, match="name"):
        _config(tmp_path, name)


def test_a_config_file_name_cannot_lead_outside_output(tmp_path):
    from typer.testing import CliRunner

    from emofuse.cli.app import app

    cfg = tmp_path / "run.toml"
    cfg.write_text('name = "../../escaped"\n')
    result = CliRunner().invoke(app, ["train", "--config", str(cfg), "--output", str(tmp_path / "runs"),
                                      "--dry-run"])
    assert result.exit_code == 2 and "name" in result.output and not (tmp_path / "escaped").exists()


def test_every_setting_that_shapes_a_result_is_in_its_fingerprint_defaults_included():
    """No setting is left out of a run's identity to keep older runs reusable: only the machine-local
    ones (device, loader workers) and ``refit`` (the selection run shares its folder) are."""
    plain = train_settings(TrainConfig())
    assert plain["keep"] == "best" and plain["lr_decay"] == "cosine"
    assert set(TrainConfig.model_fields) - set(plain) == {"device", "num_workers", "refit"}
