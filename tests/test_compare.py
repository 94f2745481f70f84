"""The comparison engine on real RAVDESS features: every fusion over the same frozen branches, a
third-party fusion registered at run time included, ranked table files, robustness columns."""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace
from typing import Mapping

import pytest
import torch
from matplotlib.image import imread
from torch import nn

from emofuse.core.apps.baselines import C_GRID
from emofuse.core.apps.compare import TrainRunTrainer, _branch_identity, aggregate, compare, fusions_to_compare
from emofuse.core.component import ComponentConfig
from emofuse.core.config import validate
from emofuse.core.errors import ConfigError
from emofuse.core.hookspecs import hookimpl
from emofuse.core.interfaces import Fusion
from emofuse.core.engine.model_io import load_model
from emofuse.core.registry import Provider, Registry
from emofuse.core.types import EncoderOutput


class MeanProbabilityFusion(Fusion):
    """Average of the present branches' probabilities, with one learnable temperature (a test plugin)."""

    name = "test-mean-probability"
    Config = ComponentConfig

    def __init__(self, config, num_classes, branches):
        super().__init__(config, num_classes, branches)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, outputs: Mapping[str, EncoderOutput]) -> torch.Tensor:
        probs = 0
        count = 0
        for out in outputs.values():
            mask = out.presence().to(out.logits.dtype).unsqueeze(1)
            probs = probs + mask * torch.softmax(out.logits / self.log_temperature.exp(), dim=1)
            count = count + mask
        return torch.log(probs / count.clamp(min=1) + 1e-8)

    def report(self):
        return {"temperature": float(self.log_temperature.detach().exp())}


class BrokenFusion(Fusion):
    """A fusion that cannot build for these branches (shows one bad plugin does not stop the table)."""

    name = "test-broken"
    Config = ComponentConfig

    def __init__(self, config, num_classes, branches):
        raise ValueError("needs exactly three branches")


class ThirdPartyPlugin:
    @hookimpl
    def register_fusions(self):
        return [MeanProbabilityFusion, BrokenFusion]


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry().load_entry_points()
    reg.add_plugin(ThirdPartyPlugin(), Provider("test-plugin", "emofuse-test-plugin", "0.0.1"))
    return reg


def tiny_config(out_dir, data_dir):
    return validate({
        "name": "tiny",
        "data": {"dataset": "ravdess", "data_dir": str(data_dir), "split": "speaker", "limit": 240},
        "branches": {
            "faces": {"name": "features", "features": ["au"], "hidden_dims": [32]},
            "voice": {"name": "features", "features": ["mfcc"], "hidden_dims": [32]},
        },
        "loss": {"name": "cross-entropy"},
        "train": {"epochs": 4, "batch_size": 32, "lr": 3e-3, "patience": 4, "device": "cpu", "precision": "fp32"},
        "fusion_train": {"epochs": 4, "batch_size": 32, "lr": 3e-2, "patience": 4, "device": "cpu", "precision": "fp32"},
        "output_dir": str(out_dir),
    })


def test_third_party_fusion_is_listed_without_any_edit(registry):
    names = fusions_to_compare(None, registry)
    assert "test-mean-probability" in names and "weighted-late" in names
    with pytest.raises(ConfigError, match="no fusion named 'nope'"):
        fusions_to_compare(["nope"], registry)


