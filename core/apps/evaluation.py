"""Scoring a trained checkpoint on a split of its data set: the numbers `emofuse evaluate` prints.

The checkpoint's own normaliser and label set are used, and the split is rebuilt the way training
built it (same data config, same split file beside the run), so a reload scores exactly the clips
the run held out. Modalities can be removed at test time (`drop`) to measure how much a model
leans on each one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from emofuse.core.data.dialogue import needs_whole_dialogues
from emofuse.core.data.preprocess import preprocess_spec
from emofuse.core.data.feature_store import FeatureStore
from emofuse.core.engine.compose import ComposedModel
from emofuse.core.engine.encode import batches_with_features, branch_outputs
from emofuse.core.engine.loaders import feature_store
from emofuse.core.engine.metrics import MetricReport, metric_report
from emofuse.core.engine.model_io import LoadedModel, load_model
from emofuse.core.errors import ConfigError, DataError
from emofuse.core.registry import Registry
from emofuse.core.interfaces import Encoder
from emofuse.core.types import Batch, EncoderOutput, Sample

SPLITS = ("train", "val", "test")


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as torch reads it."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def batches_of(
    samples: Sequence[Sample],
    modalities: Iterable[str],
    normalizer: Any = None,
    *,
    batch_size: int = 16,
    on_bad_sample: str = "error",
    by_dialogue: bool = False,
    skipped: list[tuple[str, str]] | None = None,
    spec: Any = None,
) -> Iterator[Batch]:
    """Decode and collate `samples` with the given normaliser (and preprocessing `spec`: the run's, from
    `preprocess_spec(config.data)`), `batch_size` at a time in order, or by whole dialogues when
    `by_dialogue` (a context model: see `emofuse.core.data.dialogue.batch_positions`).
    In skip mode the clips left out are appended to `skipped` as ``(file, reason)``."""
    from emofuse.core.data.dialogue import batch_positions
    from emofuse.core.data.pipeline import make_batch, reason_of

    modalities = sorted(set(modalities))
    for positions in batch_positions(samples, batch_size, by_dialogue=by_dialogue):
        chunk = [samples[i] for i in positions]
        try:
            batch = make_batch(chunk, modalities, normalizer, on_bad_sample=on_bad_sample, spec=spec)
        except DataError as exc:
            if on_bad_sample != "skip":
                raise
            if skipped is not None:  # every clip of this chunk was bad
                skipped += [(s.video_path or s.audio_path or s.source or s.id, reason_of(exc)) for s in chunk]
            continue
        if skipped is not None:
            skipped += batch.extra.get("skipped", [])
        if len(batch):
            yield batch


def scoring_batches(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    *,
    store: FeatureStore | None = None,
    encoders: Iterable[Encoder] | None = None,
    modalities: Iterable[str] | None = None,
    batch_size: int = 16,
    on_bad_sample: str | None = None,
    by_dialogue: bool | None = None,
    skipped: list[tuple[str, str]] | None = None,
    device: torch.device | str = "cpu",
) -> Iterable[Batch]:
    """The batches `loaded` is scored on: decoded with its normaliser and preprocessing, whole dialogues for a
    context model. With a `store` that keeps every entry (an on-disk `FeatureCache`), no frame or waveform is
    decoded for a clip whose frozen features it holds (`batches_with_features`); `encoders` (default: the
    model's branches) and `modalities` (default: the model's) widen that to several models scored together."""
    policy = on_bad_sample or loaded.config.data.on_bad_sample
    normalizer, spec = normalizer_of(loaded), preprocess_spec(loaded.config.data)
    whole = needs_whole_dialogues(loaded.model) if by_dialogue is None else by_dialogue

    def source(chunk: Sequence[Sample], mods: set[str]) -> Iterable[Batch]:
        return batches_of(chunk, mods, normalizer, batch_size=batch_size, on_bad_sample=policy, by_dialogue=whole,
                          skipped=skipped, spec=spec)

    mods = set(modalities if modalities is not None else loaded.model.modalities)
    if store is None:
        return source(samples, mods)
    encs = list(encoders) if encoders is not None else list(loaded.model.branches.values())
    return batches_with_features(encs, store, samples, mods, source, device=device, on_missing=policy)


def normalizer_of(loaded: LoadedModel) -> Any:
    """The checkpoint's fitted normaliser (None when the run had nothing to normalise)."""
    if not loaded.normalizer_state:
        return None
    from emofuse.core.data.pipeline import Normalizer

    return Normalizer.from_state_dict(loaded.normalizer_state)


