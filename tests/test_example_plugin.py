"""A third-party plugin (examples/emofuse-example-plugin) installs and shows up with no edit of emofuse."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "emofuse-example-plugin"
EMOFUSE = Path(sys.executable).with_name("emofuse")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def example_installed(tmp_path_factory):
    src = tmp_path_factory.mktemp("example") / "plugin"
    shutil.copytree(EXAMPLE, src)  # build outside the repo so no build/ folder lands in it
    _pip("install", "--no-deps", "--no-build-isolation", "-q", str(src))
    yield
    _pip("uninstall", "-y", "-q", "emofuse-example-plugin")


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(EMOFUSE), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_example_plugin_is_listed_with_its_distribution(example_installed):
    result = _run("plugins", "--json")
    assert result.returncode == 0, result.stderr
    comps = {(c["kind"], c["name"]): c for c in json.loads(result.stdout)["components"]}
    for key in [("encoder", "prosody"), ("fusion", "product-of-experts")]:
        assert comps[key]["distribution"] == "emofuse-example-plugin" and comps[key]["version"] == "0.3.0"
    assert ("fusion", "enhanced-late") in comps  # built-ins still there


def test_example_plugin_trains_in_a_composed_run(example_installed, shared_data, tmp_path):
    result = _run("train", "--encoder", "audio=prosody", "--dataset", "ravdess", "--data", str(shared_data),
                  "--limit", "120", "--epochs", "2", "--output", str(tmp_path), "--name", "prosody-run",
                  "--set", "train.batch_size=16", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = json.loads((tmp_path / "prosody-run" / "model.json").read_text())
    (enc,) = [c for c in meta["components"] if c["kind"] == "encoder"]
    assert enc["name"] == "prosody" and enc["distribution"] == "emofuse-example-plugin"
    assert 0.0 <= meta["metrics"]["test"]["accuracy"] <= 1.0
