"""Class weights from training-set counts, shared by every loss that offers class balancing.

"Balanced" follows scikit-learn's ``compute_class_weight("balanced")``: ``n_samples / (C * n_c)``,
so a class seen half as often weighs twice as much. "sqrt-balanced" is its square root, a milder
reweighting: on a corpus dominated by one class (MELD is 47 % neutral) full balancing buys the rare
classes' recall with much of the frequent ones'. A class absent from the training counts gets weight 1
(it cannot be balanced, and an infinite weight would poison the validation loss).

The logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021) balances
the other way: it leaves every sample's weight alone and adds ``tau * log(prior)`` to the logits in the
loss alone, so the trained logits themselves, read at prediction, are those of a classifier for
balanced classes (``tau = 1``), with no reweighting to make rare-class gradients noisy.
"""
from __future__ import annotations

from typing import Sequence

import torch

from emofuse.core.errors import ConfigError

BALANCED = "balanced"
SQRT_BALANCED = "sqrt-balanced"
#: The named weightings: each the balanced weights raised to this power.
BALANCING_POWERS = {BALANCED: 1.0, SQRT_BALANCED: 0.5}


def balanced_weights(class_counts: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """``[C]`` float weights ``N / (C * n_c)``; 1.0 where a class has no sample."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    if counts.numel() == 0 or bool((counts < 0).any()):
        raise ConfigError(f"class counts must be non-negative, one per class; got {counts.tolist()}")
    total = counts.sum()
    present = counts > 0
    weights = torch.ones_like(counts)
    weights[present] = total / (counts.numel() * counts[present])
    return weights.float()


def training_counts(class_counts: torch.Tensor | Sequence[int] | None, num_classes: int, *, where: str,
                    value: object, hint: str) -> torch.Tensor:
    """The training set's class counts as ``[C]`` float64, checked: the option ``where = value`` balances by them."""
    if class_counts is None:
        raise ConfigError(f"{where}={value!r} needs the training set's class counts", hint=hint)
    counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    if counts.numel() != num_classes:
        raise ConfigError(f"{where}: {counts.numel()} class counts for {num_classes} classes")
    return counts


def class_weight_vector(
    spec: float | Sequence[float] | str | None,
    num_classes: int,
    class_counts: torch.Tensor | None,
    *,
    where: str,
) -> torch.Tensor | None:
    """Turn a loss option (None, a scalar, a per-class list, ``"balanced"`` or ``"sqrt-balanced"``) into ``[C]`` weights.

    A scalar gives None when it is 1 (no weighting) and a constant vector otherwise.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in BALANCING_POWERS:
            raise ConfigError(f"{where}: expected a number, a list of {num_classes} numbers, 'balanced' or "
                              f"'sqrt-balanced', got {spec!r}")
        counts = training_counts(class_counts, num_classes, where=where, value=spec,
                                 hint="build the loss through the trainer (it passes them) or give explicit "
                                      "per-class weights")
        return balanced_weights(counts) ** BALANCING_POWERS[spec]
    if isinstance(spec, (int, float)):
        return torch.full((num_classes,), float(spec))
    values = [float(v) for v in spec]
    if len(values) != num_classes:
        raise ConfigError(f"{where}: {len(values)} per-class values for {num_classes} classes",
                          hint=f"give exactly {num_classes} numbers, in class-index order")
    if any(v < 0 for v in values):
        raise ConfigError(f"{where}: per-class values must be non-negative, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def log_prior_offsets(tau: float, num_classes: int, class_counts: torch.Tensor | None, *, where: str) -> torch.Tensor | None:
    """``[C]`` offsets ``tau * log(n_c / N)`` added to the logits in the loss; None when ``tau`` is 0.

    A class absent from the counts is counted once (its log prior stays finite).
    """
    if not tau:
        return None
    counts = training_counts(class_counts, num_classes, where=where, value=tau,
                             hint="build the loss through the trainer (it passes them)").clamp(min=1.0)
    return (float(tau) * torch.log(counts / counts.sum())).float()
