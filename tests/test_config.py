"""Run configs: layering, validation with key paths, --set parsing, TOML round trip, presets."""
from __future__ import annotations

import re

import pytest

from emofuse.core.engine.compose import build_model
from emofuse.core.config import apply_set, load_toml, parse_value, to_toml, validate
from emofuse.core.errors import ConfigError
from emofuse.core.presets import all_presets_valid, compose_config, load_presets, resolve_preset
from emofuse.core.registry import get_registry

REFERENCE_PRESETS = {"mimamo", "mm-lstm", "late-fusion", "enhanced-late-fusion"}


def test_unknown_key_is_rejected_with_its_path():
    with pytest.raises(ConfigError, match=r"train\.lrr: Extra inputs are not permitted"):
        validate({"train": {"lrr": 1}})


def test_out_of_range_value_is_rejected_with_its_path():
    with pytest.raises(ConfigError, match=r"train\.batch_size: Input should be greater than or equal to 1"):
        validate({"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"data\.split: Input should be 'speaker', 'balanced' or 'given'"):
        validate({"data": {"split": "random"}})


@pytest.mark.parametrize("text,value", [("2", 2), ("1e-4", 1e-4), ("true", True), ("[1, 2]", [1, 2]),
                                        ('"x y"', "x y"), ("focal", "focal"), ("{a = 1}", {"a": 1})])
def test_set_values_parse_as_literals(text, value):
    assert parse_value(text) == value


def test_apply_set_creates_tables_and_refuses_bad_syntax():
    cfg = apply_set({}, "fusion.gamma=2")
    assert cfg == {"fusion": {"gamma": 2}}
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_set({}, "train.lr")
    with pytest.raises(ConfigError, match="is a value, not a table"):
        apply_set({"train": 3}, "train.lr=1")


def test_reference_presets_exist_and_all_presets_validate():
    presets = load_presets()
    assert REFERENCE_PRESETS <= set(presets)
    configs = all_presets_valid(presets)
    reg = get_registry()
    for name, cfg in configs.items():
        for ref in cfg.branches.values():
            assert ref.name in reg.names("encoder"), (name, ref.name)
        if cfg.fusion:
            assert cfg.fusion.name in reg.names("fusion"), name
        assert cfg.loss.name in reg.names("loss"), name


def test_enhanced_late_fusion_preset_matches_the_reference_design():
    cfg = compose_config(preset="enhanced-late-fusion")
    assert set(cfg.branches) == {"video", "audio_text"}
    assert cfg.fusion.name == "enhanced-late"
    assert cfg.loss.name == "cross-entropy"  # the branches; the fusion stage uses focal loss
    assert cfg.fusion_loss.name == "focal" and cfg.fusion_loss.options == {"alpha": 1.0, "gamma": 2.0}
    ft = cfg.fusion_train
    assert (ft.lr, ft.batch_size, ft.grad_accumulation, ft.weight_decay, ft.patience) == (1e-4, 4, 4, 1e-4, 10)
    assert ft.warmup_fraction > 0


def test_preset_extends_cycle_is_an_error():
    presets = {"a": {"extends": ["b"]}, "b": {"extends": "a"}}
    with pytest.raises(ConfigError, match="a -> b -> a"):
        resolve_preset("a", presets)


def test_layering_file_then_overrides_then_set(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "mm-lstm"\n[train]\nlr = 0.01\nepochs = 3\n')
    cfg = compose_config(config_file=f, overrides={"train": {"epochs": 4}}, sets=["train.seed=7"])
    assert cfg.branches["audio_text"].name == "mm-lstm"
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.seed) == (0.01, 4, 7)


def test_toml_round_trip(tmp_path):
    cfg = compose_config(preset="enhanced-late-fusion", sets=["branches.video.dropout=0.25", "name=\"x y\""])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert validate(load_toml(path)) == cfg


def test_component_options_are_validated_by_their_owner():
    cfg = compose_config(preset="late-fusion", sets=["fusion.no_such_option=1"])
    with pytest.raises(ConfigError, match=r"fusion\.no_such_option: Extra inputs are not permitted"):
        build_model(cfg, num_classes=8)


def test_bad_toml_file_names_the_file(tmp_path):
    f = tmp_path / "broken.toml"
    f.write_text("[train\nlr=")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_toml(f)


@pytest.mark.parametrize("path", ["train.lr", "fusion_loss.gamma", "data.val_fraction", "branches.v.dropout"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused_as_such_naming_their_key(path, value):
    raw: dict = {"branches": {"v": {"name": "features"}}, "fusion_loss": {"name": "focal"}}
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    with pytest.raises(ConfigError, match=re.escape(path) + ".*finite"):
        validate(raw)


def test_dry_run_with_nan_and_bad_set_keys_are_one_line_errors():
    from typer.testing import CliRunner

    from emofuse.cli.app import app

    runner = CliRunner()
    for args, message in ((["--set", "fusion_loss.gamma=nan"], "finite"), (["--set", "train..lr=1"], "empty"),
                          (["--limit", "0"], "limit"), (["--set", "train.lr=nan"], "finite")):
        result = runner.invoke(app, ["train", "--preset", "enhanced-late-fusion", "--dry-run", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (args, result.output)


def test_a_none_option_that_toml_cannot_hold_is_a_config_error():
    config = validate({"data": {"options": {"feature_table": None}}})
    with pytest.raises(ConfigError, match=r"data\.options\.feature_table"):
        to_toml(config)


def test_every_preset_says_what_it_is_for_and_what_it_scores():
    """`emofuse presets` is where a user picks one: each description names its use and its measured score
    (or says it was not scored); experiment configs live in benchmarks/configs, not here."""
    presets = load_presets()
    assert len(presets) <= 12
    for name, body in presets.items():
        text = body.get("description", "")
        assert len(text) > 60, name
        assert re.search(r"\d+\.\d ± \d+\.\d|\d+\.\d (%|at)|not scored", text), f"{name}: no score in {text!r}"
