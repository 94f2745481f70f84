"""Identity = config + data + code: an edited plugin is recomputed, with one line saying why.

The plugin is a module on ``sys.path`` (as an editable install puts it), registered in a `Registry`;
the test edits its source, reloads it, and trains again as a new process would. A last test installs a
plugin package with ``pip install -e`` and checks the identity new processes give it before and after an edit.
"""
from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from emofuse.core.config import validate
from emofuse.core.data import code_identity as ci
from emofuse.core.engine.progress import ProgressReporter, reporting
from emofuse.core.engine.training import train_run
from emofuse.core.registry import Provider, Registry

PLUGIN = textwrap.dedent('''
    """An outside encoder over the RAVDESS action units, with a frozen (cached) part."""
    import torch
    from torch import nn

    from emofuse.core import FEATURES, ComponentConfig, Encoder, EncoderOutput, hookimpl

    class Config(ComponentConfig):
        pass

    class EditedEncoder(Encoder):
        name = "edited-au"
        modalities = (FEATURES,)
        Config = Config

        def __init__(self, config, num_classes):
            super().__init__(config, num_classes)
            self.head = nn.Linear(35, num_classes)
            self.embedding_dim = 0

        def extract(self, batch):
            return [{"au": row * SCALE} for row in batch.features["au"]]

        def forward(self, batch, extracted=None):
            x = self.extracted_for(batch, extracted)["au"]
            return EncoderOutput(logits=self.head(x) * OUTPUT_SCALE)

    @hookimpl
    def register_encoders():
        return [EditedEncoder]
''')


class Notes(ProgressReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, message: str) -> None:
        self.lines.append(message)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    folder = tmp_path / "src"
    folder.mkdir()
    source = folder / "edited_plugin.py"
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(folder))

    def write(scale: str, output_scale: str):
        source.write_text(PLUGIN.replace("SCALE * ", "").replace("* SCALE", f"* {scale}")
                          .replace("* OUTPUT_SCALE", f"* {output_scale}"))
        ci.forget_hashes()  # a new process hashes the files it imports again
        module = importlib.reload(sys.modules["edited_plugin"]) if "edited_plugin" in sys.modules \
            else importlib.import_module("edited_plugin")
        registry = Registry().load_entry_points()
        registry.add_plugin(module, Provider("edited", "edited-plugin", "0.1"))
        return registry

    yield write
    sys.modules.pop("edited_plugin", None)
    ci.forget_hashes()


def fused_config(tmp_path, shared_data):
    return validate({
        "name": "edited", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "split": "speaker", "limit": 120},
        "branches": {"video": {"name": "edited-au"}, "audio": {"name": "features", "features": ["mfcc"]}},
        "fusion": {"name": "weighted-late"},
        "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "device": "cpu", "precision": "fp32"},
    })


def train(config, registry):
    notes = Notes()
    with reporting(notes):
        result = train_run(config, registry=registry, progress=False)
    return result, notes.lines


def test_editing_a_plugins_extract_or_forward_recomputes_and_says_why(tmp_path, shared_data, plugin):
    config = fused_config(tmp_path, shared_data)
    first, lines = train(config, plugin("1.0", "1.0"))
    assert lines == []

    again, lines = train(config, plugin("1.0", "1.0"))  # same code: everything reused, nothing said
    assert lines == [] and again.branch_results["video"].run_dir == first.branch_results["video"].run_dir
    video_model = first.branch_results["video"].checkpoint
    trained_at = video_model.stat().st_mtime_ns

    edited, lines = train(config, plugin("0.0", "1.0"))  # extract now returns zeros
    assert video_model.stat().st_mtime_ns != trained_at, "the branch over the edited encoder was not trained again"
    said = "\n".join(lines)
    assert "encoder 'edited-au': its source changed (edited_plugin.py): computing its features again" in said
    assert "branch run" in said and "encoder 'edited-au': its source changed (edited_plugin.py); training it again" in said
    assert "fused run" in said
    assert not any("'features'" in line for line in lines), "the unedited branch is reused without a word"
    assert sum("edited-au" in line for line in lines) == 3  # one line per reuse: features, branch, fusion

    trained_at = video_model.stat().st_mtime_ns
    _, lines = train(config, plugin("0.0", "2.0"))  # forward edited
    assert video_model.stat().st_mtime_ns != trained_at
    assert any("branch run" in line and "edited_plugin.py" in line for line in lines)


