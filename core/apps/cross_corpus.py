"""Cross-corpus evaluation, as EmoBox defines it: a model trained on one corpus, scored on every clip of
another, over the classes the two share.

The built-in readers name an emotion alike wherever it is the same one (RAVDESS's names: neutral, happy,
sad, angry, fearful, disgust, ...), so the common label set is the classes both name:

- the corpus's clips of a class the model does not know (EmoDB's ``bored``) are left out, and counted;
- the model's classes the corpus lacks (RAVDESS's ``calm``, ``surprised``) are left out of its answer: its
  prediction is the most probable shared class (its logits restricted to the shared classes);
- accuracy (WA), unweighted average recall (UA) and macro F1 are computed over the shared classes.

A corpus whose names differ maps them first with its reader's ``label_map`` option. The baselines read the
same frozen inputs as the model's branches, are fit on the clips the model learned from (its run's split)
and are scored on the other corpus exactly as the model is.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from emofuse.core.apps.evaluation import (
    SplitOutputs,
    checkpoint_bundle,
    normalizer_of,
    resolve_device,
    run_model,
    scoring_batches,
)
from emofuse.core.config import DataConfig
from emofuse.core.data.preprocess import preprocess_spec
from emofuse.core.data.readers import build_reader
from emofuse.core.data.speaker_norm import PER_SPEAKER, SpeakerNormalizedFeatures, standardize_tables
from emofuse.core.engine.loaders import existing_cache, open_cache
from emofuse.core.engine.metrics import MetricReport, metric_report
from emofuse.core.engine.model_io import load_model
from emofuse.core.errors import ConfigError
from emofuse.core.registry import Registry
from emofuse.core.types import FEATURES, Sample


@dataclass
class SharedClasses:
    """The classes a model and a corpus share, in the model's order, and what each side has alone."""

    names: list[str]
    #: The model's class index of each shared class.
    model_index: list[int]
    model_only: list[str]
    #: The corpus's classes the model does not know -> clips of each left out.
    corpus_only: dict[str, int] = field(default_factory=dict)


def shared_classes(model_labels: Sequence[str], corpus_labels: Sequence[str]) -> SharedClasses:
    """The common label set by name (case-insensitive); fewer than two shared classes is refused."""
    corpus = {name.strip().lower() for name in corpus_labels}
    model = [name.strip().lower() for name in model_labels]
    names = [name for name in model if name in corpus]
    if len(names) < 2:
        raise ConfigError(
            f"the model's classes ({', '.join(model)}) and the corpus's ({', '.join(sorted(corpus))}) share "
            f"{len(names)} class(es); a cross-corpus score needs at least 2",
            hint="map the corpus's labels onto the model's with --set data.options.label_map",
        )
    return SharedClasses(names, [model.index(n) for n in names], [n for n in model if n not in corpus],
                         {n: 0 for n in sorted(corpus) if n not in model})


def relabelled(samples: Sequence[Sample], model_labels: Sequence[str], shared: SharedClasses) -> list[Sample]:
    """The corpus's clips of shared classes, labelled with the model's class index (the others counted out)."""
    index = {name: shared.model_index[i] for i, name in enumerate(shared.names)}
    kept = []
    for s in samples:
        name = (s.label_name or "").strip().lower()
        if name in index:
            kept.append(dataclasses.replace(s, label=index[name], label_name=model_labels[index[name]]))
        elif name in shared.corpus_only:
            shared.corpus_only[name] += 1
    if not kept:
        raise ConfigError("the corpus has no clips of the classes it shares with the model",
                          hint="check the corpus folder and its label set")
    return kept


def restricted_report(labels: torch.Tensor, scores: torch.Tensor, shared: SharedClasses, *, bootstrap: int,
                      seed: int) -> MetricReport:
    """Metrics over the shared classes: `labels` are model class indices, `scores` ``[N, model classes]``."""
    to_shared = torch.full((int(max(shared.model_index)) + 1,), -1, dtype=torch.long)
    to_shared[torch.tensor(shared.model_index)] = torch.arange(len(shared.names))
    return metric_report(to_shared[labels.long()], scores[:, shared.model_index].float(), shared.names,
                         bootstrap=bootstrap, seed=seed)


