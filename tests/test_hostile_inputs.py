"""What an outside hostile-input check found (issue 34): names that leave the output folder, nested
options that pass a dry run, and messages that blame the wrong thing."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from emofuse.cli.app import app

runner = CliRunner()


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --- item 3: every name that becomes a path stays inside --output ---------------------------------------
@pytest.mark.parametrize("study", ["../../x", "{tmp}/elsewhere", "a/../../b", ".."])
def test_a_study_name_cannot_lead_out_of_the_output_folder(tmp_path, study):
    output = tmp_path / "runs"
    result = runner.invoke(app, ["search", "--preset", "ravdess-egemaps", "--output", str(output), "--trials", "1",
                                 "--study", study.format(tmp=tmp_path)])
    line = error_line(result)
    assert "--study" in line and "must be a folder name inside the output folder" in line
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "x").exists() and not (tmp_path / "b").exists()
    assert not output.exists() or not any(output.rglob("*.toml"))


# --- item 6: the dry run validates components nested in a wrapper and the [search] table ------------------
@pytest.mark.parametrize("assignment, expected", [
    ('branches.text.inner.max_text_tokens="../x"', r"branches.text.inner.max_text_tokens: Input should be a valid integer"),
    ("branches.text.inner.max_text_tokens=0", r"branches.text.inner.max_text_tokens: Input should be greater than"),
    ("branches.text.inner.bogus=1", r"branches.text.inner.bogus: Extra inputs are not permitted"),
    ("branches.text.inner.name=nope", r"no encoder named 'nope'"),
    ("search.trials={a=1}", r"search.trials: Unable to extract tag using discriminator 'type'"),
    ("search.space={a=1}", r"search.space: Unable to extract tag"),
    ('search.trials={type="int", low=1, high=3}', r"trials: Extra inputs are not permitted"),
])
def test_dry_run_refuses_bad_nested_options(assignment, expected):
    import re

    line = error_line(runner.invoke(app, ["train", "--preset", "meld-finetune", "--set", assignment, "--dry-run"]))
    assert re.search(expected, line), line


def test_dry_run_still_accepts_the_nested_presets():
    for preset in ("meld-finetune", "meld-finetune-turns", "meld-context"):
        result = runner.invoke(app, ["train", "--preset", preset, "--dry-run"])
        assert result.exit_code == 0, result.output


# --- item 9: messages -----------------------------------------------------------------------------------
@pytest.mark.parametrize("assignment, expected", [
    ("name=inf", "--set name=inf: name: Input should be a valid string"),
    ("data.dataset=nan", "--set data.dataset=nan: data.dataset: Input should be a valid string"),
    ("train.bogus=nan", "--set train.bogus=nan: train.bogus: Extra inputs are not permitted"),
    ("train.lr=nan", "--set train.lr=nan: train.lr: must be a finite number, not NaN or infinity"),
    ("branches.audio_text.model_dim=inf", "branches.audio_text.model_dim: must be a finite number"),
])
def test_a_non_finite_value_gets_the_message_of_its_key(assignment, expected):
    line = error_line(runner.invoke(app, ["train", "--preset", "mm-lstm", "--set", assignment, "--dry-run"]))
    assert expected in line, line


def test_a_bad_name_flag_is_not_blamed_on_the_preset():
    line = error_line(runner.invoke(app, ["train", "--preset", "mm-lstm", "--name", "../x", "--dry-run"]))
    assert "preset" not in line and line.startswith("error: the options given: name: run name '../x'"), line
    line = error_line(runner.invoke(app, ["train", "--preset", "mm-lstm", "--limit", "0", "--dry-run"]))
    assert line.startswith("error: the options given: data.limit"), line
    # the preset itself is still named where it is at fault, and a --set where that is
    line = error_line(runner.invoke(app, ["train", "--preset", "mm-lstm", "--set", "train.lr=0.1",
                                          "--set", "train.epochs=-1", "--dry-run"]))
    assert line.startswith("error: --set train.epochs=-1: train.epochs"), line
