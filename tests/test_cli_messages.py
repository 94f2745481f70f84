"""What the CLI says: errors print whatever their text holds, the data folder is found from where the
user works, and ``--encoder`` over a preset says what it replaced and what it kept."""
from __future__ import annotations

import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from emofuse.cli.app import app, friendly_errors
from emofuse.core.config import DataConfig
from emofuse.core.engine.compose import default_data_dir, resolve_data_dir
from emofuse.core.errors import ConfigError, PluginError

errors = typer.Typer()


@errors.command()
@friendly_errors
def fail(message: str) -> None:
    raise PluginError(message)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text() | st.from_regex(r"\[/?[a-z #0-9]*\].*\[/[a-z]*\]", fullmatch=True))
def test_the_error_printer_prints_any_message_as_one_error_line(message):
    if message.startswith("-") or "\x00" in message:  # not a message typer passes as an argument
        return
    result = CliRunner().invoke(errors, [message])
    assert result.exit_code == 2, (message, result.output, result.exception)
    assert result.output.startswith("error: ")


def test_markup_like_text_in_an_error_prints_as_written():
    result = CliRunner().invoke(errors, ["bad option [/x] in [bold]plugin[/bold]"])
    assert result.exit_code == 2 and "error: bad option [/x] in [bold]plugin[/bold]" in result.output


def test_the_default_data_folder_is_found_from_the_current_folder_not_the_install(tmp_path, monkeypatch):
    monkeypatch.delenv("EMOFUSE_DATA", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    work = tmp_path / "my-plugin" / "tests"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert default_data_dir() == tmp_path / "shared" / "data"
    assert resolve_data_dir(DataConfig()) == tmp_path / "shared" / "data"

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "corpora").mkdir(parents=True)
    monkeypatch.setenv("EMOFUSE_DATA", str(elsewhere / "corpora"))
    assert resolve_data_dir(DataConfig()) == elsewhere / "corpora"

    monkeypatch.setenv("EMOFUSE_DATA", str(elsewhere / "missing"))
    try:
        resolve_data_dir(DataConfig())
        raise AssertionError("a missing EMOFUSE_DATA folder must be refused")
    except ConfigError as exc:
        assert "EMOFUSE_DATA=" in str(exc) and "is not a folder" in str(exc)


def test_no_data_folder_anywhere_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("EMOFUSE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    if default_data_dir() is not None:  # a shared/data above the temp folder: nothing to check here
        return
    result = CliRunner().invoke(app, ["train", "--preset", "au-features", "--epochs", "1", "--output", str(tmp_path)])
    assert result.exit_code == 2
    assert "no data folder: no --data given, EMOFUSE_DATA is not set" in result.output and "--data PATH" in result.output


def test_encoder_over_a_preset_says_what_it_replaced_and_kept():
    result = CliRunner().invoke(app, ["train", "--preset", "late-fusion", "--encoder", "audio=features",
                                      "--set", 'branches.audio.features=["mfcc"]', "--dry-run"])
    assert result.exit_code == 0, result.output
    said = result.output
    assert "--encoder replaced the branches of preset 'late-fusion' (video=mimamo, audio_text=mm-lstm) with " \
           "audio=features, and its fusion 'weighted-late'" in said
    assert "kept the run name 'late-fusion' (--name to change it)" in said and "train settings epochs=20" in said
    named = CliRunner().invoke(app, ["train", "--preset", "au-features", "--encoder", "video=mm-lstm", "--name", "x",
                                     "--dry-run"])
    assert named.exit_code == 0 and "--encoder replaced" in named.output and "run name" not in named.output
    plain = CliRunner().invoke(app, ["train", "--encoder", "video=features", "--dry-run"])
    assert "--encoder replaced" not in plain.output


def test_the_cli_reporter_prints_an_engines_note_as_written():
    """Why something stored is recomputed reaches the terminal as one plain line (markup-like text too)."""
    import io

    from rich.console import Console

    from emofuse.cli.progress import RichReporter
    from emofuse.core.engine.progress import note, reporting

    out = io.StringIO()
    with reporting(RichReporter(Console(file=out, width=80))):
        note("encoder 'x[/y]': its source changed (plugin.py): computing its features again (not reusing runs/.cache/x-1)")
    assert out.getvalue() == ("encoder 'x[/y]': its source changed (plugin.py): computing its features again "
                              "(not reusing runs/.cache/x-1)\n")
