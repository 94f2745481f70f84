"""Out-of-fold branch outputs for the fusion stage (stacking done properly).

A branch scores its own training clips with the confidence of a model that has seen them: on
RAVDESS the AU branch is 92-95% right on its training split and 60-70% on held-out speakers. A
fusion fitted on those in-sample outputs learns how far to trust each branch from numbers that
overstate it. With ``fusion_inputs = "out-of-fold"`` every branch is also trained `fusion_folds`
more times, each time without one group of training speakers, and the fusion's training split is
scored by the copy that never saw that clip's speaker: the same situation as at test time. The
final model still uses the branches trained on the whole training split; validation and test
outputs are unchanged.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from sklearn.model_selection import GroupKFold

from emofuse.core.config import RunConfig
from emofuse.core.engine.branch_outputs import BranchOutputs
from emofuse.core.engine.branch_stage import branch_run_config
from emofuse.core.errors import ConfigError
from emofuse.core.types import Sample


def speaker_folds(samples: Sequence[Sample], folds: int) -> list[list[int]]:
    """Indices of `samples` in `folds` groups with no speaker in two groups (clips without a speaker
    are their own group), balanced in size by scikit-learn's `GroupKFold`."""
    groups = [s.speaker if s.speaker is not None else f"clip:{s.id}" for s in samples]
    if len(set(groups)) < folds:
        raise ConfigError(
            f"fusion_folds: {folds} folds need at least {folds} training speakers, the training split has "
            f"{len(set(groups))}", hint="lower fusion_folds or use fusion_inputs = \"in-sample\"")
    return [held.tolist() for _, held in GroupKFold(n_splits=folds).split(groups, groups=groups)]


@dataclasses.dataclass
class FoldCopies:
    """One fold of the cross-fitting: the training clips it holds out, the bundle its branch copies
    train on (the other training clips), and each branch's copy run config."""

    held: list[int]
    bundle: Any
    configs: dict[str, RunConfig]


def fold_copies(config: RunConfig, bundle: Any) -> list[FoldCopies]:
    """The branch copies that `fusion_inputs = "out-of-fold"` trains, fold by fold."""
    train = list(bundle.splits["train"])
    out = []
    for k, held in enumerate(speaker_folds(train, config.fusion_folds)):
        held_set = set(held)
        fit_on = [s for i, s in enumerate(train) if i not in held_set]
        fold_bundle = dataclasses.replace(bundle, splits={"train": fit_on, "val": list(bundle.splits.get("val", [])),
                                                          "test": []})
        configs = {}
        for branch in config.branches:
            bcfg = branch_run_config(config, branch)
            configs[branch] = bcfg.model_copy(update={"name": f"{bcfg.name}-fold{k + 1}of{config.fusion_folds}"})
        out.append(FoldCopies(held, fold_bundle, configs))
    return out


def out_of_fold_outputs(
    config: RunConfig,
    bundle: Any,
    *,
    train_branch_copy: Callable[[RunConfig, Any], Path],
    outputs_of: Callable[[Mapping[str, Path], Any], Any],
) -> Any:
    """The training split's branch outputs, each clip scored by branch copies trained without its fold.

    `train_branch_copy(branch_config, bundle)` trains one stage-1 branch run on `bundle` and returns
    its checkpoint; `outputs_of(checkpoints, bundle)` scores the ``train`` split of `bundle` with those
    checkpoints (a `BranchOutputs`). Both come from the trainer, so fold runs are resumable and
    shared between fusions exactly like the main branch runs.
    """

    train = list(bundle.splits["train"])
    parts = []
    for fold in fold_copies(config, bundle):
        checkpoints = {branch: train_branch_copy(bcfg, fold.bundle) for branch, bcfg in fold.configs.items()}
        scored = dataclasses.replace(bundle, splits={"train": [train[i] for i in fold.held]})
        parts.append(outputs_of(checkpoints, scored))
    merged = BranchOutputs(
        ids=[i for p in parts for i in p.ids],
        labels=torch.cat([p.labels for p in parts]),
        logits={b: torch.cat([p.logits[b] for p in parts]) for b in parts[0].logits},
        embedding={b: (torch.cat([p.embedding[b] for p in parts]) if parts[0].embedding[b] is not None else None)
                   for b in parts[0].embedding},
        present={b: torch.cat([p.present[b] for p in parts]) for b in parts[0].present},
    )
    position = {sid: i for i, sid in enumerate(merged.ids)}
    return merged.take(torch.tensor([position[s.id] for s in train if s.id in position], dtype=torch.long))