@dataclass
class SplitOutputs:
    """A model's raw outputs over one set of clips, in order."""

    ids: list[str]
    labels: torch.Tensor
    logits: torch.Tensor
    branch_logits: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def probabilities(self) -> torch.Tensor:
        return self.logits.float().softmax(dim=1)


@torch.no_grad()
def branch_outputs_over(
    model: ComposedModel, batches: Iterable[Batch], *, drop: Sequence[str] = (), device: torch.device | str = "cpu",
    store: FeatureStore | None = None,
) -> tuple[list[Batch], list[dict[str, EncoderOutput]]]:
    """Every branch's outputs batch by batch (on CPU), so several fusions can reuse them; frozen features
    come from `store` (`emofuse.core.engine.encode`), `drop` modalities are marked absent after extraction."""
    model.eval().to(device)
    kept, outputs = [], []
    for batch in batches:
        per_branch = branch_outputs(model, batch.to(device), store, without=drop)
        outputs.append({name: out.detached_cpu() for name, out in per_branch.items()})
        kept.append(Batch(ids=batch.ids, labels=batch.labels.cpu(), present={}))
    return kept, outputs


@torch.no_grad()
def combine(
    model: ComposedModel, batches: Sequence[Batch], outputs: Sequence[dict[str, EncoderOutput]]
) -> SplitOutputs:
    """The model's final logits from precomputed branch outputs (the fusion, or the only branch)."""
    ids: list[str] = []
    labels, logits = [], []
    branch_logits: dict[str, list[torch.Tensor]] = {}
    fusion = model.fusion.eval().cpu() if model.fusion is not None else None
    for batch, per_branch in zip(batches, outputs):
        mine = {name: per_branch[name] for name in model.branches}
        if fusion is None:
            (only,) = mine.values()
            final = only.logits
        else:
            final = fusion(mine)
        ids += list(batch.ids)
        labels.append(batch.labels)
        logits.append(final.float())
        for name in model.branches:
            branch_logits.setdefault(name, []).append(per_branch[name].logits)
    if not ids:
        raise ConfigError("no clips to score: the split is empty")
    return SplitOutputs(ids, torch.cat(labels), torch.cat(logits), {k: torch.cat(v) for k, v in branch_logits.items()})


def run_model(
    model: ComposedModel, batches: Iterable[Batch], *, drop: Sequence[str] = (), device: torch.device | str = "cpu",
    store: FeatureStore | None = None,
) -> SplitOutputs:
    """The model's logits over `batches`, with `drop` modalities removed (frozen features from `store`)."""
    kept, outputs = branch_outputs_over(model, batches, drop=drop, device=device, store=store)
    return combine(model, kept, outputs)


@dataclass
class EvaluationResult:
    checkpoint: Path | None
    split: str
    report: MetricReport
    outputs: SplitOutputs
    dropped: tuple[str, ...] = ()
    #: (file, reason) of every clip left out as bad input (``on_bad_sample = "skip"``).
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: What `evaluate_and_write` adds: the report's title, the files written (kind -> path), the
    #: baseline rows (with `baseline`) and how many of the clips asked for could not be explained.
    title: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    baselines: list[dict[str, Any]] | None = None
    unexplained: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint) if self.checkpoint else None, "split": self.split,
                "dropped_modalities": list(self.dropped), **self.report.to_dict()}