def test_a_new_provider_version_is_a_change_too(tmp_path, monkeypatch):
    old = {"provider": "edited-plugin 0.1", "sources": {}}
    new = {"provider": "edited-plugin 0.2", "sources": {}}
    assert ci.what_changed("encoder 'x'", old, new) == \
        "encoder 'x': provided by edited-plugin 0.2 now, by edited-plugin 0.1 before"
    assert ci.what_changed("encoder 'x'", old, dict(old)) is None


def test_installed_code_is_identified_by_its_version_alone_and_local_code_by_its_files():
    import torch.nn

    from emofuse.core.registry import get_registry

    identity = ci.code_identity(get_registry().cls("fusion", "weighted-late"))
    assert identity["provider"].startswith("emofuse ")
    assert list(identity["sources"]) == ["emofuse.plugins.fusions.late"]  # the framework is not hashed
    assert ci.code_identity(torch.nn.Linear)["sources"] == {}  # in site-packages: its version says it all


def test_the_code_hash_is_computed_once_per_process(monkeypatch):
    from emofuse.core.registry import get_registry

    cls = get_registry().cls("encoder", "features")
    ci.code_identity(cls)
    reads = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or original(self))
    ci.code_identity(cls)
    assert reads == []


def test_a_run_stored_without_a_record_of_its_code_is_trained_again_with_a_line(tmp_path):
    import json

    from emofuse.core.engine.run_files import RESULT_FILE, stale_note

    code = {"encoder 'x'": {"provider": "p 1", "sources": {}}}
    (tmp_path / RESULT_FILE).write_text(json.dumps({"finished": True, "fingerprint": "old"}))
    assert "kept no record of its components' code" in stale_note(tmp_path, "branch run", code)
    (tmp_path / RESULT_FILE).write_text(json.dumps({"finished": True, "fingerprint": "old", "code": code}))
    assert stale_note(tmp_path, "branch run", code) is None  # same code: another setting differs, said elsewhere
    assert stale_note(tmp_path / "absent", "branch run", code) is None


EDITABLE_PROBE = """
import json
from emofuse.core.data.code_identity import code_identity
from emofuse.core.registry import get_registry
cls = get_registry().cls("encoder", "edited-au")
print(json.dumps(code_identity(cls)))
"""


def test_an_editable_plugin_package_is_identified_by_its_version_and_its_edited_source(tmp_path):
    """The plugin as its author works on it: `pip install -e`, registered through its entry point; an edit
    of `extract` changes the identity a new process computes, so every reuse keyed by it is recomputed."""
    import json
    import os
    import subprocess

    package = tmp_path / "edited-plugin"
    (package / "edited_pkg").mkdir(parents=True)
    source = package / "edited_pkg" / "__init__.py"
    source.write_text(PLUGIN.replace("SCALE * ", "").replace("* SCALE", "* 1.0").replace("* OUTPUT_SCALE", ""))
    (package / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "edited-plugin"
        version = "0.3.0"
        [project.entry-points.emofuse]
        edited = "edited_pkg"
        [tool.setuptools]
        packages = ["edited_pkg"]
    '''))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "-e", str(package)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-2000:]
    try:
        def identity() -> dict:
            env = {k: v for k, v in os.environ.items() if k != "EMOFUSE_PLUGINS"}  # every installed plugin
            done = subprocess.run([sys.executable, "-B", "-c", EDITABLE_PROBE], capture_output=True, text=True, env=env)
            assert done.returncode == 0, done.stderr[-2000:]
            return json.loads(done.stdout.strip().splitlines()[-1])

        before = identity()
        assert before["provider"] == "edited-plugin 0.3.0" and "edited_pkg" in before["sources"]
        assert identity() == before  # the same code, the same identity
        source.write_text(source.read_text().replace("* 1.0", "* 0.0"))  # extract now returns zeros
        after = identity()
        assert after["provider"] == before["provider"]
        assert after["sources"]["edited_pkg"] != before["sources"]["edited_pkg"]
        assert ci.what_changed("edited-au", before, after)
    finally:
        subprocess.run([*pip, "uninstall", "-y", "edited-plugin"], capture_output=True)
