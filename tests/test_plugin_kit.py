"""The plugin author's kit: the public API is enough, the shipped conformance kit runs on an outside
package's components, and `emofuse new-plugin` writes a package that passes it and trains."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import emofuse.core as api

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "emofuse-example-plugin"
EMOFUSE = Path(sys.executable).with_name("emofuse")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _run(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


def _emofuse_imports(path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("emofuse"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("emofuse")]
    return found


def test_the_public_api_names_exist_and_the_example_plugin_uses_nothing_else():
    assert api.API_VERSION.split(".")[0] == "1"
    assert all(hasattr(api, name) for name in api.__all__)
    imports = _emofuse_imports(EXAMPLE / "emofuse_example" / "plugin.py")
    assert imports, "the example plugin should import the API"
    for module, names in imports:
        assert module == "emofuse.core" and set(names) <= set(api.__all__), (module, names)


@pytest.fixture
def installed(tmp_path):
    """Install a plugin folder (copied outside the repo), uninstall it afterwards."""
    done = []

    def install(folder: Path, dist: str) -> Path:
        copy = tmp_path / folder.name
        if not copy.exists():
            shutil.copytree(folder, copy)
        pip = _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(copy), cwd=tmp_path)
        assert pip.returncode == 0, f"pip could not install {folder.name}: {pip.stderr[-2000:]}"
        done.append(dist)
        return copy

    yield install
    for dist in done:
        _run(sys.executable, "-m", "pip", "uninstall", "-y", "-q", dist, cwd=tmp_path)


def test_the_example_plugin_passes_the_shipped_conformance_kit(installed):
    copy = installed(EXAMPLE, "emofuse-example-plugin")
    result = _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=copy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "passed" in result.stdout and "failed" not in result.stdout


def test_new_plugin_writes_a_package_that_passes_the_kit_and_trains(installed, tmp_path, shared_data):
    result = _run(str(EMOFUSE), "new-plugin", "kit-demo", "--into", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    package = tmp_path / "emofuse-kit-demo"
    assert (package / "emofuse_kit_demo" / "plugin.py").is_file()
    again = _run(str(EMOFUSE), "new-plugin", "kit-demo", "--into", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    installed(package, "emofuse-kit-demo")

    listed = json.loads(_run(str(EMOFUSE), "plugins", "--json", cwd=tmp_path).stdout)["components"]
    assert {("encoder", "kit-demo-audio"), ("fusion", "kit-demo-mean")} <= {(c["kind"], c["name"]) for c in listed}

    tests = _run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=tmp_path / package.name)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]

    train = _run(str(EMOFUSE), "train", "--encoder", "audio=kit-demo-audio", "--dataset", "ravdess", "--data",
                 str(shared_data), "--limit", "120", "--epochs", "2", "--output", str(tmp_path / "runs"),
                 "--name", "kit-demo", "--set", "train.batch_size=16", cwd=tmp_path)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    meta = json.loads((tmp_path / "runs" / "kit-demo" / "model.json").read_text())
    (encoder,) = [c for c in meta["components"] if c["kind"] == "encoder"]
    assert encoder["name"] == "kit-demo-audio" and encoder["distribution"] == "emofuse-kit-demo"


def test_new_plugin_refuses_a_bad_name(tmp_path):
    result = _run(str(EMOFUSE), "new-plugin", "../Bad Name", "--into", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "plugin name" in result.stderr and not any(tmp_path.iterdir())


def test_the_kernel_a_plugin_author_reads_stays_small():
    kernel = [p for p in (REPO / "core").glob("*.py")]
    lines = sum(len(p.read_text().splitlines()) for p in kernel)
    assert lines < 1500, f"core/*.py (the kernel) has {lines} lines: move what plugins do not need to a layer"
