"""`bench_meld.py`'s rows: every row names a preset or an experiment config (benchmarks/configs) that composes, and the fine-tuning budget
(`--finetune-steps`, `--finetune-epochs`) reaches every row that trains its text encoder, whether that
encoder is the branch itself or sits inside `dialogue-context`; the keys of stored runs survive config keys
added later; and the post-hoc logit adjustment of a
run's stored dev logits, checked against scikit-learn on the shifted argmax."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_meld import (  # noqa: E402
    ROWS,
    RowResult,
    config_key,
    is_finetune,
    posthoc_adjusted,
    posthoc_lines,
    row_command,
    row_config,
    trains_adjusted,
)

from emofuse.core.data.pipeline import load_data  # noqa: E402
from emofuse.core.presets import compose_config  # noqa: E402
from emofuse.core.types import TEXT  # noqa: E402

BUDGET = argparse.Namespace(sets=[], finetune_steps=250, finetune_epochs=4, data=None, limit=None)


@pytest.mark.parametrize("key", sorted(ROWS))
def test_every_row_composes_and_gets_the_budget_when_it_fine_tunes(key):
    row = ROWS[key]
    config = compose_config(**row.compose_args(), sets=list(row.sets))
    command = row_command(row, BUDGET)
    source = f"--config benchmarks/configs/{row.config}.toml" if row.config else f"--preset {row.preset}"
    assert command.startswith(f"emofuse train {source}")
    assert (row.preset is None) == (row.config is not None)
    budget = "train.steps_per_epoch=250" in command and "train.epochs=4" in command
    assert budget == is_finetune(config)


def test_a_fine_tuned_branch_without_the_context_wrapper_counts_as_fine_tuned():
    assert is_finetune(compose_config(**ROWS["finetune-mpnet-linear"].compose_args()))
    assert is_finetune(compose_config(preset="meld-finetune-mpnet"))
    assert not is_finetune(compose_config(preset="meld-text"))


def test_posthoc_adjustment_shifts_the_stored_dev_logits_by_the_log_train_prior(shared_data):
    config = compose_config(preset="meld-text", sets=[f'data.data_dir="{shared_data}"', "data.limit=300"])
    bundle = load_data(config.data, {TEXT})
    dev = bundle.splits["val"]
    labels = np.array([s.label for s in dev])
    logits = torch.randn(len(dev), bundle.num_classes, generator=torch.Generator().manual_seed(0))
    run = {"dev_logits": {s.id: row.tolist() for s, row in zip(dev, logits)}}
    plain = posthoc_adjusted(bundle, run, tau=0.0)
    assert plain["weighted_f1"] == pytest.approx(f1_score(labels, logits.argmax(-1).numpy(), average="weighted"))
    counts = bundle.class_counts("train").float().clamp(min=1.0)
    shifted = (logits - torch.log(counts / counts.sum())).argmax(-1).numpy()
    adjusted = posthoc_adjusted(bundle, run, tau=1.0)
    assert adjusted["macro_f1"] == pytest.approx(f1_score(labels, shifted, average="macro"))
    assert adjusted["weighted_f1"] == pytest.approx(f1_score(labels, shifted, average="weighted"))
    stored_before = RowResult("old", "old row", "", "", [{"weighted_f1": 0.5}])
    trained_adjusted = RowResult("adjusted", "adjusted row", "", "", [run], trained_adjusted=True)
    (line,) = posthoc_lines(bundle, [stored_before, trained_adjusted, RowResult("new", "new row", "", "", [run])])
    assert line.startswith("- new row: weighted F1 ")


def test_rows_trained_with_a_logit_adjusted_loss_are_known():
    assert trains_adjusted(row_config(ROWS["finetune-mpnet-turns"], 0, BUDGET))
    assert not trains_adjusted(row_config(ROWS["finetune-mpnet-linear"], 0, BUDGET))


def test_stored_runs_keep_their_keys_when_the_run_config_gains_a_key():
    """The one-lr row's seed 0 was stored before `train.lr_decay` existed: its key is unchanged at the
    default (cosine) and differs once the new key takes another value. (The store was re-keyed once when
    its text-only `mm-lstm` rows became `text-classifier` rows: the same parameters, initialisation and
    forward pass, compared bit for bit before the text-only form left mm-lstm.)"""
    budget = argparse.Namespace(**{**vars(BUDGET), "finetune_epochs": 5})
    key = config_key(row_config(ROWS["finetune-mpnet-onelr"], 0, budget))
    assert key == "25e3a6b9446bf257"
    assert (Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "meld_store" / f"{key}.json").is_file()
    linear = argparse.Namespace(**{**vars(budget), "sets": ["train.lr_decay=linear"]})
    assert config_key(row_config(ROWS["finetune-mpnet-onelr"], 0, linear)) != key