@dataclass
class CrossCorpusResult:
    checkpoint: Path
    #: The corpus the model was trained on, and the one it is scored on.
    source: str
    dataset: str
    shared: SharedClasses
    report: MetricReport
    #: The model's outputs over the scored clips (labels and logits in the model's own classes).
    outputs: SplitOutputs
    dropped: tuple[str, ...] = ()
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: With `baseline`: one row per baseline, scored the same way (accuracy, uar, macro_f1, its C).
    baselines: list[dict[str, Any]] | None = None
    #: What `evaluate_cross_corpus_and_write` adds: the title and the files written (kind -> path).
    title: str = ""
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "source": self.source, "dataset": self.dataset,
                "shared_classes": self.shared.names, "model_only_classes": self.shared.model_only,
                "corpus_only_clips": self.shared.corpus_only, "dropped_modalities": list(self.dropped),
                **self.report.to_dict(), "baselines": self.baselines}


def evaluate_cross_corpus(
    checkpoint: Path,
    dataset: str,
    *,
    data_dir: Path | None = None,
    options: Mapping[str, Any] | None = None,
    source_data_dir: Path | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    drop: Sequence[str] = (),
    batch_size: int = 16,
    device: str | torch.device = "auto",
    registry: Registry | None = None,
    on_bad_sample: str | None = None,
    baseline: bool = False,
) -> CrossCorpusResult:
    """Score `checkpoint` on every clip of corpus `dataset` (read from `data_dir` with reader `options`) over
    the classes both share; `baseline` also fits the logistic-regression baselines on the model's own training
    clips (its run's split, read from `source_data_dir`, default: the run's data folder) and scores them alike."""
    loaded = load_model(Path(checkpoint), registry=registry)
    policy = on_bad_sample or loaded.config.data.on_bad_sample
    target = DataConfig(dataset=dataset, data_dir=data_dir, options=dict(options or {}), on_bad_sample=policy)
    reader = build_reader(target, registry)
    if hasattr(reader, "on_bad_sample"):
        reader.on_bad_sample = policy
    samples = list(reader.samples())
    skipped = list(getattr(reader, "skipped", []))
    shared = shared_classes(loaded.label_names, reader.label_names)
    clips = relabelled(samples, loaded.label_names, shared)
    if FEATURES not in loaded.model.modalities:  # a table the corpus joins (RAVDESS's AUs) that no branch reads
        clips = [dataclasses.replace(s, features={}) for s in clips]
    if loaded.config.data.speaker_normalization == PER_SPEAKER:  # transductive, like the model's training data
        clips = standardize_tables({"test": clips})["test"]
    # The run's feature cache: its baselines read the same frozen features, so the backbone runs once per clip.
    store = target_store(loaded.config, clips, normalizer_of(loaded), existing=not baseline)
    device = resolve_device(device)
    batches = scoring_batches(loaded, clips, store=store, batch_size=batch_size, on_bad_sample=policy,
                              skipped=skipped, device=device)
    outputs = run_model(loaded.model, batches, drop=drop, device=device, store=store)
    report = restricted_report(outputs.labels, outputs.logits, shared, bootstrap=bootstrap, seed=seed)
    result = CrossCorpusResult(Path(checkpoint), loaded.config.data.dataset, dataset, shared, report, outputs,
                               tuple(drop), skipped)
    if baseline:
        scored = {s.id for s in clips} & set(outputs.ids)
        result.baselines = _baselines(loaded, [s for s in clips if s.id in scored], shared, outputs,
                                      checkpoint=Path(checkpoint), source_data_dir=source_data_dir,
                                      registry=registry, bootstrap=bootstrap, seed=seed)
    return result


def _baselines(loaded: Any, clips: list[Sample], shared: SharedClasses, outputs: SplitOutputs, *,
               checkpoint: Path, source_data_dir: Path | None, registry: Registry | None, bootstrap: int,
               seed: int) -> list[dict[str, Any]]:
    """The baselines over the model's branches, fit on its run's clips, scored on the other corpus's clips."""
    from emofuse.core.apps.baselines import baselines_over_branches, fit_splits, paired_difference

    source = checkpoint_bundle(loaded, checkpoint=checkpoint, data_dir=source_data_dir, registry=registry)
    bundle = dataclasses.replace(source, splits={"train": source.splits["train"], "val": source.splits.get("val", []),
                                                 "test": clips})
    fits = baselines_over_branches(loaded.model.branches, bundle, open_cache(loaded.config),
                                   fit_on=fit_splits(loaded.config.train.refit))
    label_of = {s.id: s.label for s in clips}
    to_shared = {m: k for k, m in enumerate(shared.model_index)}
    model_pred = dict(zip(outputs.ids, outputs.logits[:, shared.model_index].argmax(dim=1).tolist()))
    rows = []
    for f in fits:
        labels = torch.tensor([label_of[i] for i in f.ids])
        probs = torch.from_numpy(f.probabilities)
        report = restricted_report(labels, probs, shared, bootstrap=bootstrap, seed=seed)
        truth = np.array([to_shared[int(label_of[i])] for i in f.ids])
        theirs = probs[:, shared.model_index].argmax(dim=1).numpy() == truth
        mine = np.array([model_pred[i] for i in f.ids]) == truth
        diff, lo, hi = paired_difference(mine.astype(float), theirs.astype(float), resamples=bootstrap, seed=seed)
        rows.append({"key": f.key, "model": f.title, "C": f.C, "inputs": f.inputs,
                     **{k: report.metrics[k] for k in ("accuracy", "uar", "macro_f1")},
                     "model_minus_baseline": diff, "interval": [lo, hi]})
    return rows


