"""Metrics computed with torchmetrics, checked against scikit-learn (the other well-kept library)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from emofuse.core.engine.metrics import (
    MetricReport,
    bootstrap_intervals,
    classification_metrics,
    confusion_matrix,
    metric_report,
    per_class_metrics,
)

# scikit-learn warns on the very edge cases these tests exercise (a class never predicted, one class).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def sklearn_reference(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, float]:
    return {
        "accuracy": skm.accuracy_score(labels, preds),
        "macro_f1": skm.f1_score(labels, preds, average="macro", zero_division=0),
        "weighted_f1": skm.f1_score(labels, preds, average="weighted", zero_division=0),
        "uar": skm.balanced_accuracy_score(labels, preds),
        "war": skm.accuracy_score(labels, preds),
        "macro_precision": skm.precision_score(labels, preds, average="macro", zero_division=0),
        "macro_recall": skm.recall_score(labels, preds, average="macro", zero_division=0),
    }


def random_case(seed: int, n: int = 300, c: int = 8, skill: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), labels] += skill * 3  # informative but imperfect
    return labels, logits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_headline_metrics_match_sklearn(seed):
    labels, logits = random_case(seed)
    ours = classification_metrics(labels, logits, 8)
    ref = sklearn_reference(labels.numpy(), logits.argmax(1).numpy(), 8)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["war"] == ours["accuracy"]


def test_class_never_predicted_and_class_absent():
    # class 2 is in the labels but never predicted; class 3 occurs nowhere (4 classes declared)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    preds = torch.tensor([0, 1, 1, 1, 0, 1, 0, 0])
    logits = torch.nn.functional.one_hot(preds, 4).float()
    ours = classification_metrics(labels, logits, 4)
    ref = sklearn_reference(labels.numpy(), preds.numpy(), 4)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    per = per_class_metrics(labels, logits, 4)
    assert per["recall"][2] == 0.0 and per["precision"][2] == 0.0 and per["f1"][2] == 0.0
    assert per["support"] == [3, 2, 3, 0]
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, labels=[0, 1, 2, 3], zero_division=0)
    np.testing.assert_allclose(per["precision"], p, atol=1e-6)
    np.testing.assert_allclose(per["recall"], r, atol=1e-6)
    np.testing.assert_allclose(per["f1"], f, atol=1e-6)


def test_class_predicted_but_never_true_counts_against_macro_but_not_ua():
    labels = torch.tensor([0, 0, 1, 1])
    preds = torch.tensor([0, 2, 1, 1])
    ours = classification_metrics(labels, preds, 3)
    ref = sklearn_reference(labels.numpy(), preds.numpy(), 3)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["uar"] == pytest.approx(0.75)  # mean of recalls of classes 0 and 1 only


def test_unlabelled_rows_are_dropped():
    labels = torch.tensor([0, -1, 1, -1])
    preds = torch.tensor([0, 1, 1, 0])
    assert classification_metrics(labels, preds, 2)["accuracy"] == 1.0


def test_confusion_matrix_matches_sklearn():
    labels, logits = random_case(5, n=120, c=5)
    ours = confusion_matrix(labels, logits, 5)
    ref = skm.confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), labels=list(range(5)))
    assert ours == ref.tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6).flatmap(lambda c: st.tuples(
    st.just(c), st.lists(st.tuples(st.integers(0, c - 1), st.integers(0, c - 1)), min_size=1, max_size=40))))
def test_property_matches_sklearn(case):
    c, pairs = case
    labels = np.array([p[0] for p in pairs])
    preds = np.array([p[1] for p in pairs])
    ours = classification_metrics(torch.from_numpy(labels), torch.from_numpy(preds), c)
    ref = sklearn_reference(labels, preds, c)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="labels but"):
        classification_metrics(torch.tensor([0, 1]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="no labelled samples"):
        classification_metrics(torch.tensor([-1]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="out of range"):
        classification_metrics(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)


def test_bootstrap_is_seeded_and_contains_point_estimate():
    labels, logits = random_case(3, n=250)
    point = classification_metrics(labels, logits, 8)
    start = time.perf_counter()
    a = bootstrap_intervals(labels, logits, 8, resamples=500, seed=7)
    assert time.perf_counter() - start < 10
    b = bootstrap_intervals(labels, logits, 8, resamples=500, seed=7)
    c = bootstrap_intervals(labels, logits, 8, resamples=500, seed=8)
    assert a == b
    assert a != c
    for key in ("accuracy", "macro_f1", "weighted_f1", "uar", "war"):
        lo, hi = a[key]
        assert lo <= point[key] <= hi, key
        assert 0.0 < hi - lo < 0.3, key  # a real interval, not a point, on 250 clips
    # a wider confidence level gives a wider interval
    wide = bootstrap_intervals(labels, logits, 8, resamples=500, seed=7, confidence=0.99)
    assert wide["accuracy"][0] <= a["accuracy"][0] and wide["accuracy"][1] >= a["accuracy"][1]


def test_metric_report_roundtrips_through_dict():
    labels, logits = random_case(4, n=80, c=4)
    report = metric_report(labels, logits, ["a", "b", "c", "d"], bootstrap=50, seed=1)
    d = report.to_dict()
    assert d["per_class"]["b"]["support"] == int((labels == 1).sum())
    again = MetricReport.from_dict(d)
    assert again.metrics == report.metrics
    assert again.per_class == report.per_class
    assert again.confusion == report.confusion
    assert again.intervals == report.intervals
    assert report.num_samples == 80
