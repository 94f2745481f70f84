"""Classification metrics for emotion recognition, computed with torchmetrics' functional API.

Emotion corpora are unbalanced, so accuracy alone misleads: alongside it come macro and weighted F1
and the speech-emotion community's UA/WA pair (UA = unweighted average recall over the classes that
occur in the labels, WA = plain accuracy). Per-class precision/recall/F1, the confusion matrix and
seeded bootstrap confidence intervals complete a `MetricReport`. `tests/test_metrics.py` checks
every number against scikit-learn.

Conventions: labels below 0 mean "unlabelled" and are dropped; a class that occurs in neither the
labels nor the predictions is left out of macro averages (as scikit-learn does by default), so a
test split lacking a class is not penalised for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

#: The headline metrics, in the order tables show them.
HEADLINE_METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "weighted_f1", "uar", "war")

#: Readable names for tables and plots.
METRIC_TITLES: dict[str, str] = {
    "accuracy": "Accuracy",
    "macro_f1": "Macro F1",
    "weighted_f1": "Weighted F1",
    "uar": "UA (unweighted avg recall)",
    "war": "WA (weighted accuracy)",
    "macro_precision": "Macro precision",
    "macro_recall": "Macro recall",
}


def predictions_of(logits: torch.Tensor) -> torch.Tensor:
    """Class indices from ``[N, C]`` logits/probabilities; a 1-D tensor is taken as indices already."""
    logits = torch.as_tensor(logits)
    if logits.dim() == 1:
        return logits.long()
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C] scores or [N] class indices, got shape {tuple(logits.shape)}")
    return logits.argmax(dim=1)


def _labelled(labels: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, predictions) on CPU with unlabelled rows (label < 0) removed."""
    labels = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
    preds = predictions_of(torch.as_tensor(logits).detach().cpu())
    if labels.shape[0] != preds.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels but {preds.shape[0]} predictions")
    keep = labels >= 0
    return labels[keep], preds[keep]