def test_compare_two_fusions_over_the_same_frozen_branches(tmp_path, shared_data, registry):
    config = tiny_config(tmp_path / "runs", shared_data)
    result = compare(config, fusions=["weighted-late", "test-mean-probability", "test-broken"], seeds=[0, 1],
                     registry=registry, bootstrap=100, out_dir=tmp_path / "cmp")

    keys = {r["key"] for r in result.rows}
    models = {"branch:faces", "branch:voice", "fusion:weighted-late", "fusion:test-mean-probability"}
    baselines = {"baseline:faces", "baseline:voice", "baseline:concatenated", "baseline:averaged", "baseline:majority"}
    assert keys == models | baselines
    assert [f["fusion"] for f in result.failures] == ["test-broken", "test-broken"]
    assert "needs exactly three branches" in result.failures[0]["error"]

    # ranked by mean test accuracy; mean and std over the two seeds
    accs = [r["accuracy"] for r in result.rows]
    assert accs == sorted(accs, reverse=True)
    assert [r["rank"] for r in result.rows] == list(range(1, 10))
    by_key = {r["key"]: r for r in result.rows}
    for key in models:
        row = by_key[key]
        assert row["seeds"] == 2 and row["accuracy_std"] is not None
        per = [r["accuracy"] for r in result.per_seed if r["key"] == row["key"]]
        assert row["accuracy"] == pytest.approx(sum(per) / 2)
        assert 0 <= row["train_accuracy"] <= 1 and 0 <= row["val_accuracy"] <= 1
        for mod in ("features", "metadata"):
            assert 0 <= row[f"accuracy_without_{mod}"] <= 1
        # the aggregated row keeps an accuracy interval (over the test clips, seeds averaged)
        lo, hi = row["accuracy_ci"]
        assert lo <= row["accuracy"] <= hi
    assert by_key["fusion:weighted-late"]["trainable_parameters"] == 2
    assert by_key["fusion:test-mean-probability"]["trainable_parameters"] == 1
    assert by_key["branch:faces"]["trainable_parameters"] > 1000
    assert by_key["branch:faces"]["checkpoint_bytes"] > 0
    # without the feature vectors both branches see nothing but metadata: near chance (8 classes)
    assert by_key["branch:faces"]["accuracy_without_features"] < by_key["branch:faces"]["accuracy"]
    # the aggregated fusion report is the mean of the seeds' reports
    temps = [r["fusion_report"]["temperature"] for r in result.per_seed if r["key"] == "fusion:test-mean-probability"]
    assert by_key["fusion:test-mean-probability"]["fusion_report"]["temperature"] == pytest.approx(sum(temps) / 2)

    # baselines: marked as such, C chosen on validation, fit on the training clips; AUs beat chance
    assert {r["kind"] for r in result.rows if r["key"] in baselines} == {"baseline"}
    assert by_key["baseline:faces"]["accuracy"] > 0.3 and by_key["baseline:majority"]["accuracy"] < 0.3
    assert all(C in C_GRID for C in by_key["baseline:faces"]["C"])  # chosen on validation, per split
    assert by_key["baseline:concatenated"]["inputs"] == by_key["baseline:faces"]["inputs"] + by_key["baseline:voice"]["inputs"]
    best = by_key[result.baseline_key]
    assert best["kind"] == "baseline" and best["accuracy"] == max(by_key[k]["accuracy"] for k in baselines)
    for key in models:  # every model paired with the strongest baseline over the same clips
        diff, (lo, hi) = by_key[key]["vs_baseline"], by_key[key]["vs_baseline_ci"]
        assert lo <= diff <= hi and diff == pytest.approx(by_key[key]["accuracy"] - best["accuracy"], abs=1e-6)
    for branch in ("faces", "voice"):  # and each branch with the regression over its own inputs
        (own,) = by_key[f"branch:{branch}"]["vs_own_baselines"]
        assert own["baseline"] == f"baseline: {branch} inputs, logistic regression"
        assert own["difference"] == pytest.approx(by_key[f"branch:{branch}"]["accuracy"] - by_key[f"baseline:{branch}"]["accuracy"], abs=1e-6)
    assert by_key["baseline:averaged"]["component"] == "averaged-regressions"

    # costs: each branch its own training time, the stage times recorded per seed
    for stage in result.stage_seconds:
        for branch, seconds in stage["branches"].items():
            row = next(r for r in result.per_seed if r["key"] == f"branch:{branch}" and r["seed"] == stage["seed"])
            assert row["train_seconds"] == pytest.approx(seconds, abs=0.01)

    # every fusion of a seed fuses the very same frozen branches
    for seed in (0, 1):
        rows = {r["key"]: r for r in result.per_seed if r["seed"] == seed}
        branch_ids = {name: _branch_identity(name, load_model(rows[f"branch:{name}"]["checkpoint"], registry=registry)
                                             .model.branches[name]) for name in ("faces", "voice")}
        for fusion in ("weighted-late", "test-mean-probability"):
            model = load_model(rows[f"fusion:{fusion}"]["checkpoint"], registry=registry).model
            assert {n: _branch_identity(n, e) for n, e in model.branches.items()} == branch_ids

    # the files: Markdown, CSV, JSON, bar chart, a confusion matrix per model
    md = (result.out_dir / "comparison.md").read_text()
    assert "fusion: test-mean-probability" in md and "Acc w/o features %" in md and "test-broken" in md
    with (result.out_dir / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 and float(rows[0]["accuracy"]) == pytest.approx(result.rows[0]["accuracy"])
    data = json.loads((result.out_dir / "comparison.json").read_text())
    assert len(data["per_seed"]) == 13 and data["ablations"] == ["text", "metadata", "features"]
    assert all(r.get("accuracy_ci") for r in data["rows"])
    assert "Δ acc vs best baseline" in md and "baseline: majority class" in md
    assert "Each branch beside the regressions over its own inputs" in md and "| faces inputs, logistic regression |" in md
    assert imread(result.out_dir / "comparison.png").std() > 0.01
    for key in keys:
        png = result.out_dir / "confusion" / f"{key.replace(':', '_')}.png"
        assert imread(png).ndim == 3
        cm = torch.tensor(data["confusion_matrices"][key])
        runs = 2 if key in models else 1  # baselines are deterministic: one fit per split
        assert int(cm.sum()) == runs * result.rows[0]["test_clips"]  # summed over both seeds


def test_aggregate_single_seed_has_no_std():
    per_seed = [{"key": "a", "model": "A", "kind": "fusion", "component": "x", "modalities": "audio", "seed": 0,
                 "accuracy": 0.5, "macro_f1": 0.4, "trainable_parameters": 2},
                {"key": "b", "model": "B", "kind": "branch", "component": "y", "modalities": "audio", "seed": 0,
                 "accuracy": 0.7, "macro_f1": 0.6, "trainable_parameters": 10}]
    rows = aggregate(per_seed)
    assert [r["key"] for r in rows] == ["b", "a"]
    assert rows[0]["accuracy_std"] is None and rows[0]["trainable_parameters"] == 10


def test_compare_needs_a_branch_and_two_for_a_named_fusion(tmp_path):
    config = validate({"branches": {"only": {"name": "features"}}, "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="a fusion needs two branches"):
        compare(config, fusions=["weighted-late"], data=SimpleNamespace(), trainer=SimpleNamespace())
    with pytest.raises(ConfigError, match="at least one branch"):
        compare(config.model_copy(update={"branches": {}}), data=SimpleNamespace(), trainer=SimpleNamespace())


def test_compare_one_branch_scores_it_beside_its_baselines_without_fusions(tmp_path, shared_data, registry):
    """A corpus with one modality (EmoDB's speech): the branch and the baselines, no fusion stage."""
    config = tiny_config(tmp_path / "runs", shared_data)
    config = config.model_copy(update={"branches": {"faces": config.branches["faces"]}})
    result = compare(config, seeds=[0], robustness=False, registry=registry, bootstrap=50)
    kinds = {r["kind"] for r in result.rows}
    assert kinds == {"branch", "baseline"} and not result.failures
    assert "fusion_inputs" not in result.stage_seconds[0]
    assert {r["key"] for r in result.rows if r["kind"] == "branch"} == {"branch:faces"}


class SpyTrainer(TrainRunTrainer):
    """The real trainer, recording which out-of-fold copy runs exist when each fusion starts."""

    def __init__(self, registry, branches_dir):
        super().__init__(registry)
        self.branches_dir = branches_dir
        self.copies_before_fusion: list[int] = []

    def train(self, config, *, data, branch_checkpoints):
        self.copies_before_fusion.append(len(list(self.branches_dir.glob("*fold*of*/result.json"))))
        return super().train(config, data=data, branch_checkpoints=branch_checkpoints)


def test_compare_cross_validates_by_speaker_and_reuses_finished_branches(tmp_path, shared_data, registry):
    config = tiny_config(tmp_path / "runs", shared_data).model_copy(update={
        "name": "compare-x", "fusion_inputs": "out-of-fold", "fusion_folds": 2})
    spy = SpyTrainer(registry, tmp_path / "runs" / "branches")
    result = compare(config, fusions=["weighted-late"], seeds=[0], folds=3, robustness=False, registry=registry,
                     bootstrap=50, trainer=spy)

    assert result.out_dir == tmp_path / "runs" / "compare-x"  # the name's prefix is not doubled
    # every fold's out-of-fold copies were trained before its fusion, and charged to the shared stage
    assert spy.copies_before_fusion == [4, 8, 12]
    assert all(stage["fusion_inputs"] > 0 for stage in result.stage_seconds) and len(result.stage_seconds) == 3
    by_key = {r["key"]: r for r in result.rows}
    assert result.folds == 3 and all(r["folds"] == 3 for r in result.rows)
    # each clip is a test clip exactly once over the folds (and in one of train/val/test in every fold)
    assert result.split_sizes["test"] * 3 == sum(result.split_sizes.values())
    assert int(torch.tensor(result.confusion["branch:faces"]).sum()) == result.split_sizes["test"]
    fusion = by_key["fusion:weighted-late"]
    per_fold = [r["accuracy"] for r in result.per_seed if r["key"] == "fusion:weighted-late"]
    assert fusion["accuracy"] == pytest.approx(sum(per_fold) / 3)
    assert len(fusion["vs_baseline_per_fold"]) == 3 and fusion["folds_above"].endswith("/3")
    assert "Folds above it" in (result.out_dir / "comparison.md").read_text()

    # a second comparison under another name trains no branch again: same folds, same fingerprints
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "branches").glob("*/model.safetensors")}
    again = compare(config.model_copy(update={"name": "other"}), fusions=["weighted-late"], seeds=[0], folds=3,
                    robustness=False, registry=registry, bootstrap=0)
    assert again.out_dir.name == "compare-other"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs" / "branches").glob("*/model.safetensors")} == stamps
    assert {r["key"]: r["accuracy"] for r in again.rows if r["kind"] == "branch"} == \
        {k: r["accuracy"] for k, r in by_key.items() if r["kind"] == "branch"}

    # `evaluate --baseline` on one fold's fusion: the same baselines, paired with that model's test clips
    import emofuse

    row = next(r for r in result.per_seed if r["key"] == "fusion:weighted-late" and r["fold"] == 0)
    evaluated = emofuse.evaluate(row["checkpoint"], out=tmp_path / "eval", bootstrap=50, baseline=True)
    rows = json.loads((tmp_path / "eval" / "baselines.json").read_text())["baselines"]
    assert rows == json.loads(json.dumps(evaluated.baselines)) and evaluated.files["baselines"].exists()
    assert [r["key"] for r in rows] == ["baseline:faces", "baseline:voice", "baseline:concatenated", "baseline:averaged",
                                        "baseline:majority"]
    fold_baselines = {r["key"]: r["accuracy"] for r in result.per_seed if r["fold"] == 0 and r["kind"] == "baseline"}
    for r in rows:  # the very fits compare made on that fold
        assert r["accuracy"] == pytest.approx(fold_baselines[r["key"]], abs=1e-6)
        assert r["model_minus_baseline"] == pytest.approx(evaluated.report.metrics["accuracy"] - r["accuracy"], abs=1e-6)
    with pytest.raises(ConfigError, match="--baseline"):
        emofuse.evaluate(row["checkpoint"], split="val", baseline=True)


def test_compare_passes_overwrite_to_every_training(monkeypatch):
    from emofuse.core.apps import compare as compare_module
    from emofuse.core.config import RunConfig

    seen = []
    monkeypatch.setattr(compare_module.training, "train_run", lambda config, **kw: seen.append(kw["overwrite"]))
    compare_module.TrainRunTrainer(Registry(), overwrite=True)._run(RunConfig(), data=None)
    compare_module.TrainRunTrainer(Registry())._run(RunConfig(), data=None)
    assert seen == [True, False]
