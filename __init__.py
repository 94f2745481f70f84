"""emofuse: multimodal emotion recognition (video, audio, text, speaker metadata) composed from plugins.

The Python API; the command line is printing around these same calls (``docs/python-api.md``)::

    import emofuse

    config = emofuse.compose("mm-lstm", epochs=3, limit=200)   # a validated RunConfig
    run = emofuse.train(config)                                   # RunResult: run_dir, checkpoint, metrics
    scores = emofuse.evaluate(run.checkpoint, split="test")       # EvaluationResult: report, files
    other = emofuse.evaluate_on(run.checkpoint, "emodb")          # CrossCorpusResult: another corpus
    table = emofuse.compare("late-fusion", seeds=[0, 1])           # ComparisonResult: ranked rows
    study = emofuse.search("late-fusion", trials=20)               # SearchResult: best params, config
    emofuse.load(run.checkpoint).predict(["clip.wav"])             # class probabilities per clip

Nothing prints: training reports epochs to the ``emofuse`` logger; a `emofuse.ProgressReporter`
subclass installed with ``with emofuse.reporting(mine):`` receives epochs, step counters and notes. Errors a caller can
fix are `emofuse.core.EmofuseError`s. Importing `emofuse` is light: each function imports what it
needs when called.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from emofuse.core.apps.compare import ComparisonResult
    from emofuse.core.apps.cross_corpus import CrossCorpusResult
    from emofuse.core.apps.evaluation import EvaluationResult
    from emofuse.core.apps.predict import Predictor
    from emofuse.core.apps.search import SearchResult
    from emofuse.core.config import RunConfig
    from emofuse.core.engine.run_files import RunResult

#: Progress reporting (`emofuse.core.engine.progress`, which imports nothing heavy).
_PROGRESS = ("ProgressReporter", "EpochProgress", "reporting")


def __getattr__(name: str) -> Any:
    if name in _PROGRESS:
        from emofuse.core.engine import progress

        return getattr(progress, name)
    if name == "__version__":  # read on demand: importlib.metadata costs a tenth of a second
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("emofuse")
        except PackageNotFoundError:  # running from a source tree that is not installed
            return "0.0.0"
    raise AttributeError(f"module 'emofuse' has no attribute {name!r}")


def compose(
    preset: str | None = None,
    *,
    config: str | Path | None = None,
    encoders: Sequence[str] | Mapping[str, str] | None = None,
    fusion: str | None = None,
    loss: str | None = None,
    sets: Sequence[str] = (),
    data: str | Path | None = None,
    dataset: str | None = None,
    labels: Sequence[str] | str | None = None,
    output: str | Path | None = None,
    name: str | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    precision: str | None = None,
    on_bad_sample: str | None = None,
    limit: int | None = None,
) -> "RunConfig":
    """One validated `RunConfig`: `preset` (registry.toml), then the `config` file, then these
    arguments, then `sets` (``"key.path=value"``); every component's options are checked by the
    component before anything runs.

    `encoders` replaces the preset's branches: ``["mm-lstm"]``, ``["video=features", "audio=mm-lstm"]``
    or ``{"video": "features"}``; one encoder and no `fusion` trains it alone. ``fusion="none"`` drops
    the fusion. `seed`, `epochs` and `precision` apply to every stage (branches and fusion alike).
    """
    from emofuse.core.engine.compose import check_components, compose_blaming_layers
    from emofuse.core.errors import ConfigError

    overrides: dict[str, Any] = {}
    replace: dict[str, Any] = {}
    if encoders:
        items = list(encoders.items()) if isinstance(encoders, Mapping) else [
            tuple(item.partition("=")[::2]) if "=" in item else (item, item) for item in encoders]
        branches = {}
        for branch, encoder in items:
            if not encoder or not branch:
                raise ConfigError(f"encoder {branch}={encoder}: expected NAME or BRANCH=NAME")
            branches[branch.replace("-", "_")] = {"name": encoder}
        replace["branches"] = branches
        if len(branches) == 1 and not fusion:
            replace["fusion"] = None
    if fusion:
        replace["fusion"] = None if fusion.lower() == "none" else {"name": fusion}
    if loss:
        replace["loss"] = {"name": loss}
    data_over: dict[str, Any] = {}
    if data is not None:
        data_over["data_dir"] = str(data)
    if dataset:
        data_over["dataset"] = dataset
    if labels:
        names = labels.split(",") if isinstance(labels, str) else labels
        data_over["options"] = {"labels": [s.strip() for s in names if s.strip()]}
    if on_bad_sample:
        data_over["on_bad_sample"] = on_bad_sample
    if limit is not None:
        data_over["limit"] = limit
    if data_over:
        overrides["data"] = data_over
    train_over: dict[str, Any] = {}
    if seed is not None:
        train_over["seed"] = seed
    if epochs is not None:
        train_over["epochs"] = epochs
    if precision:
        train_over["precision"] = precision
    if train_over:
        overrides["train"] = train_over
    if output is not None:
        overrides["output_dir"] = str(output)
    if name:
        overrides["name"] = name
    cfg = compose_blaming_layers(preset=preset, config_file=Path(config) if config else None, overrides=overrides,
                                 replace=replace, sets=list(sets))
    if train_over and cfg.fusion_train is not None:  # the stage settings apply to the fusion stage too
        cfg = cfg.model_copy(update={"fusion_train": cfg.fusion_train.model_copy(update=train_over)})
    if train_over and cfg.branch_train:  # ... and win over per-branch settings
        cfg = cfg.model_copy(update={"branch_train": {b: {**o, **train_over} for b, o in cfg.branch_train.items()}})
    check_components(cfg)
    if cfg.search:  # the [search] table too, before a train or a study starts
        from emofuse.core.apps.search import check_search_table

        check_search_table(cfg)
    return cfg


def _as_config(config: Any) -> "RunConfig":
    """A `RunConfig` as it is; a ``.toml`` path as a config file; any other string as a preset name."""
    if isinstance(config, (str, Path)):
        if str(config).endswith(".toml"):
            return compose(config=config)
        return compose(str(config))
    return config


def train(config: Any, *, resume: bool = True, overwrite: bool = False) -> "RunResult":
    """Train a composed model (a `RunConfig`, a preset name or a config file) into
    ``<output_dir>/<name>/``: one branch alone, or each branch then the fusion over them. A rerun
    resumes from the run folder's last checkpoint; a folder holding a run of another config is refused
    unless `overwrite`. Returns the run folder, best checkpoint, metrics per split and history."""
    from emofuse.core.engine.training import train_run

    return train_run(_as_config(config), resume=resume, progress=True, overwrite=overwrite)


def evaluate(
    checkpoint: str | Path,
    *,
    split: str = "test",
    data: str | Path | None = None,
    out: str | Path | None = None,
    bootstrap: int = 1000,
    without: Sequence[str] = (),
    on_bad_sample: str | None = None,
    explain: int = 0,
    baseline: bool = False,
) -> "EvaluationResult":
    """Score a checkpoint on its run's `split` (the same clips it was trained and validated apart from):
    accuracy, F1s, UA/WA, per-class metrics and the confusion matrix with `bootstrap` 95% intervals,
    written as JSON/Markdown/CSV/PNG to `out` (default ``<run>/eval-<split>``). `without` removes
    modalities at test time; `explain` N draws explanations of the first N clips; `baseline` fits the
    logistic-regression and majority baselines on the same clips (`result.baselines`)."""
    from emofuse.core.apps.evaluation import evaluate_and_write

    return evaluate_and_write(Path(checkpoint), split=split, data_dir=Path(data) if data else None,
                              out_dir=Path(out) if out else None, bootstrap=bootstrap, drop=tuple(without),
                              on_bad_sample=on_bad_sample, explain=explain, baseline=baseline)


def evaluate_on(
    checkpoint: str | Path,
    dataset: str,
    *,
    data: str | Path | None = None,
    options: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    bootstrap: int = 1000,
    without: Sequence[str] = (),
    on_bad_sample: str | None = None,
    baseline: bool = False,
) -> "CrossCorpusResult":
    """Cross-corpus evaluation (EmoBox's protocol): score a checkpoint on every clip of another corpus
    `dataset` (read from `data` with reader `options`) over the classes both name; WA, UA and macro F1 over
    them, the clips and classes left out listed; `baseline` fits the logistic-regression baselines on the
    clips the model learned from and scores them the same way. Writes the report to `out` (default
    ``<run>/cross-<dataset>``)."""
    from emofuse.core.apps.cross_corpus import evaluate_cross_corpus_and_write
    from emofuse.core.apps.evaluation import bad_sample_policy

    return evaluate_cross_corpus_and_write(Path(checkpoint), dataset, out_dir=Path(out) if out else None,
                                           data_dir=Path(data) if data else None, options=options,
                                           bootstrap=bootstrap, drop=tuple(without),
                                           on_bad_sample=bad_sample_policy(on_bad_sample), baseline=baseline)


def compare(
    config: Any,
    *,
    fusions: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    folds: int | None = None,
    baselines: bool = True,
    robustness: bool = True,
    out: str | Path | None = None,
    overwrite: bool = False,
    cross_dataset: str | None = None,
    cross_data: str | Path | None = None,
    cross_options: Mapping[str, Any] | None = None,
) -> "ComparisonResult":
    """Train each branch alone and every fusion (`fusions`, default: every registered one) over the
    same frozen branches, per seed (or over `folds` speaker folds), score all of them on the same test
    clips, beside the baselines (`baselines`) and with one modality removed (`robustness`); with
    `cross_dataset`, also on every clip of that second corpus (read from `cross_data`, default: the
    config's data folder) over the classes both name. Writes comparison.md/.csv/.json/.png to `out`;
    returns the ranked rows."""
    from emofuse.core.apps.compare import compare as run_comparison

    config = _as_config(config)
    return run_comparison(config, fusions=fusions, seeds=list(seeds), folds=folds, baselines=baselines,
                          robustness=robustness, out_dir=Path(out) if out else None, overwrite=overwrite,
                          cross_dataset=cross_dataset, cross_options=cross_options,
                          cross_data_dir=Path(cross_data) if cross_data else config.data.data_dir)


def search(
    config: Any,
    *,
    trials: int = 50,
    storage: str | None = None,
    study: str | None = None,
    resume: bool = True,
    scope: str = "auto",
    pruner: str = "median",
    seed: int | None = None,
    timeout: float | None = None,
) -> "SearchResult":
    """Tune a composed model with Optuna over its ``[search]`` space (or the default one): `trials`
    in all, in a resumable study (SQLite under the output folder by default, any storage URL).
    `scope` "fusion" reuses frozen branches, "full" retrains them per trial; `pruner` is median,
    hyperband or none. Returns the best trial, its parameters and the path of its exported config."""
    import optuna

    from emofuse.core.apps.search import SearchOptions, run_search
    from emofuse.core.errors import ConfigError

    if scope not in ("auto", "fusion", "full") or pruner not in ("median", "hyperband", "none"):
        raise ConfigError(f"scope {scope!r} / pruner {pruner!r}: expected auto|fusion|full and median|hyperband|none")
    options = SearchOptions(study_name=study, storage=storage, n_trials=trials, resume=resume, scope=scope,
                            pruner=pruner, sampler_seed=seed, timeout=timeout)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return run_search(_as_config(config), options, progress=True)


def load(checkpoint: str | Path, **kwargs: Any) -> "Predictor":
    """A checkpoint ready to predict: ``emofuse.load("runs/x/model.safetensors").predict(["clip.wav"])``."""
    from emofuse.core.apps.predict import load as load_predictor

    return load_predictor(checkpoint, **kwargs)


__all__ = ["compose", "train", "evaluate", "evaluate_on", "compare", "search", "load", *_PROGRESS]
