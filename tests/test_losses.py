"""Focal loss and cross-entropy against independent computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from emofuse.core.engine.class_balance import balanced_weights
from emofuse.core.config import ComponentRef
from emofuse.core.engine.compose import build_loss
from emofuse.core.errors import ConfigError
from emofuse.plugins.losses.cross_entropy import CrossEntropyLoss
from emofuse.plugins.losses.focal import FocalLoss

C = 7


def focal(**options):
    return FocalLoss(FocalLoss.make_config(options), C)


def reference_focal(logits: np.ndarray, labels: np.ndarray, gamma: float, alpha) -> float:
    """The formula written out in numpy, one sample at a time, from softmax probabilities."""
    total = 0.0
    for row, y in zip(logits.astype(np.float64), labels):
        p = np.exp(row - row.max())
        p /= p.sum()
        a = alpha[y] if isinstance(alpha, (list, np.ndarray)) else alpha
        total += -a * (1.0 - p[y]) ** gamma * math.log(p[y])
    return total / len(labels)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 12),
    gamma=st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0]),
    scale=st.floats(0.1, 20.0),
)
def test_focal_matches_the_formula(seed, n, gamma, scale):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, C, generator=g) * scale
    labels = torch.randint(0, C, (n,), generator=g)
    alpha = (torch.rand(C, generator=g) + 0.1).tolist()
    for a in (1.0, 0.25, alpha):
        got = float(focal(gamma=gamma, alpha=a)(logits, labels))
        want = reference_focal(logits.numpy(), labels.numpy(), gamma, a)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, C, generator=g) * 3
    labels = torch.randint(0, C, (64,), generator=g)
    got = focal(gamma=0.0, alpha=1.0)(logits, labels)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels))


def test_focal_downweights_easy_examples():
    logits = torch.tensor([[8.0, 0, 0, 0, 0, 0, 0], [0.1, 0, 0, 0, 0, 0, 0]])
    labels = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    fl = torch.stack([focal(gamma=2.0)(logits[i:i + 1], labels[i:i + 1]) for i in range(2)])
    ratio = fl / ce
    assert ratio[0] < 1e-5 and 0.5 < ratio[1] < 1.0  # confident -> almost nothing; unsure -> most of CE


def test_focal_gradient_matches_autograd_of_the_formula():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(10, C, generator=g, requires_grad=True)
    labels = torch.randint(0, C, (10,), generator=g)
    focal(gamma=2.0, alpha=0.5)(logits, labels).backward()
    ours = logits.grad.clone()
    x = logits.detach().double().requires_grad_()
    p = torch.softmax(x, 1).gather(1, labels[:, None]).squeeze(1)
    (-(0.5) * (1 - p) ** 2 * torch.log(p)).mean().backward()
    torch.testing.assert_close(ours.double(), x.grad, rtol=1e-4, atol=1e-6)


def test_balanced_alpha_comes_from_class_counts():
    counts = torch.tensor([10, 20, 40, 10, 5, 5, 0])
    loss = FocalLoss(FocalLoss.make_config({"alpha": "balanced", "gamma": 0.0}), C, counts)
    n = counts.sum().item()
    expected = [n / (C * c) if c else 1.0 for c in counts.tolist()]
    torch.testing.assert_close(loss.alpha, torch.tensor(expected, dtype=torch.float32))
    # sklearn agrees on the classes that occur
    from sklearn.utils.class_weight import compute_class_weight

    y = np.repeat(np.arange(C), counts.numpy())
    sk = compute_class_weight("balanced", classes=np.arange(6), y=y)
    np.testing.assert_allclose(balanced_weights(counts[:6]).numpy(), sk, rtol=1e-6)


def test_unlabelled_rows_are_ignored_and_empty_batch_is_zero():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, C, generator=g, requires_grad=True)
    labels = torch.tensor([1, -1, 2, -1, 3])
    for loss in (focal(gamma=2.0), CrossEntropyLoss(CrossEntropyLoss.make_config({}), C)):
        keep = labels >= 0
        torch.testing.assert_close(loss(logits, labels), loss(logits[keep], labels[keep]))
        empty = loss(logits, torch.full((5,), -1))
        assert float(empty.detach()) == 0.0
        empty.backward()  # still part of the graph


def test_cross_entropy_label_smoothing_and_weights_match_torch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(32, C, generator=g)
    labels = torch.randint(0, C, (32,), generator=g)
    w = (torch.rand(C, generator=g) + 0.5)
    loss = CrossEntropyLoss(CrossEntropyLoss.make_config({"label_smoothing": 0.1, "class_weights": w.tolist()}), C)
    want = F.cross_entropy(logits, labels, weight=w, label_smoothing=0.1, reduction="none").mean()
    torch.testing.assert_close(loss(logits, labels), want)
    plain = CrossEntropyLoss(CrossEntropyLoss.make_config({}), C)
    torch.testing.assert_close(plain(logits, labels), F.cross_entropy(logits, labels))


def test_mean_of_equal_shards_is_the_batch_loss():
    """What makes data-parallel training match one process: the loss is a plain per-sample mean."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(8, C, generator=g)
    labels = torch.randint(0, C, (8,), generator=g)
    for loss in (focal(gamma=2.0, alpha=[0.5 + i for i in range(C)]),
                 CrossEntropyLoss(CrossEntropyLoss.make_config({"class_weights": [1.0 + i for i in range(C)]}), C)):
        whole = loss(logits, labels)
        halves = (loss(logits[:4], labels[:4]) + loss(logits[4:], labels[4:])) / 2
        torch.testing.assert_close(whole, halves)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="loss.alpha: 3 per-class values for 7 classes"):
        focal(alpha=[1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="class counts"):
        focal(alpha="balanced")
    with pytest.raises(ConfigError, match="gamma"):
        FocalLoss.make_config({"gamma": -1})
    with pytest.raises(ConfigError, match="label_smoothing"):
        CrossEntropyLoss.make_config({"label_smoothing": 1.5})


def test_losses_build_through_the_registry():
    counts = torch.tensor([3, 1, 1, 1, 1, 1, 1])
    loss = build_loss(ComponentRef(name="focal", alpha="balanced", gamma=1.0), C, counts)
    assert isinstance(loss, FocalLoss) and loss.alpha[0] < loss.alpha[1]
    assert isinstance(build_loss(ComponentRef(name="cross-entropy"), C), CrossEntropyLoss)


def test_sqrt_balanced_weights_are_the_root_of_balanced():
    counts = torch.tensor([10, 20, 40, 10, 5, 5, 0])
    full = balanced_weights(counts)
    ce = CrossEntropyLoss(CrossEntropyLoss.make_config({"class_weights": "sqrt-balanced"}), C, counts)
    fl = FocalLoss(FocalLoss.make_config({"alpha": "sqrt-balanced", "gamma": 2.0}), C, counts)
    torch.testing.assert_close(ce.weights, full.sqrt())
    torch.testing.assert_close(fl.alpha, full.sqrt())
    assert ce.weights[6] == 1.0  # an absent class keeps weight 1
    with pytest.raises(ConfigError, match="'sqrt-balanced'"):
        CrossEntropyLoss(CrossEntropyLoss.make_config({"class_weights": "inverse"}), C, counts)


def test_logit_adjustment_adds_tau_log_prior_inside_the_loss():
    counts = torch.tensor([40, 20, 10, 10, 5, 5, 0])
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(16, C, generator=g)
    labels = torch.randint(0, C, (16,), generator=g)
    loss = CrossEntropyLoss(CrossEntropyLoss.make_config({"logit_adjustment": 0.5}), C, counts)
    prior = counts.clamp(min=1).double() / counts.clamp(min=1).sum()
    want = F.cross_entropy(logits + 0.5 * prior.log().float(), labels)
    torch.testing.assert_close(loss(logits, labels), want)
    assert CrossEntropyLoss(CrossEntropyLoss.make_config({}), C, counts).offsets is None
    with pytest.raises(ConfigError, match="logit_adjustment=1.0 needs the training set's class counts"):
        CrossEntropyLoss(CrossEntropyLoss.make_config({"logit_adjustment": 1.0}), C)


def test_logit_adjustment_at_tau_one_learns_no_class_preference():
    """What makes it a balancing loss: fitted to imbalanced labels alone, the best constant logits
    under tau = 1 are equal (the prior lives in the loss), while plain cross-entropy learns the log prior."""
    counts = torch.tensor([50, 20, 10, 8, 6, 4, 2])
    labels = torch.repeat_interleave(torch.arange(C), counts)
    for tau, spread_is_flat in ((1.0, True), (0.0, False)):
        loss = CrossEntropyLoss(CrossEntropyLoss.make_config({"logit_adjustment": tau}), C, counts)
        bias = torch.zeros(C, requires_grad=True)
        optimizer = torch.optim.LBFGS([bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = loss(bias.expand(len(labels), C), labels)
            value.backward()
            return value

        optimizer.step(closure)
        spread = float((bias.max() - bias.min()).detach())
        assert (spread < 1e-3) is spread_is_flat, (tau, bias)


def test_focal_takes_the_same_logit_adjustment():
    """Focal with gamma 0 and alpha 1 is cross-entropy, the adjusted one too; with gamma 2 it is the
    formula on the shifted logits."""
    counts = torch.tensor([40, 20, 10, 10, 5, 5, 0])
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(16, C, generator=g)
    labels = torch.randint(0, C, (16,), generator=g)
    adjusted_ce = CrossEntropyLoss(CrossEntropyLoss.make_config({"logit_adjustment": 1.0}), C, counts)
    plain_focal = FocalLoss(FocalLoss.make_config({"gamma": 0.0, "logit_adjustment": 1.0}), C, counts)
    torch.testing.assert_close(plain_focal(logits, labels), adjusted_ce(logits, labels))
    shifted = (logits + adjusted_ce.offsets).numpy()
    want = reference_focal(shifted, labels.numpy(), 2.0, 1.0)
    got = FocalLoss(FocalLoss.make_config({"logit_adjustment": 1.0}), C, counts)(logits, labels)
    assert float(got) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ConfigError, match="logit_adjustment=1.0 needs the training set's class counts"):
        FocalLoss(FocalLoss.make_config({"logit_adjustment": 1.0}), C)
