"""The FER-2013 mini-Xception as a prior over a corpus's labels: its 7 expressions mapped by name.

FER-2013's classes (angry, disgust, fear, happy, sad, surprise, neutral) are matched to a corpus's
label names through common synonyms (anger/angry, joy/happy, fearful/fear, surprised/surprise...).
A corpus class with no FER counterpart (RAVDESS "calm") gets probability 0 from the prior; FER
classes the corpus lacks are dropped and the rest renormalised. This gives a zero-shot video
classifier, and the starting point of MIMAMO's head (``prior_labels``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from emofuse.core import ConfigError
from emofuse.plugins.encoders.fer_xception import FER_LABELS

#: FER-2013 class -> the label names it answers to.
FER_SYNONYMS: dict[str, tuple[str, ...]] = {
    "angry": ("angry", "anger", "ang", "annoyed", "frustrated", "frustration"),
    "disgust": ("disgust", "disgusted", "dis"),
    "fear": ("fear", "fearful", "afraid", "scared", "fea"),
    "happy": ("happy", "happiness", "joy", "joyful", "hap", "excited"),
    "sad": ("sad", "sadness", "unhappy"),
    "surprise": ("surprise", "surprised", "sur"),
    "neutral": ("neutral", "neu"),
}
_BY_NAME = {name: FER_LABELS.index(fer) for fer, names in FER_SYNONYMS.items() for name in names}
#: Probability floor before the log, so a class the prior rules out can still be learned.
PRIOR_FLOOR = 1e-4


def fer_label_map(label_names: Sequence[str]) -> list[int | None]:
    """For each corpus label, the FER class index it corresponds to (None: no counterpart)."""
    mapping = [_BY_NAME.get(str(name).strip().lower()) for name in label_names]
    if all(m is None for m in mapping):
        raise ConfigError(
            f"prior_labels {list(label_names)}: none of them names a FER-2013 expression",
            hint=f"FER-2013 knows {', '.join(FER_LABELS)} (and synonyms such as anger, joy, fearful, surprised)",
        )
    used = [m for m in mapping if m is not None]
    if len(used) != len(set(used)):
        raise ConfigError(f"prior_labels {list(label_names)}: two labels map to the same FER-2013 expression")
    return mapping


def map_fer_probabilities(fer_probabilities: torch.Tensor, mapping: Sequence[int | None]) -> torch.Tensor:
    """FER probabilities ``[..., 7]`` -> corpus probabilities ``[..., C]`` (renormalised over the mapped classes)."""
    columns = [fer_probabilities[..., m] if m is not None else torch.zeros_like(fer_probabilities[..., 0])
               for m in mapping]
    mapped = torch.stack(columns, dim=-1)
    return mapped / mapped.sum(dim=-1, keepdim=True).clamp_min(1e-12)


__all__ = ["FER_SYNONYMS", "PRIOR_FLOOR", "fer_label_map", "map_fer_probabilities"]