def evaluate_samples(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    *,
    split: str = "test",
    bootstrap: int = 1000,
    seed: int = 0,
    drop: Sequence[str] = (),
    batch_size: int = 16,
    device: str | torch.device = "auto",
    on_bad_sample: str | None = None,
    checkpoint: Path | None = None,
    store: FeatureStore | None = None,
) -> EvaluationResult:
    """Score a loaded model on `samples` (decoded with the checkpoint's normaliser); frozen features are
    read from `store` where it holds them (an on-disk `FeatureCache`: see `scoring_batches`)."""
    labelled = [s for s in samples if s.label is not None and s.label >= 0]
    if not labelled:
        raise ConfigError(f"split {split!r} has no labelled clips to score")
    if store is None and loaded.config.data.speaker_normalization != "none" and any(
            enc.cacheable for enc in loaded.model.branches.values()):
        raise ConfigError(f"{checkpoint or 'the model'}: trained with data.speaker_normalization = "
                          f"{loaded.config.data.speaker_normalization!r}, its frozen features must be standardised by "
                          "each speaker's clips", hint="score it with evaluate_checkpoint, or pass "
                          "store=feature_store(config, bundle) (emofuse.core.engine.loaders)")
    skipped: list[tuple[str, str]] = []
    device = resolve_device(device)
    batches = scoring_batches(loaded, labelled, store=store, batch_size=batch_size, on_bad_sample=on_bad_sample,
                              skipped=skipped, device=device)
    outputs = run_model(loaded.model, batches, drop=drop, device=device, store=store)
    report = metric_report(outputs.labels, outputs.logits, loaded.label_names, bootstrap=bootstrap, seed=seed)
    return EvaluationResult(checkpoint, split, report, outputs, tuple(drop), skipped)


def split_samples(
    loaded: LoadedModel,
    split: str,
    *,
    checkpoint: Path | None = None,
    data_dir: Path | None = None,
    registry: Registry | None = None,
    on_bad_sample: str | None = None,
) -> list[Sample]:
    """The clips of `split` as the checkpoint's run defined it (its data config and split file)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return list(checkpoint_bundle(loaded, checkpoint=checkpoint, data_dir=data_dir, registry=registry,
                                  on_bad_sample=on_bad_sample).splits[split])


def checkpoint_bundle(loaded: LoadedModel, *, checkpoint: Path | None = None, data_dir: Path | None = None,
                      registry: Registry | None = None, on_bad_sample: str | None = None) -> Any:
    """The data bundle of the checkpoint's run: its data config (`on_bad_sample` overriding its policy
    for unreadable clips), its split file beside the checkpoint."""
    from emofuse.core.data.pipeline import load_data

    data_config = loaded.config.data
    if data_dir is not None:
        data_config = data_config.model_copy(update={"data_dir": Path(data_dir)})
    if on_bad_sample is not None:
        data_config = data_config.model_copy(update={"on_bad_sample": on_bad_sample})
    split_dir = Path(checkpoint).resolve().parent if checkpoint is not None else None
    bundle = load_data(data_config, sorted(loaded.model.modalities), registry=registry, split_dir=split_dir)
    _check_labels(bundle.label_names, loaded.label_names, checkpoint)
    return bundle


def _check_labels(data_labels: Sequence[str], model_labels: Sequence[str], checkpoint: Path | None) -> None:
    if list(data_labels) != list(model_labels):
        raise ConfigError(
            f"{checkpoint}: the model's classes {list(model_labels)} differ from the data's {list(data_labels)}",
            hint="evaluate on the data set the model was trained on, or pass the same --labels",
        )


def evaluate_checkpoint(
    checkpoint: Path,
    *,
    split: str = "test",
    data_dir: Path | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    drop: Sequence[str] = (),
    batch_size: int = 16,
    device: str | torch.device = "auto",
    registry: Registry | None = None,
    on_bad_sample: str | None = None,
    store: FeatureStore | None = None,
) -> EvaluationResult:
    """Load `checkpoint`, rebuild its split and score it (see `evaluate_samples`); `on_bad_sample`
    overrides the run's policy for unreadable clips ("skip" leaves them out and lists them). Frozen features
    come from `store`, by default the run's own feature cache when it is here (`existing_cache`)."""
    loaded = load_model(Path(checkpoint), registry=registry)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    bundle = checkpoint_bundle(loaded, checkpoint=checkpoint, data_dir=data_dir, registry=registry,
                               on_bad_sample=on_bad_sample)
    store = feature_store(loaded.config, bundle, existing=True) if store is None else store
    result = evaluate_samples(loaded, list(bundle.splits[split]), split=split, bootstrap=bootstrap, seed=seed,
                              drop=drop, batch_size=batch_size, device=device, checkpoint=Path(checkpoint),
                              on_bad_sample=on_bad_sample, store=store)
    result.skipped[:0] = bundle.skipped  # left out as the data was read (skip mode), before those that failed to decode
    return result


