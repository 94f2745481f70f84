"""``train.refit``: validation speakers choose the epochs, then train too (branches and fusion)."""
from __future__ import annotations

import json

from emofuse.core.config import validate
from emofuse.core.engine import refit
from emofuse.core.engine.training import train_run


def refit_config(tmp_path, shared_data, **extra):
    features = {"name": "features", "hidden_dims": [32]}
    return validate({
        "name": "refit", "output_dir": str(tmp_path),
        "data": {"dataset": "ravdess", "data_dir": str(shared_data), "split": "speaker", "limit": 240},
        "branches": {"video": {**features, "features": ["au"]}, "audio": {**features, "features": ["mfcc"]}},
        "fusion": {"name": "enhanced-late"},
        "train": {"epochs": 5, "batch_size": 32, "lr": 3e-3, "patience": 2, "device": "cpu", "precision": "fp32",
                  "refit": True},
        "fusion_train": {"epochs": 4, "batch_size": 16, "lr": 1e-2, "patience": 2, "device": "cpu",
                         "precision": "fp32"},
        **extra,
    })


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_refit_trains_branches_and_fusion_again_on_train_and_validation(tmp_path, shared_data):
    config = refit_config(tmp_path, shared_data, fusion_inputs="out-of-fold", fusion_folds=2)
    result = train_run(config, progress=False)

    for branch, branch_result in result.branch_results.items():
        selection_dir = branch_result.run_dir.parent
        assert branch_result.run_dir.name == refit.REFIT_DIR
        chosen = max(r["epoch"] for r in _history(selection_dir) if r["improved"]) + 1
        refit_rows = _history(branch_result.run_dir)
        assert len(refit_rows) == chosen  # exactly the chosen epochs, no early stopping
        meta = json.loads((branch_result.run_dir / "model.json").read_text())
        assert meta["config"]["train"]["keep"] == "last" and meta["config"]["train"]["epochs"] == chosen

    selection = tmp_path / "refit" / refit.SELECTION_DIR
    chosen_fusion = max(r["epoch"] for r in _history(selection) if r["improved"]) + 1
    assert len(_history(result.run_dir)) == chosen_fusion
    # out-of-fold copies refit on folds of train + validation, beside the selection's copies
    names = sorted(p.name for p in (tmp_path / "branches").iterdir())
    assert sum(n.endswith("-refit") for n in names) == 4 and sum(n.endswith(("fold1of2", "fold2of2")) for n in names) == 4
    assert 0 < result.metrics["test"]["accuracy"] <= 1

    # the copies a comparison trains before its fusions are exactly those the fusion used
    from emofuse.core.data.pipeline import load_data
    from emofuse.core.engine.fusion_stage import shared_branch_runs

    bundle = load_data(config.data, ["features", "metadata", "text"], split_dir=result.run_dir)
    from emofuse.core.engine.run_files import branch_fingerprint, components_code, finished_result
    from emofuse.core.registry import get_registry

    planned = shared_branch_runs(config, bundle, result.branch_results)
    assert {cfg.name for cfg, _ in planned} == {n for n in names if "fold" in n}
    assert all(finished_result(cfg.output_dir / cfg.name,
                               branch_fingerprint(cfg, data, components_code(cfg, get_registry())))
               for cfg, data in planned)

    # a rerun reuses everything, refit branches included
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("model.safetensors")}
    again = train_run(config, progress=False)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("model.safetensors")} == stamps
    assert again.checkpoint == result.checkpoint
    assert {b: r.checkpoint for b, r in again.branch_results.items()} == \
        {b: r.checkpoint for b, r in result.branch_results.items()}


def test_the_selection_run_is_the_run_without_refit(tmp_path, shared_data):
    config = refit_config(tmp_path, shared_data)
    plain = config.model_copy(update={"train": config.train.model_copy(update={"refit": False})})
    from emofuse.core.engine.branch_stage import branch_run_config

    with_refit, without = branch_run_config(config, "video"), branch_run_config(plain, "video")
    assert with_refit.name == without.name  # same folder: a refit reuses an earlier plain run


def test_refit_data_is_train_plus_validation_and_fixed_epochs_keep_the_last_weights():
    from emofuse.core.config import TrainConfig
    from emofuse.core.data.pipeline import DataBundle, Normalizer
    from emofuse.core.types import Sample

    clips = {part: [Sample(id=f"{part}{i}", label=i % 2, speaker=f"{part}-spk") for i in range(3)]
             for part in ("train", "val", "test")}
    bundle = DataBundle(label_names=["a", "b"], splits=clips, normalizer=Normalizer())
    both = refit.train_and_validation(bundle)
    assert [s.id for s in both.splits["train"]] == ["train0", "train1", "train2", "val0", "val1", "val2"]
    assert both.splits["test"] == clips["test"] and bundle.splits["train"] == clips["train"]  # original untouched
    fixed = refit.fixed_epochs(TrainConfig(epochs=60, patience=15, refit=True), 7)
    assert (fixed.epochs, fixed.patience, fixed.keep, fixed.refit) == (7, 7, "last", False)