# --- a second corpus inside a comparison ---------------------------------------------------------------------
#: What a comparison reports of each row on the second corpus, as ``cross_<metric>``.
CROSS_METRICS = ("accuracy", "uar", "macro_f1")


@dataclass
class CrossTarget:
    """A second corpus every row of a comparison is also scored on (`compare(..., cross_dataset=...)`): its
    clips of the shared classes, labelled in the models' classes, and the modalities its reader provides."""

    dataset: str
    clips: list[Sample]
    shared: SharedClasses
    modalities: tuple[str, ...]

    def can_score(self, encoders: Iterable[Any]) -> bool:
        """Whether the corpus has the primary modality of one of `encoders` (a model with none has nothing to
        read there: RAVDESS's action-unit branch on EmoDB)."""
        return any(enc.modalities and enc.modalities[0] in self.modalities for enc in encoders)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "clips": len(self.clips), "shared_classes": self.shared.names,
                "model_only_classes": self.shared.model_only, "corpus_only_clips": self.shared.corpus_only}


def cross_target(dataset: str, label_names: Sequence[str], model_modalities: Sequence[str], *,
                 data_dir: Path | None = None, options: Mapping[str, Any] | None = None,
                 registry: Registry | None = None, on_bad_sample: str = "error",
                 speaker_normalization: str = "none") -> CrossTarget:
    """Read corpus `dataset` once for a comparison over `label_names` (see `shared_classes`, `relabelled`); with
    `speaker_normalization` "per-speaker" (the comparison's), its tables standardised by its own speakers."""
    target = DataConfig(dataset=dataset, data_dir=data_dir, options=dict(options or {}), on_bad_sample=on_bad_sample)
    reader = build_reader(target, registry)
    shared = shared_classes(label_names, reader.label_names)
    clips = relabelled(list(reader.samples()), label_names, shared)
    if FEATURES not in model_modalities:  # a table the corpus joins that no branch reads
        clips = [dataclasses.replace(s, features={}) for s in clips]
    if speaker_normalization == PER_SPEAKER:  # transductive, as the comparison's own data
        clips = standardize_tables({"test": clips})["test"]
    return CrossTarget(dataset, clips, shared, tuple(reader.modalities))


def target_store(config: Any, clips: Sequence[Sample], normalizer: Any, *, existing: bool = False) -> Any:
    """The store another corpus's clips are scored through: the run's feature cache (with `existing`, only when
    its folder is here), standardised per speaker by this corpus's own speakers for a per-speaker run."""
    if config.data.speaker_normalization == PER_SPEAKER:
        return SpeakerNormalizedFeatures.over(open_cache(config), clips, normalizer=normalizer,
                                              spec=preprocess_spec(config.data))
    return existing_cache(config) if existing else open_cache(config)


def cross_values(labels: torch.Tensor, scores: torch.Tensor, target: CrossTarget) -> dict[str, float]:
    """``cross_accuracy``, ``cross_uar``, ``cross_macro_f1`` over the shared classes."""
    report = restricted_report(labels, scores, target.shared, bootstrap=0, seed=0)
    return {f"cross_{k}": report.metrics[k] for k in CROSS_METRICS}


