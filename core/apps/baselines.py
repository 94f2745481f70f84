"""The simple models every comparison must beat, fit on exactly the clips and inputs the models get.

A deep fusion earns its cost only where it beats what a short scikit-learn script gets from the same
inputs. For each branch the baseline reads that branch's *frozen* inputs, pooled per clip: the cached
backbone features (a ``[T, D]`` sequence becomes its mean and standard deviation over time, a ``[D]``
vector stays as it is) and the feature vectors the branch reads. On those:

- one logistic regression per branch, one over all branches' pooled inputs concatenated, and the
  branches' regressions with their probabilities averaged (late fusion's baseline);
- one per named view of a branch's inputs that the encoder offers (`Encoder.baseline_views`: the usual
  recipe's reading, such as a speech backbone's last layer alone, where the branch caches every layer);
- the majority class of the fitting clips.

With ``data.speaker_normalization = "per-speaker"`` each pooled vector is first standardised by its speaker's
statistics over all that speaker's clips (transductive, as the models' inputs are then), so the bar stays fair.

Every regression standardises its inputs and picks C on the validation speakers (fit on train,
scored on val); it is then fit on the clips the models learn from (train, or train+val when the
models are refit there). Nothing is chosen on test clips.

`paired_difference` bootstraps a model's accuracy minus a baseline's over the same test clips: both
err on the same hard clips, so the pair's difference is far tighter than the two intervals apart.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from emofuse.core.data.speaker_norm import PER_SPEAKER, speakers_of, standardize_by_speaker
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import Encoder
from emofuse.core.types import FEATURES

#: The C values tried on the validation speakers (inverse L2 strength; standardised inputs).
C_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0)
MAJORITY = "majority"
CONCATENATED = "concatenated"
AVERAGED = "averaged"
#: The view of a branch's inputs that holds all of them (`pooled_views`).
ALL_INPUTS = ""
BASELINE = "baseline"


@dataclass
class BaselineFit:
    """One baseline's predictions on the test clips and how it was chosen."""

    key: str
    title: str
    modalities: str
    ids: list[str]
    probabilities: np.ndarray  # [N, C]
    C: float | None
    val_accuracy: float | None
    inputs: int
    component: str = "logistic-regression"
    #: Wall-clock seconds of its own fitting (choosing C and the final fit; the averaged regressions: the
    #: regressions it averages), not the pooling of the inputs that every baseline shares.
    seconds: float = 0.0


# --- pooled inputs --------------------------------------------------------------------------------------
def pool(value: torch.Tensor) -> np.ndarray:
    """One clip's cached tensor (stored unpadded) as a fixed-length vector: ``[D]`` as it is,
    ``[T, D]`` as mean and standard deviation over time."""
    x = value.detach().float().cpu()
    if x.dim() <= 1:
        return x.reshape(-1).numpy()
    x = x.reshape(x.shape[0], -1)
    std = x.std(dim=0, unbiased=False) if x.shape[0] > 1 else torch.zeros(x.shape[1])
    return torch.cat([x.mean(dim=0), std]).numpy()


def feature_names_of(encoder: Encoder, batch_features: Mapping[str, Any]) -> list[str]:
    """The feature vectors a branch reads: its configured ``features`` when it has that option,
    else every vector of the batch when it reads the features modality."""
    configured = getattr(getattr(encoder, "config", None), "features", None)
    if configured:
        return [n for n in configured if n in batch_features]
    return sorted(batch_features) if FEATURES in encoder.modalities else []


