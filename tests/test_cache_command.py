"""``emofuse cache``: what the feature cache holds (component, provider, size, age), and pruning it."""
from __future__ import annotations

import os
import time

import pytest
import torch
from typer.testing import CliRunner

from emofuse.cli.app import app
from emofuse.core.data.cache import FeatureCache, encoder_namespace
from emofuse.core.data.cache_inventory import inventory, prune
from emofuse.core.errors import ConfigError
from emofuse.core.registry import get_registry


def _fill(root):
    """Two real encoders' namespaces (one written 10 days ago) and one without an identity record."""
    registry = get_registry()
    features = registry.cls("encoder", "features")
    au = features(features.make_config({"features": ["au"]}), 8)
    mfcc = features(features.make_config({"features": ["mfcc"]}), 8)
    cache = FeatureCache(root)
    cache.put_many(encoder_namespace(au), ["a", "b"], [{"x": torch.ones(1000)}, {"x": torch.zeros(1000)}])
    cache.put_many(encoder_namespace(mfcc), ["a"], [{"x": torch.ones(10)}])
    cache.put_many("legacy-0123456789abcdef", ["a"], [{"x": torch.ones(10)}])
    old = time.time() - 10 * 86400
    for shard in (root / encoder_namespace(mfcc)).glob("*.safetensors"):
        os.utime(shard, (old, old))
    return encoder_namespace(au), encoder_namespace(mfcc)


def test_inventory_names_each_component_its_provider_size_and_age(tmp_path):
    au, mfcc = _fill(tmp_path)
    entries = {e.path.name: e for e in inventory(tmp_path)}
    assert set(entries) == {au, mfcc, "legacy-0123456789abcdef"}
    assert entries[au].component == "encoder 'features'" and entries[au].provider.startswith("emofuse ")
    assert entries[au].size_bytes > 8000 and entries[au].shards == 1 and entries[au].age_s < 600
    assert 9.9 < entries[mfcc].age_s / 86400 < 10.1
    assert entries["legacy-0123456789abcdef"].name == "legacy" and entries["legacy-0123456789abcdef"].provider == ""


def test_prune_by_age_component_or_all_and_a_dry_run_deletes_nothing(tmp_path):
    au, mfcc = _fill(tmp_path)
    assert [e.path.name for e in prune(tmp_path, older_than_days=5, dry_run=True)] == [mfcc]
    assert (tmp_path / mfcc).is_dir()
    assert [e.path.name for e in prune(tmp_path, older_than_days=5)] == [mfcc]
    assert not (tmp_path / mfcc).exists() and (tmp_path / au).is_dir()
    assert [e.path.name for e in prune(tmp_path, component="features")] == [au]
    assert [e.path.name for e in prune(tmp_path, everything=True)] == ["legacy-0123456789abcdef"]
    assert inventory(tmp_path) == []
    with pytest.raises(ConfigError, match="say what to delete"):
        prune(tmp_path)


def test_the_cache_command_lists_and_prunes(tmp_path):
    au, mfcc = _fill(tmp_path)
    runner = CliRunner()
    shown = runner.invoke(app, ["cache", "--cache-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "3 entries" in shown.output and "encoder 'features'" in shown.output and au in shown.output
    dry = runner.invoke(app, ["cache", "prune", "--cache-dir", str(tmp_path), "--component", "features", "--dry-run"])
    assert dry.exit_code == 0 and "would delete" in dry.output and (tmp_path / au).is_dir()
    done = runner.invoke(app, ["cache", "prune", "--cache-dir", str(tmp_path), "--all"])
    assert done.exit_code == 0 and "deleted" in done.output and inventory(tmp_path) == []
    bare = runner.invoke(app, ["cache", "prune", "--cache-dir", str(tmp_path)])
    assert bare.exit_code == 2 and "--older-than" in bare.output
