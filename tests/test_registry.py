"""The plugin registry: entry-point loading, provenance, broken plugins, name clashes, allow-list."""
from __future__ import annotations

import importlib.metadata as md
import sys
import types

import pytest

from emofuse.core.component import ComponentConfig
from emofuse.core.errors import PluginError
from emofuse.core.hookspecs import hookimpl
from emofuse.core.interfaces import Fusion, Loss
from emofuse.core.registry import Provider, Registry, get_registry

BUILTIN_ENTRY_POINTS = {ep.name for ep in md.entry_points(group="emofuse") if ep.dist and ep.dist.metadata["Name"] == "emofuse"}


def test_builtins_load_through_entry_points_without_problems():
    reg = Registry().load_entry_points()
    builtin_problems = [str(p) for p in reg.problems if p.provider.distribution == "emofuse"]
    assert builtin_problems == []
    assert BUILTIN_ENTRY_POINTS, "the emofuse distribution declares no entry points"
    for kind, names in {
        "encoder": {"mimamo", "mm-lstm", "features"},
        "fusion": {"weighted-late", "enhanced-late", "attention", "feature-level"},
        "loss": {"focal", "cross-entropy"},
        "dataset": {"ravdess", "crema-d", "meld", "manifest", "feature-table"},
    }.items():
        assert names <= set(reg.names(kind)), kind
        for name in names:
            prov = reg.provenance(kind, name)
            assert prov["distribution"] == "emofuse" and prov["version"]


class _MeanFusion(Fusion):
    """Mean of the branches' logits."""

    name = "test-mean"

    def forward(self, outputs):
        return sum(o.logits for o in outputs) / len(outputs)


class _OtherMeanFusion(_MeanFusion):
    """Same name, another class."""


def _plugin(**hooks):
    mod = types.ModuleType("fake_plugin")
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, hookimpl(fn))
    return mod


def test_broken_plugins_are_reported_and_skipped():
    reg = Registry()
    reg.add_plugin(_plugin(register_fusions=lambda: 1 / 0), Provider("boom", "boom-dist", "1.2"))
    reg.add_plugin(_plugin(register_losses=lambda: [object]), Provider("notaclass", "bad-dist", "0.1"))
    reg.add_plugin(_plugin(register_fusions=lambda: [_MeanFusion]), Provider("good", "good-dist", "3.0"))
    messages = [str(p) for p in reg.problems]
    assert any("boom-dist 1.2" in m and "ZeroDivisionError" in m for m in messages)
    assert any("bad-dist 0.1" in m and "not a subclass" in m for m in messages)
    assert reg.names("fusion") == ["test-mean"]
    assert reg.provenance("fusion", "test-mean") == {"plugin": "good", "distribution": "good-dist", "version": "3.0"}


def test_component_without_name_is_rejected():
    class Nameless(Loss):
        """No name."""

    reg = Registry()
    reg.add_plugin(_plugin(register_losses=lambda: [Nameless]), Provider("p", "d", "1"))
    assert reg.names("loss") == [] and "has no `name`" in str(reg.problems[0])


def test_two_plugins_claiming_one_name_is_an_error_naming_both():
    reg = Registry()
    reg.add_plugin(_plugin(register_fusions=lambda: [_MeanFusion]), Provider("first", "dist-a", "1.0"))
    with pytest.raises(PluginError) as err:
        reg.add_plugin(_plugin(register_fusions=lambda: [_OtherMeanFusion]), Provider("second", "dist-b", "2.0"))
    assert "dist-a 1.0" in str(err.value) and "dist-b 2.0" in str(err.value) and "test-mean" in str(err.value)


def test_unknown_name_lists_known_ones():
    with pytest.raises(PluginError, match="no fusion named 'nope'.*enhanced-late"):
        get_registry().get("fusion", "nope")


def test_import_failure_is_reported_with_distribution(monkeypatch):
    good = md.EntryPoint("focal", "emofuse.plugins.losses.focal", "emofuse")
    bad = md.EntryPoint("broken", "emofuse_no_such_module.plugin", "emofuse")
    monkeypatch.setattr(md, "entry_points", lambda group: [bad, good])
    reg = Registry().load_entry_points()
    assert "focal" in reg.names("loss")
    assert len(reg.problems) == 1 and "failed to import emofuse_no_such_module.plugin" in str(reg.problems[0])


def test_allow_list_restricts_loading(monkeypatch):
    monkeypatch.setenv("EMOFUSE_PLUGINS", "focal,late-fusion")
    reg = Registry().load_entry_points()
    assert reg.names("loss") == ["focal"]
    assert reg.names("encoder") == []
    assert "enhanced-late" in reg.names("fusion")


def test_component_config_rejects_unknown_and_out_of_range_keys():
    from emofuse.core.errors import ConfigError
    from pydantic import Field

    class Cfg(ComponentConfig):
        gamma: float = Field(2.0, ge=0)

    class L(Loss):
        """x"""

        name = "x"
        Config = Cfg

    with pytest.raises(ConfigError, match=r"loss\.gamma: Input should be greater than or equal to 0"):
        L.make_config({"gamma": -1}, where="loss")
    with pytest.raises(ConfigError, match=r"loss\.gama: Extra inputs are not permitted"):
        L.make_config({"gama": 1}, where="loss")
    assert sys.modules  # keep the import used