def pooled_views(encoder: Encoder, bundle: Any, cache: Any, splits: Sequence[str], *,
                 batch_size: int = 64) -> dict[str, dict[str, np.ndarray]]:
    """view -> clip id -> the branch's frozen inputs pooled per clip (see the module docstring), for every
    clip of `splits`: `ALL_INPUTS` (every cached tensor and feature vector) and each of the encoder's
    `baseline_views` (those tensors alone), read in one pass. Cached backbone features missing from `cache`
    are computed and stored first."""
    from emofuse.core.data.cache import batch_keys, encoder_namespace
    from emofuse.core.engine.distributed import DistContext
    from emofuse.core.engine.loaders import ensure_extracted, light_modalities

    present = [s for s in splits if bundle.splits.get(s)]
    ensure_extracted(encoder, cache, bundle, splits=present, batch_size=batch_size, seed=0, num_workers=0,
                     ctx=DistContext(), progress=False)
    namespace = encoder_namespace(encoder) if encoder.cacheable else None
    out: dict[str, dict[str, np.ndarray]] = {ALL_INPUTS: {}}
    for split in present:
        loader = bundle.loader(split, batch_size=batch_size, shuffle=False, seed=0,
                               modalities=light_modalities(encoder))
        for batch in loader:
            cached = (cache.get_many(namespace, batch_keys(batch, encoder.modalities)) if namespace
                      else [None] * len(batch))
            names = feature_names_of(encoder, batch.features)
            for i, clip in enumerate(batch.ids):
                tensors = cached[i] or {}
                parts = [pool(v) for _, v in sorted(tensors.items())]
                parts += [np.nan_to_num(batch.features[n][i].float().reshape(-1).numpy()) for n in names]
                if not parts:
                    raise ConfigError(f"baselines: encoder {encoder.name!r} has no frozen inputs to pool "
                                      "(no cached backbone features, no feature vectors)",
                                      hint="run compare with --no-baselines for such branches")
                out[ALL_INPUTS][clip] = np.concatenate(parts).astype(np.float64)
                for view, chosen in (encoder.baseline_views(tensors) if tensors else {}).items():
                    vector = np.concatenate([pool(v) for _, v in sorted(chosen.items())]).astype(np.float64)
                    out.setdefault(view, {})[clip] = vector
    return out


# --- fitting ----------------------------------------------------------------------------------------------
def _regression(C: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))


def _probabilities(model: Any, x: np.ndarray, num_classes: int) -> np.ndarray:
    p = np.zeros((len(x), num_classes))
    p[:, model.classes_] = model.predict_proba(x)
    return p


def _regression_fit(x: np.ndarray, y: np.ndarray, C: float = 1.0) -> Any:
    return _regression(C).fit(x, y)


