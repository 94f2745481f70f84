"""Refit on train + validation (``train.refit = true``): the validation speakers first choose how long
to train, then they become training data too.

A speaker-independent split keeps its validation speakers out of training only to pick the epoch;
on a small corpus (RAVDESS: 7 training actors, 2 validating) that costs the models a fifth of their
data, while a baseline fit on every non-test speaker keeps it. With refit:

1. the run trains as usual (early stopping on the validation speakers): the *selection run*;
2. the same settings train again from scratch on train + validation for the number of epochs the
   selection run kept (up to its best epoch), keeping the last weights: the *refit run*.

For a fused run each branch is refit so, the fusion's own epoch count comes from a selection fusion
(over the selection branches, in ``<run>/selection``), and the final fusion is fit over the refit
branches' outputs on train + validation (out-of-fold when ``fusion_inputs = "out-of-fold"``: branch
copies refit per fold of train + validation, with each branch's chosen epoch count).

The refit run's own ``val`` metrics score clips it trained on; the selection run's are the honest
validation numbers.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

from emofuse.core.config import RunConfig, TrainConfig
from emofuse.core.engine.run_files import RunResult

#: Sub-folder of a run holding its refit run (a branch) or its selection run (a fusion).
REFIT_DIR = "refit"
SELECTION_DIR = "selection"


def wanted(config: RunConfig) -> bool:
    """``train.refit`` refits a run's branches and its fusion alike."""
    return bool(config.train.refit)


def chosen_epochs(result: RunResult) -> int:
    """Epochs up to and including the selection run's best one (all it ran when none improved)."""
    improved = [int(r["epoch"]) for r in result.history if r.get("improved")]
    return max(improved) + 1 if improved else max(1, len(result.history))


def fixed_epochs(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """`cfg` training exactly `epochs` epochs and keeping the last weights (validation cannot choose:
    its clips are training clips now)."""
    return cfg.model_copy(update={"epochs": epochs, "patience": epochs, "keep": "last", "refit": False})


def train_and_validation(bundle: Any) -> Any:
    """`bundle` whose training split is train + validation (validation kept for the fit's bookkeeping)."""
    splits = dict(bundle.splits)
    splits["train"] = list(splits.get("train", [])) + list(splits.get("val", []))
    return dataclasses.replace(bundle, splits=splits)


def selection_config(config: RunConfig) -> RunConfig:
    """`config` without refit: the run that chooses the epochs."""
    update: dict[str, Any] = {"train": config.train.model_copy(update={"refit": False}),
                              "branch_train": {b: {k: v for k, v in o.items() if k != "refit"}
                                               for b, o in config.branch_train.items()}}
    if config.fusion_train is not None:
        update["fusion_train"] = config.fusion_train.model_copy(update={"refit": False})
    return config.model_copy(update=update)


def refit_branch(config: RunConfig, bundle: Any, run_dir: Path,
                 train: Callable[[RunConfig, Any, Path], RunResult]) -> RunResult:
    """Stage 1 with refit: the selection run in `run_dir`, then the refit run in ``run_dir/refit``.
    `train(config, bundle, run_dir)` is the stage-1 trainer."""
    selection = train(selection_config(config), bundle, run_dir)
    refit = config.model_copy(update={"train": fixed_epochs(config.train, chosen_epochs(selection))})
    return train(refit, train_and_validation(bundle), run_dir / REFIT_DIR)


@dataclasses.dataclass
class FusionRefit:
    """How a fused run's final fusion is fit once its epoch count is chosen."""

    fusion_train: TrainConfig
    bundle: Any
    branch_epochs: dict[str, int]

    def copy_config(self, copy: RunConfig) -> RunConfig:
        return refit_copy(copy, self.branch_epochs)


def refit_copy(copy: RunConfig, branch_epochs: Mapping[str, int]) -> RunConfig:
    """An out-of-fold branch copy, refit: its branch's chosen epochs on its fold of train + validation."""
    (branch,) = copy.branches
    return copy.model_copy(update={"name": f"{copy.name}-{REFIT_DIR}",
                                   "train": fixed_epochs(copy.train, branch_epochs[branch])})


def branch_epochs(branch_results: Mapping[str, RunResult]) -> dict[str, int]:
    """Each refit branch's number of epochs (the count its selection run chose)."""
    return {b: max(1, len(r.history)) for b, r in branch_results.items()}


def plan_fusion(config: RunConfig, bundle: Any, branch_results: Mapping[str, RunResult],
                train_selection: Callable[[RunConfig], RunResult]) -> FusionRefit:
    """Train (or reuse) the selection fusion and say how the final one is fit: its chosen epochs on
    train + validation; `branch_results` are the refit branches (their epoch counts are reused for
    out-of-fold copies)."""
    selection = train_selection(selection_config(config))
    fusion_train = config.fusion_train or config.train
    return FusionRefit(fixed_epochs(fusion_train, chosen_epochs(selection)), train_and_validation(bundle),
                       branch_epochs(branch_results))


__all__ = ["FusionRefit", "REFIT_DIR", "SELECTION_DIR", "branch_epochs", "chosen_epochs", "fixed_epochs",
           "plan_fusion", "refit_branch", "refit_copy", "selection_config", "train_and_validation", "wanted"]