def _check(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if labels.numel() == 0:
        raise ValueError("no labelled samples to score (every label is missing or -1)")
    top = int(max(labels.max().item(), preds.max().item()))
    if top >= num_classes or int(preds.min().item()) < 0:
        raise ValueError(f"class index {top} out of range for num_classes={num_classes}")


def _scores(labels: torch.Tensor, preds: torch.Tensor, num_classes: int, validate: bool) -> dict[str, float]:
    kw = dict(num_classes=num_classes, validate_args=validate)
    recall = multiclass_recall(preds, labels, average="none", **kw)
    support = torch.bincount(labels, minlength=num_classes)
    accuracy = float(multiclass_accuracy(preds, labels, average="micro", **kw))
    return {
        "accuracy": accuracy,
        "macro_f1": float(multiclass_f1_score(preds, labels, average="macro", **kw)),
        "weighted_f1": float(multiclass_f1_score(preds, labels, average="weighted", **kw)),
        # UA: mean recall over the classes that actually occur in the labels (= balanced accuracy).
        "uar": float(recall[support > 0].mean()),
        "war": accuracy,
        "macro_precision": float(multiclass_precision(preds, labels, average="macro", **kw)),
        "macro_recall": float(multiclass_recall(preds, labels, average="macro", **kw)),
    }


def classification_metrics(labels: torch.Tensor, logits: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro/weighted F1, UA (`uar`), WA (`war`), macro precision and recall, as floats.

    `logits` is ``[N, C]`` scores (any monotone form: logits or probabilities) or ``[N]`` indices.
    """
    labels, preds = _labelled(labels, logits)
    _check(labels, preds, num_classes)
    return _scores(labels, preds, num_classes, validate=True)


def per_class_metrics(
    labels: torch.Tensor, logits: torch.Tensor, num_classes: int
) -> dict[str, list[float] | list[int]]:
    """Per-class ``precision``, ``recall``, ``f1`` (lists of C floats; 0 where undefined) and ``support``."""
    labels, preds = _labelled(labels, logits)
    _check(labels, preds, num_classes)
    kw = dict(num_classes=num_classes, average="none")
    return {
        "precision": multiclass_precision(preds, labels, **kw).tolist(),
        "recall": multiclass_recall(preds, labels, **kw).tolist(),
        "f1": multiclass_f1_score(preds, labels, **kw).tolist(),
        "support": torch.bincount(labels, minlength=num_classes).tolist(),
    }


def confusion_matrix(labels: torch.Tensor, logits: torch.Tensor, num_classes: int) -> list[list[int]]:
    """Counts ``[C, C]``: row = true class, column = predicted class."""
    labels, preds = _labelled(labels, logits)
    _check(labels, preds, num_classes)
    return multiclass_confusion_matrix(preds, labels, num_classes=num_classes).tolist()


def bootstrap_intervals(
    labels: torch.Tensor,
    logits: torch.Tensor,
    num_classes: int,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of every `classification_metrics` value.

    Clips are resampled with replacement `resamples` times from a generator seeded with `seed`, so
    the same inputs always give the same intervals.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    labels, preds = _labelled(labels, logits)
    _check(labels, preds, num_classes)
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        idx = torch.from_numpy(rng.integers(0, n, size=n))
        for name, value in _scores(labels[idx], preds[idx], num_classes, validate=False).items():
            draws.setdefault(name, []).append(value)
    tail = (1.0 - confidence) / 2.0 * 100.0
    return {
        name: (float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail)))
        for name, values in draws.items()
    }


@dataclass
class MetricReport:
    """Everything `evaluate` says about one set of predictions, ready for tables, plots and JSON."""

    label_names: list[str]
    metrics: dict[str, float]
    per_class: dict[str, list[float] | list[int]]
    confusion: list[list[int]]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    confidence: float = 0.95
    num_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "label_names": list(self.label_names),
            "metrics": dict(self.metrics),
            "confidence": self.confidence,
            "intervals": {k: [lo, hi] for k, (lo, hi) in self.intervals.items()},
            "per_class": {
                name: {key: values[i] for key, values in self.per_class.items()}
                for i, name in enumerate(self.label_names)
            },
            "confusion_matrix": self.confusion,
            **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetricReport":
        names = list(d["label_names"])
        per_class_rows = d.get("per_class", {})
        keys = ("precision", "recall", "f1", "support")
        per_class = {k: [per_class_rows[n][k] for n in names] for k in keys} if per_class_rows else {}
        return cls(
            label_names=names,
            metrics=dict(d["metrics"]),
            per_class=per_class,
            confusion=[list(r) for r in d["confusion_matrix"]],
            intervals={k: (float(v[0]), float(v[1])) for k, v in d.get("intervals", {}).items()},
            confidence=float(d.get("confidence", 0.95)),
            num_samples=int(d.get("num_samples", 0)),
            extra=dict(d.get("extra", {})),
        )


def metric_report(
    labels: torch.Tensor,
    logits: torch.Tensor,
    label_names: Sequence[str],
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricReport:
    """All metrics of one set of predictions; `bootstrap=0` skips the confidence intervals."""
    num_classes = len(label_names)
    kept, _ = _labelled(labels, logits)
    return MetricReport(
        label_names=list(label_names),
        metrics=classification_metrics(labels, logits, num_classes),
        per_class=per_class_metrics(labels, logits, num_classes),
        confusion=confusion_matrix(labels, logits, num_classes),
        intervals=(
            bootstrap_intervals(labels, logits, num_classes, resamples=bootstrap, confidence=confidence, seed=seed)
            if bootstrap > 0
            else {}
        ),
        confidence=confidence,
        num_samples=int(kept.shape[0]),
    )


__all__ = [
    "HEADLINE_METRICS",
    "METRIC_TITLES",
    "MetricReport",
    "bootstrap_intervals",
    "classification_metrics",
    "confusion_matrix",
    "metric_report",
    "per_class_metrics",
    "predictions_of",
]
