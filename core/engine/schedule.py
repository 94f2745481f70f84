"""Learning-rate schedule: linear warm-up, then decay to zero over the remaining steps, along a cosine
(the default) or a straight line (what transformers' fine-tuning scripts use).

Warm-up keeps AdamW's first, badly estimated moments from making large steps; the decay lets the last
epochs settle. Counted in optimizer steps (after gradient accumulation), not batches.
"""
from __future__ import annotations

import math
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

Decay = Literal["cosine", "linear"]


def warmup_decay_factor(step: int, total_steps: int, warmup_steps: int, decay: Decay = "cosine") -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_fraction: float) -> int:
    return int(round(total_steps * warmup_fraction))


def warmup_decay(optimizer: Optimizer, total_steps: int, warmup_fraction: float, decay: Decay = "cosine") -> LambdaLR:
    """A `LambdaLR` with linear warm-up over ``warmup_fraction`` of `total_steps`, then `decay` to zero."""
    total = max(1, int(total_steps))
    warmup = warmup_steps_for(total, warmup_fraction)
    return LambdaLR(optimizer, lambda step: warmup_decay_factor(step, total, warmup, decay))
