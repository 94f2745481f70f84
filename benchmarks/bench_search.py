"""Search benchmark: N trials of enhanced late fusion over the frozen branches' cached logits, against
the same search recomputing the branches in every trial (ratio in one run).

    HF_HUB_OFFLINE=1 python benchmarks/bench_search.py [--trials 50] [--recompute-trials 50]
        [--preset NAME [--set key=value ...]] [--branch-epochs 30] [--fusion-epochs 20] [--threads 1]

Both arms run the default search space (fusion-stage learning rate, batch size 4/6/8, video branch
weight 0.3..0.8) with the same sampler seed and no pruning, on one RAVDESS data bundle loaded once:

1. cached: `emofuse search` as shipped: the branches train once for the study, every trial trains
   only the fusion over their cached outputs (the one-off branch training is included in its time);
2. recompute: every trial trains its branches from scratch in a fresh folder with a fresh cache,
   computes their outputs, then trains the fusion.

The default config is the reference comparison on RAVDESS with a feature-table audio branch, so both
arms run on 2 CPU cores: a "video" branch over the per-clip facial action units and an "audio_text"
branch over the MFCC values (both `features` encoders), fused by `enhanced-late` with the focal
loss. `--preset` runs any fused preset instead (e.g. ravdess-reference, whose mm-lstm branch makes
`--recompute-trials 2` advisable: the recompute arm's per-trial time is then extrapolated).
Since training is deterministic, both arms must find the same best value: it is checked.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
import torch

from emofuse.core.config import RunConfig, validate
from emofuse.core.presets import compose_config
from emofuse.core.registry import get_registry
from emofuse.core.apps.search import SearchOptions, Study, TrainRunTrainer, load_search_data
from emofuse.core.apps.search_space import default_space


class RecomputingTrainer(TrainRunTrainer):
    """`train_run` with nothing to reuse: each trial gets its own output folder and cache."""

    def __init__(self, registry: Any, root: Path):
        super().__init__(registry, progress=False)
        self.root = root

    def train(self, config: RunConfig, *, on_epoch: Callable, data: Any,
              branch_checkpoints: Mapping[str, Path] | None) -> Any:
        fresh = self.root / config.name
        isolated = config.model_copy(update={"output_dir": fresh, "cache_dir": fresh / ".cache"})
        return super().train(isolated, on_epoch=on_epoch, data=data, branch_checkpoints=None)


def feature_pair_config(out: Path, branch_epochs: int, fusion_epochs: int) -> RunConfig:
    return validate({
        "name": "bench-search",
        "data": {"dataset": "ravdess", "split": "speaker"},
        "branches": {"video": {"name": "features", "features": ["au"]},
                     "audio_text": {"name": "features", "features": ["mfcc"]}},
        "fusion": {"name": "enhanced-late"},
        "loss": {"name": "focal", "alpha": 1.0, "gamma": 2.0},
        "train": {"epochs": branch_epochs, "batch_size": 32, "lr": 1e-3, "patience": branch_epochs},
        "fusion_train": {"epochs": fusion_epochs, "batch_size": 4, "lr": 1e-4, "grad_accumulation": 4,
                         "warmup_fraction": 0.1, "patience": fusion_epochs},
        "output_dir": str(out),
    })


def run_arm(config: RunConfig, *, scope: str, trials: int, trainer: Any, data: Any, out: Path) -> dict[str, Any]:
    options = SearchOptions(study_name=f"bench-{scope}", storage=f"sqlite:///{out / 'studies.db'}", n_trials=trials,
                            scope=scope, pruner="none", sampler_seed=0, out_dir=out / scope)
    start = time.perf_counter()
    study = Study(config, options, trainer=trainer, data=data)
    study.optimize()
    wall = time.perf_counter() - start
    done = study.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    durations = [t.duration.total_seconds() for t in done]
    return {"scope": scope, "trials": len(done), "wall_s": round(wall, 2),
            "trial_s_mean": round(sum(durations) / len(durations), 3),
            "one_off_s": round(wall - sum(durations), 2),
            "best_value": study.study.best_value, "best_params": study.study.best_params,
            "values": [t.value for t in done]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--recompute-trials", type=int, default=None, help="trials of the slow arm (default: --trials)")
    parser.add_argument("--preset", default=None, help="a fused preset instead of the feature pair")
    parser.add_argument("--branch-epochs", type=int, default=30)
    parser.add_argument("--fusion-epochs", type=int, default=20)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key.path=value for --preset runs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = args.out or Path(tempfile.mkdtemp(prefix="emofuse-bench-search-"))
    recompute_trials = args.recompute_trials or args.trials
    try:
        if args.preset:
            config = compose_config(preset=args.preset, overrides={"output_dir": str(out)}, sets=args.sets)
        else:
            config = feature_pair_config(out, args.branch_epochs, args.fusion_epochs)
        registry = get_registry()
        # One space for both arms: the fusion stage's (what a search over frozen branches tunes).
        config = config.model_copy(update={"search": default_space(config, scope="fusion", registry=registry)})
        start = time.perf_counter()
        data = load_search_data(config, registry, out)
        load_s = time.perf_counter() - start
        cached = run_arm(config, scope="fusion", trials=args.trials, trainer=TrainRunTrainer(registry, progress=False), data=data,
                         out=out)
        recompute = run_arm(config, scope="full", trials=recompute_trials,
                            trainer=RecomputingTrainer(registry, out / "recompute-runs"), data=data, out=out)
        ratio_per_trial = recompute["trial_s_mean"] / cached["trial_s_mean"]
        # The whole search of N trials each way: the cached arm's one-off branch training included.
        recompute_total = recompute["one_off_s"] + recompute["trial_s_mean"] * args.trials
        ratio_total = recompute_total / cached["wall_s"]
        n = min(len(cached["values"]), len(recompute["values"]))
        same_values = all(abs(a - b) < 1e-6 for a, b in zip(cached["values"][:n], recompute["values"][:n]))
        result = {
            "config": args.preset or "feature pair (au, mfcc) + enhanced-late + focal",
            "threads": args.threads, "data_load_s": round(load_s, 2),
            "cached": {k: v for k, v in cached.items() if k != "values"},
            "recompute": {k: v for k, v in recompute.items() if k != "values"},
            "ratio_per_trial": round(ratio_per_trial, 1),
            f"ratio_{args.trials}_trials": round(ratio_total, 1),
            "recompute_extrapolated": recompute_trials < args.trials,
            "same_trial_values": same_values,
        }
        print(json.dumps(result, indent=2))
        print(f"\n{args.trials} trials over cached branch logits: {cached['wall_s']:.1f} s "
              f"({cached['trial_s_mean']:.2f} s/trial + {cached['one_off_s']:.1f} s once); recomputing the branches: "
              f"{recompute['trial_s_mean']:.2f} s/trial -> {recompute_total:.1f} s"
              f"{' (extrapolated)' if recompute_trials < args.trials else ''}; ratio {ratio_total:.1f}x "
              f"({ratio_per_trial:.1f}x per trial); same trial values in both arms: {same_values}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0 if same_values else 1
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