def bad_sample_policy(value: str | None) -> str | None:
    """`value` checked exactly as a run config checks ``data.on_bad_sample`` (None: the run's own), before
    the checkpoint is read."""
    from pydantic import TypeAdapter, ValidationError

    from emofuse.core.config import DataConfig

    if value is None:
        return None
    try:
        return TypeAdapter(DataConfig.model_fields["on_bad_sample"].annotation).validate_python(value)
    except ValidationError as err:
        raise ConfigError(f"--on-bad-sample {value!r}: " + "; ".join(e["msg"] for e in err.errors())) from None


def evaluate_and_write(
    checkpoint: Path,
    *,
    split: str = "test",
    data_dir: Path | None = None,
    out_dir: Path | None = None,
    bootstrap: int = 1000,
    drop: Sequence[str] = (),
    on_bad_sample: str | None = None,
    explain: int = 0,
    baseline: bool = False,
) -> EvaluationResult:
    """`emofuse evaluate`: score, and write JSON/Markdown/CSV/PNG to `out_dir` (default:
    ``<run folder>/eval-<split>``); with `explain` N, explanation PNGs of the split's first N clips go
    to ``<out_dir>/explain``; with `baseline`, also the baselines of `emofuse.core.apps.baselines` on
    the same clips (``baselines.json``). The result carries what was written."""
    from emofuse.core.apps.report import write_evaluation_report, write_json

    if baseline and (split != "test" or drop):
        raise ConfigError("--baseline compares on the test split with every modality",
                          hint="drop --split/--without, or --baseline")
    on_bad_sample = bad_sample_policy(on_bad_sample)
    result = evaluate_checkpoint(Path(checkpoint), split=split, data_dir=data_dir, bootstrap=bootstrap, drop=drop,
                                 on_bad_sample=on_bad_sample)
    result.title = f"{Path(checkpoint).parent.name or Path(checkpoint).stem} on {split}"
    if drop:
        result.title += f" without {', '.join(drop)}"
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).resolve().parent / f"eval-{split}"
    result.files = write_evaluation_report(result.report, out_dir, title=result.title)
    write_json(result.files["json"], result.to_dict())
    if explain:
        from emofuse.core.apps.explain import write_explanations
        from emofuse.core.apps.predict import load

        predictor = load(Path(checkpoint))
        samples = split_samples(predictor.loaded, split, checkpoint=Path(checkpoint), data_dir=data_dir)[:explain]
        written = write_explanations(predictor, samples, out_dir / "explain")
        result.files["explanations"] = out_dir / "explain"
        result.unexplained = len(samples) - len(written)
    if baseline:
        from emofuse.core.apps.baselines import beside_model

        loaded = load_model(Path(checkpoint))
        bundle = checkpoint_bundle(loaded, checkpoint=Path(checkpoint), data_dir=data_dir)
        correct = (result.outputs.logits.argmax(dim=1) == result.outputs.labels).numpy()
        result.baselines = beside_model(loaded, bundle, result.outputs.ids, correct, resamples=max(bootstrap, 1))
        result.files["baselines"] = write_json(out_dir / "baselines.json",
                                               {"checkpoint": str(checkpoint), "baselines": result.baselines})
    return result


__all__ = [
    "EvaluationResult",
    "SplitOutputs",
    "batches_of",
    "branch_outputs_over",
    "combine",
    "evaluate_checkpoint",
    "evaluate_and_write",
    "evaluate_samples",
    "normalizer_of",
    "resolve_device",
    "run_model",
    "split_samples",
]
