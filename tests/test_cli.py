"""The typer CLI: listings, config composition, one-line errors with exit code 2."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from emofuse.cli.app import app

runner = CliRunner()


def test_plugins_lists_every_builtin_with_provider():
    result = runner.invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    names = {(c["kind"], c["name"]) for c in data["components"]}
    assert {("encoder", "mm-lstm"), ("fusion", "enhanced-late"), ("loss", "focal"), ("dataset", "ravdess")} <= names
    focal = next(c for c in data["components"] if c["name"] == "focal")
    assert focal["distribution"] == "emofuse" and focal["summary"] and "gamma" in focal["options"]


def test_plugins_table_renders():
    result = runner.invoke(app, ["plugins", "--kind", "fusion", "--options"])
    assert result.exit_code == 0 and "enhanced-late" in result.stdout


def test_presets_listing_and_show():
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 0 and "enhanced-late" in result.stdout
    result = runner.invoke(app, ["presets", "enhanced-late-fusion"])
    assert result.exit_code == 0 and "[fusion_train]" in result.stdout and 'name = "focal"' in result.stdout


def test_train_dry_run_composes_overrides():
    result = runner.invoke(app, ["train", "--preset", "enhanced-late-fusion", "--encoder", "video=features",
                                 "--encoder", "audio_text=mm-lstm", "--loss", "cross-entropy", "--seed", "5",
                                 "--set", "fusion_train.lr=0.001", "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert '[branches.video]\nname = "features"' in out and 'name = "cross-entropy"' in out
    assert "seed = 5" in out and "lr = 0.001" in out


def test_single_encoder_drops_the_fusion():
    result = runner.invoke(app, ["train", "--preset", "late-fusion", "--encoder", "mm-lstm", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "[fusion]" not in result.stdout and "[branches.mm_lstm]" in result.stdout


def test_bad_values_give_one_line_errors_with_exit_2():
    for args, expected in [
        (["train", "--preset", "nope"], "no preset named 'nope'"),
        (["train", "--preset", "mm-lstm", "--set", "train.lr=-1", "--dry-run"], "train.lr: Input should be greater than 0"),
        (["train", "--preset", "mm-lstm", "--set", "train.lrr=1", "--dry-run"], "train.lrr: Extra inputs are not permitted"),
        (["train", "--preset", "mm-lstm", "--precision", "fp8", "--dry-run"], "train.precision"),
        (["evaluate", "model.pt"], "refusing to load a pickle-based file"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert expected in " ".join(lines), (args, result.output)
        assert "Traceback" not in result.output


def test_component_options_are_checked_before_anything_runs_dry_run_included():
    runner = CliRunner()
    for sets, expected in [
        (["fusion.gamma=2"], "fusion.gamma: Extra inputs are not permitted"),
        (["fusion_loss.gamma=-1"], "fusion_loss.gamma"),
        (["fusion.init_weights=[1,2,3]"], "fusion.init_weights: 3 values for 2 branches"),
        (["data.options.no_such_option=1"], "data.options.no_such_option"),
    ]:
        args = ["train", "--preset", "ravdess-reference", "--dry-run"]
        for s in sets:
            args += ["--set", s]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and expected in result.output, (sets, result.output)


def test_train_run_checks_the_fusion_before_stage_one(tmp_path):
    from emofuse.core.config import ComponentRef, RunConfig
    from emofuse.core.engine.training import train_run
    from emofuse.core.errors import ConfigError

    config = RunConfig(branches={"a": ComponentRef(name="features"), "b": ComponentRef(name="features")},
                       fusion=ComponentRef(name="weighted-late", init_weights=[1.0]), output_dir=tmp_path)
    with pytest.raises(ConfigError, match="init_weights: 1 values for 2 branches"):
        train_run(config)
    assert not any(tmp_path.iterdir())  # nothing loaded, nothing trained, no folder made


def test_plugins_lists_a_broken_plugin_with_its_error_instead_of_crashing(monkeypatch):
    from emofuse.core import registry as registry_module
    from emofuse.core.registry import Problem, Provider, Registry

    reg = Registry().load_entry_points()
    reg.problems.append(Problem(Provider("broken", "emofuse-broken", "0.1"),
                                "failed to import broken.plugin: ImportError: no [bold]x[/] [/tmp/broken.py:3]"))
    monkeypatch.setattr(registry_module, "get_registry", lambda refresh=False: reg)
    result = CliRunner().invoke(app, ["plugins", "--options"])
    assert result.exit_code == 0, result.output
    assert "emofuse-broken 0.1" in result.output and "[/tmp/broken.py:3]" in result.output
    from emofuse.core.errors import PluginError

    with pytest.raises(PluginError, match="failed to load: emofuse-broken 0.1"):
        reg.get("encoder", "from-the-broken-plugin")
