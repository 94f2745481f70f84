"""`bench_meld.py`'s rows: every row names a preset that composes, and the fine-tuning budget
(`--finetune-steps`, `--finetune-epochs`) reaches every row that trains its text encoder, whether that
encoder is the branch itself or sits inside `dialogue-context`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_meld import ROWS, is_finetune, row_command  # noqa: E402

from emofuse.core.presets import compose_config  # noqa: E402

BUDGET = argparse.Namespace(sets=[], finetune_steps=250, finetune_epochs=4)


@pytest.mark.parametrize("key", sorted(ROWS))
def test_every_row_composes_and_gets_the_budget_when_it_fine_tunes(key):
    row = ROWS[key]
    config = compose_config(preset=row.preset, sets=list(row.sets))
    command = row_command(row, BUDGET)
    assert command.startswith(f"emofuse train --preset {row.preset}")
    budget = "train.steps_per_epoch=250" in command and "train.epochs=4" in command
    assert budget == is_finetune(config)


def test_a_fine_tuned_branch_without_the_context_wrapper_counts_as_fine_tuned():
    assert is_finetune(compose_config(preset="meld-finetune-mpnet-linear"))
    assert is_finetune(compose_config(preset="meld-finetune-mpnet"))
    assert not is_finetune(compose_config(preset="meld-text"))
