"""The Python API: the example in docs/python-api.md runs as written on real data, the CLI's commands
are calls of these functions, and importing `emofuse` stays light."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import emofuse
from emofuse.cli import app as cli_app

REPO = Path(__file__).resolve().parents[1]


def _python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown.read_text(), flags=re.S)


def test_the_documented_example_runs_on_real_data(tmp_path, shared_data, monkeypatch):
    (example,) = _python_blocks(REPO / "docs" / "python-api.md")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMOFUSE_DATA", str(shared_data))
    printed, notes = io.StringIO(), []

    class Recorder(emofuse.ProgressReporter):  # what a library user installs to follow the calls
        def status(self, message):
            notes.append(message)

    with contextlib.redirect_stdout(printed), emofuse.reporting(Recorder()):
        exec(compile(example, "docs/python-api.md", "exec"), {"__name__": "__example__"})
    text = printed.getvalue()
    assert re.search(r"runs/api-example: val accuracy 0\.\d{3}", text), text
    assert re.search(r"test accuracy 0\.\d{3} \(95% CI 0\.\d{3} to 0\.\d{3}\)", text), text
    written = re.search(r"^written: (.*)$", text, flags=re.M).group(1).split(", ")
    assert "json" in written and (tmp_path / "runs" / "api-example" / "eval-test" / "metrics.json").exists()
    for key in ("branch:faces", "branch:again", "fusion:weighted-late", "fusion:enhanced-late"):
        assert re.search(rf"^{key} +0\.\d{{3}}$", text, flags=re.M), text
    assert (tmp_path / "runs" / "api-example" / "model.safetensors").exists()
    assert notes, "the comparison reports its steps (status lines) to the installed reporter"


@pytest.mark.parametrize(("command", "function"), [("train", "train"), ("evaluate", "evaluate"),
                                                    ("compare", "compare"), ("search", "search")])
def test_each_cli_command_is_a_call_of_the_python_api(command, function, monkeypatch, tmp_path):
    """The command hands its flags to the API function and prints what it returns."""
    seen = {}

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise Stop

    monkeypatch.setattr(emofuse, function, spy)
    args = [str(tmp_path / "model.safetensors")] if command == "evaluate" else ["--preset", "au-features"]
    result = CliRunner().invoke(cli_app.app, [command, *args])
    assert isinstance(result.exception, Stop), result.output
    if command == "evaluate":
        assert seen["args"] == (tmp_path / "model.safetensors",)
    else:
        assert seen["args"][0].name == "au-features"


def test_importing_emofuse_imports_neither_torch_nor_the_apps():
    code = "import sys, emofuse; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('emofuse.core')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_compose_takes_the_cli_flags_as_arguments(shared_data):
    config = emofuse.compose("late-fusion", encoders={"video": "features"}, fusion="enhanced-late", seed=5,
                             labels="neutral, calm", sets=["fusion_train.lr=0.001"], data=shared_data)
    assert list(config.branches) == ["video"] and config.fusion.name == "enhanced-late"
    assert config.train.seed == 5 and config.fusion_train.seed == 5 and config.fusion_train.lr == 0.001
    assert config.data.options["labels"] == ["neutral", "calm"]
    assert emofuse.compose("au-features", fusion="none").fusion is None