def logistic_regression(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], num_classes: int, *,
                        fit_on: Sequence[str]) -> tuple[np.ndarray, float, float | None]:
    """(test probabilities, chosen C, validation accuracy at that C): C picked by accuracy on ``val``
    when fit on ``train`` (the smallest C among ties: the strongest regularisation), then refit on
    the `fit_on` splits."""
    best_c, best_acc = C_GRID[len(C_GRID) // 2], None
    if len(x.get("val", ())) and len(np.unique(y["train"])) > 1:
        for C in C_GRID:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = _regression_fit(x["train"], y["train"], C)
            acc = float((model.predict(x["val"]) == y["val"]).mean())
            if best_acc is None or acc > best_acc + 1e-12:
                best_c, best_acc = C, acc
    fit_x = np.concatenate([x[s] for s in fit_on if len(x.get(s, ()))])
    fit_y = np.concatenate([y[s] for s in fit_on if len(y.get(s, ()))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _regression_fit(fit_x, fit_y, best_c)
    return _probabilities(model, x["test"], num_classes), best_c, best_acc


def majority_class(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """Probabilities of always answering the most frequent fitting class (the lowest index among ties)."""
    p = np.zeros((n, num_classes))
    p[:, int(np.bincount(labels, minlength=num_classes).argmax())] = 1.0
    return p


def fit_baselines(
    inputs: Mapping[str, Mapping[str, np.ndarray]],
    modalities: Mapping[str, str],
    splits: Mapping[str, Sequence[Any]],
    num_classes: int,
    *,
    fit_on: Sequence[str] = ("train",),
    views: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]] | None = None,
) -> list[BaselineFit]:
    """The baselines over `inputs` (branch -> clip id -> pooled vector) for one split of the data.

    `splits` maps train/val/test to their labelled samples; `modalities` names what each branch reads;
    `views` (branch -> view name -> clip id -> pooled vector) adds one regression per named view.
    """
    ids = {s: [c.id for c in splits.get(s, ()) if c.label is not None and c.label >= 0] for s in ("train", "val", "test")}
    labels_by_id = {c.id: int(c.label) for part in splits.values() for c in part if c.label is not None}
    y = {s: np.array([labels_by_id[i] for i in v], dtype=np.int64) for s, v in ids.items()}
    if not len(y["train"]) or not ids["test"]:
        raise ConfigError("baselines need labelled training and test clips", hint="check the split")

    def table(by_clip: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {s: np.stack([by_clip[i] for i in v]) if v else np.zeros((0, 1)) for s, v in ids.items()}

    tables = {branch: table(by_clip) for branch, by_clip in inputs.items()}
    all_mods = sorted({m for v in modalities.values() for m in v.split("+") if m})
    candidates = [(f"{BASELINE}:{b}", f"baseline: {b} inputs, logistic regression", modalities[b], tables[b])
                  for b in inputs]
    every_clip = [i for v in ids.values() for i in v]
    for b, named in (views or {}).items():  # a view that some clips lack is not comparable: left out
        candidates += [(f"{BASELINE}:{b}:{view}", f"baseline: {b} {view}, logistic regression", modalities[b],
                        table(by_clip)) for view, by_clip in named.items() if all(i in by_clip for i in every_clip)]
    if len(inputs) > 1:
        both = {s: np.concatenate([tables[b][s] for b in inputs], axis=1) for s in ids}
        candidates.append((f"{BASELINE}:{CONCATENATED}", "baseline: all branches' inputs concatenated, logistic regression",
                           "+".join(all_mods), both))
    fits = []
    for key, title, mods, x in candidates:
        start = time.perf_counter()
        probs, C, val_acc = logistic_regression(x, y, num_classes, fit_on=fit_on)
        fits.append(BaselineFit(key, title, mods, ids["test"], probs, C, val_acc, int(x["train"].shape[1]),
                                seconds=time.perf_counter() - start))
    if len(inputs) > 1:  # late fusion's baseline: each branch's own regression, probabilities averaged
        own = [f for f in fits if f.key in {f"{BASELINE}:{b}" for b in inputs}]
        fits.append(BaselineFit(f"{BASELINE}:{AVERAGED}", "baseline: the branches' regressions, probabilities averaged",
                                "+".join(all_mods), ids["test"], np.mean([f.probabilities for f in own], axis=0),
                                None, None, sum(f.inputs for f in own), "averaged-regressions",
                                seconds=sum(f.seconds for f in own)))
    start = time.perf_counter()
    fit_y = np.concatenate([y[s] for s in fit_on if len(y.get(s, ()))])
    majority = majority_class(fit_y, len(ids["test"]), num_classes)
    fits.append(BaselineFit(f"{BASELINE}:{MAJORITY}", "baseline: majority class", "", ids["test"], majority, None, None,
                            0, MAJORITY, seconds=time.perf_counter() - start))
    return fits


def baselines_over_branches(encoders: Mapping[str, Encoder], bundle: Any, cache: Any, *,
                            fit_on: Sequence[str] = ("train",)) -> list[BaselineFit]:
    """The baselines over the frozen inputs of `encoders` (branch -> encoder, e.g. a trained model's
    branches) on `bundle`'s split; with ``data.speaker_normalization = "per-speaker"`` (the bundle's), every
    pooled vector standardised by its speaker first (transductive, as the models' inputs are)."""
    from emofuse.core.types import MODALITIES

    splits = ("train", "val", "test")
    pooled = {b: pooled_views(enc, bundle, cache, splits) for b, enc in encoders.items()}
    if getattr(bundle, "speaker_normalization", "none") == PER_SPEAKER:
        pooled = {b: per_speaker(views, bundle) for b, views in pooled.items()}
    inputs = {b: views.pop(ALL_INPUTS) for b, views in pooled.items()}
    modalities = {b: "+".join(m for m in MODALITIES if m in enc.modalities) for b, enc in encoders.items()}
    return fit_baselines(inputs, modalities, bundle.splits, len(bundle.label_names), fit_on=fit_on, views=pooled)


def per_speaker(views: Mapping[str, Mapping[str, np.ndarray]], bundle: Any) -> dict[str, dict[str, np.ndarray]]:
    """`views` (view -> clip id -> pooled vector) with each vector standardised by its speaker's statistics over
    that speaker's clips of every split of `bundle` (transductive: `emofuse.core.data.speaker_norm`)."""
    groups = speakers_of(s for part in bundle.splits.values() for s in part)
    speaker_of = {s.id: speaker for speaker, clips in groups.items() for s in clips}
    return {view: standardize_by_speaker(by_clip, speaker_of) for view, by_clip in views.items()}


def fit_splits(refit: bool) -> tuple[str, ...]:
    """The clips a baseline learns from: those the models learn from (train, or train + validation
    when the models are refit there)."""
    return ("train", "val") if refit else ("train",)


# --- paired differences -----------------------------------------------------------------------------------
def paired_difference(model_correct: np.ndarray, baseline_correct: np.ndarray, *, resamples: int = 1000,
                      confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean difference, low, high): the model's per-clip correctness (a fraction when averaged over
    seeds) minus the baseline's on the same clips, with a percentile bootstrap interval over clips."""
    a, b = np.asarray(model_correct, dtype=np.float64), np.asarray(baseline_correct, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired difference needs two equal, non-empty vectors, got {a.shape} and {b.shape}")
    diff = a - b
    if resamples < 1:
        return float(diff.mean()), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(diff.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def beside_model(loaded: Any, bundle: Any, ids: Sequence[str], correct: np.ndarray, *, resamples: int = 1000,
                 seed: int = 0) -> list[dict[str, Any]]:
    """`emofuse evaluate --baseline`: the baselines over a trained model's branches, fit on its run's
    split, scored on its test clips, each with the model's paired accuracy difference (`correct`:
    the model's per-clip correctness on `ids`)."""
    from emofuse.core.engine.loaders import open_cache

    fits = baselines_over_branches(loaded.model.branches, bundle, open_cache(loaded.config),
                                   fit_on=fit_splits(loaded.config.train.refit))
    mine = dict(zip(ids, np.asarray(correct, dtype=np.float64)))
    labels = {s.id: s.label for s in bundle.splits["test"]}
    rows = []
    for f in fits:
        right = dict(zip(f.ids, (f.probabilities.argmax(axis=1) == np.array([labels[i] for i in f.ids])).astype(float)))
        common = [i for i in f.ids if i in mine]
        diff, lo, hi = paired_difference(np.array([mine[i] for i in common]), np.array([right[i] for i in common]),
                                         resamples=resamples, seed=seed)
        rows.append({"key": f.key, "model": f.title, "accuracy": float(np.mean([right[i] for i in common])),
                     "model_minus_baseline": diff, "interval": [lo, hi], "C": f.C, "inputs": f.inputs,
                     "text": f"{100 * diff:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"})
    return rows


def accuracy_interval(correct: np.ndarray, *, resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-clip correctness."""
    _, lo, hi = paired_difference(correct, np.zeros(len(correct)), resamples=resamples, confidence=confidence,
                                  seed=seed)
    return lo, hi


__all__ = [
    "BASELINE",
    "BaselineFit",
    "baselines_over_branches",
    "beside_model",
    "fit_splits",
    "C_GRID",
    "accuracy_interval",
    "fit_baselines",
    "logistic_regression",
    "majority_class",
    "paired_difference",
    "pool",
    "pooled_views",
]