def cross_baselines(encoders: Mapping[str, Any], bundle: Any, target: CrossTarget, cache: Any, *,
                    fit_on: Sequence[str]) -> dict[str, dict[str, float]]:
    """baseline key -> `cross_values`: the baselines fit on `bundle`'s clips as the comparison fits them, scored
    on the second corpus. Only branches whose primary modality the corpus has are fit (RAVDESS's action units do
    not exist for EmoDB); with some left out, so are the rows that combine branches."""
    from emofuse.core.apps.baselines import BASELINE, MAJORITY, baselines_over_branches

    usable = {b: enc for b, enc in encoders.items() if target.can_score([enc])}
    if not usable:
        return {}
    data = dataclasses.replace(bundle, splits={"train": bundle.splits["train"], "val": bundle.splits.get("val", []),
                                               "test": target.clips})
    fits = baselines_over_branches(usable, data, cache, fit_on=fit_on)
    whole = len(usable) == len(encoders)
    mine = tuple(f"{BASELINE}:{b}" for b in usable)
    label_of = {s.id: s.label for s in target.clips}
    return {f.key: cross_values(torch.tensor([label_of[i] for i in f.ids]), torch.from_numpy(f.probabilities), target)
            for f in fits if whole or f.key == f"{BASELINE}:{MAJORITY}"
            or any(f.key == k or f.key.startswith(k + ":") for k in mine)}


def rows_of(result: CrossCorpusResult) -> list[dict[str, Any]]:
    """The model's row, then each baseline's, with the model's paired accuracy difference to it."""
    model = {"model": f"the model ({result.source})", **{k: result.report.metrics[k] for k in ("accuracy", "uar", "macro_f1")},
             "difference": "(the model)"}
    rows = [model]
    for b in result.baselines or []:
        lo, hi = b["interval"]
        rows.append({**b, "difference": f"{100 * b['model_minus_baseline']:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"})
    return rows


def cross_corpus_columns() -> list[Any]:
    """The columns of `rows_of` as a table (the report's and the docs' results pages)."""
    from emofuse.core.apps.report import Column

    return [Column("model", "Model", justify="left"), Column("accuracy", "WA (acc) %", ".1f", pct=True),
            Column("uar", "UA %", ".1f", pct=True), Column("macro_f1", "Macro F1 %", ".1f", pct=True),
            Column("difference", "Model minus it, acc points (95% CI)")]


def cross_corpus_markdown(result: CrossCorpusResult, title: str) -> str:
    from emofuse.core.apps.report import markdown_table

    columns = cross_corpus_columns()
    left = ", ".join(f"{name} ({n} clips)" for name, n in result.shared.corpus_only.items()) or "none"
    lines = [f"# {title}\n",
             f"Trained on `{result.source}`, scored on every clip of `{result.dataset}` over the {len(result.shared.names)} "
             f"classes both name: {', '.join(result.shared.names)} ({result.report.num_samples} clips).",
             f"Left out: the corpus's classes the model lacks: {left}; the model's classes the corpus lacks: "
             f"{', '.join(result.shared.model_only) or 'none'} (its prediction is the most probable shared class).",
             (f"Removed at test time: {', '.join(result.dropped)}." if result.dropped else ""), "",
             markdown_table(rows_of(result), columns)]
    if result.baselines is not None:
        lines += ["", "Baselines: logistic regressions over the branches' frozen inputs (and the majority class), fit on "
                  "the clips the model learned from and scored the same way; the difference is paired clip by clip."]
    return "\n".join(lines) + "\n"


def evaluate_cross_corpus_and_write(checkpoint: Path, dataset: str, *, out_dir: Path | None = None,
                                    **kwargs: Any) -> CrossCorpusResult:
    """`emofuse evaluate MODEL --dataset NAME`: `evaluate_cross_corpus`, written to `out_dir` (default:
    ``<run folder>/cross-<dataset>``): the evaluation report files over the shared classes, ``cross_corpus.md``
    (the model beside its baselines) and ``cross_corpus.json``."""
    from emofuse.core.apps.report import write_evaluation_report, write_json, write_text

    result = evaluate_cross_corpus(Path(checkpoint), dataset, **kwargs)
    title = f"{Path(checkpoint).parent.name or Path(checkpoint).stem} ({result.source}) on {dataset}"
    if result.dropped:
        title += f" without {', '.join(result.dropped)}"
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).resolve().parent / f"cross-{dataset}"
    result.files = write_evaluation_report(result.report, out_dir, title=title)
    result.files["cross_corpus"] = write_text(out_dir / "cross_corpus.md", cross_corpus_markdown(result, title))
    result.files["cross_corpus_json"] = write_json(out_dir / "cross_corpus.json", result.to_dict())
    result.title = title
    return result


__all__ = ["CROSS_METRICS", "CrossCorpusResult", "CrossTarget", "SharedClasses", "cross_baselines", "cross_target",
           "cross_values", "cross_corpus_columns", "cross_corpus_markdown", "evaluate_cross_corpus",
           "evaluate_cross_corpus_and_write", "relabelled", "restricted_report", "rows_of", "shared_classes"]
