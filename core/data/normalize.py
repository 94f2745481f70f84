"""Zero-mean, unit-variance scaling of per-clip feature vectors and age, fitted on the training split only.

Fitting on train alone keeps validation and test statistics out of the model; the fitted state is
a flat dict of tensors so it is saved beside the weights in the checkpoint and restored for prediction.
Frames (fixed ImageNet statistics) and waveforms (scaled per utterance by speech encoders) are
not touched here: corpus-level statistics of raw pixels or samples carry no useful signal.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Iterable

import numpy as np
import torch

from emofuse.core.types import Batch, Sample

log = logging.getLogger("emofuse.data")

#: A dimension whose spread is below this is left unscaled (std 1): constant columns carry nothing.
_MIN_STD = 1e-8


class Normalizer:
    """Per-dimension mean and std of each feature set, and of age (over clips whose age is known)."""

    def __init__(self) -> None:
        self.feature_mean: dict[str, torch.Tensor] = {}
        self.feature_std: dict[str, torch.Tensor] = {}
        self.age_mean: float | None = None
        self.age_std: float | None = None
        self._warned: set[str] = set()

    # -- fitting ---------------------------------------------------------------------------
    def fit(self, items: Iterable[Sample | Batch]) -> "Normalizer":
        """Estimate the statistics from training `Sample`s or un-normalised `Batch`es (or a mix)."""
        features: dict[str, list[np.ndarray]] = {}
        ages: list[np.ndarray] = []
        for item in items:
            if isinstance(item, Sample):
                for name, vec in item.features.items():
                    features.setdefault(name, []).append(np.asarray(vec, dtype=np.float64).reshape(1, -1))
                if item.age is not None and not math.isnan(float(item.age)):
                    ages.append(np.array([float(item.age)]))
            elif isinstance(item, Batch):
                if item.extra.get("normalized"):
                    raise ValueError("fit() needs raw batches; this one is already normalised")
                masks = item.feature_present
                for name, tensor in item.features.items():
                    rows = tensor.detach().cpu().double().numpy()
                    mask = masks.get(name)
                    if mask is not None:
                        rows = rows[mask.cpu().numpy().astype(bool)]
                    features.setdefault(name, []).append(rows)
                if item.age is not None:
                    age = item.age.detach().cpu().double().numpy()
                    ages.append(age[~np.isnan(age)])
            else:
                raise TypeError(f"Normalizer.fit takes Samples or Batches, got {type(item).__name__}")
        for name, chunks in features.items():
            data = np.concatenate(chunks, axis=0)
            if data.shape[0] == 0:
                continue
            mean = data.mean(axis=0)
            std = data.std(axis=0)
            std = np.where(std < _MIN_STD, 1.0, std)
            self.feature_mean[name] = torch.from_numpy(mean.astype(np.float32))
            self.feature_std[name] = torch.from_numpy(std.astype(np.float32))
        all_ages = np.concatenate(ages) if ages else np.zeros(0)
        if all_ages.size:
            self.age_mean = float(all_ages.mean())
            std = float(all_ages.std())
            self.age_std = std if std >= _MIN_STD else 1.0
        return self

    # -- applying --------------------------------------------------------------------------
    def apply(self, batch: Batch) -> Batch:
        """A copy of `batch` with features and known ages standardised; absent rows stay zero."""
        if batch.extra.get("normalized"):
            return batch
        masks = batch.feature_present
        features = {}
        for name, tensor in batch.features.items():
            if name not in self.feature_mean:
                if name not in self._warned:
                    log.warning("feature set %r has no training statistics; it is passed on unscaled", name)
                    self._warned.add(name)
                features[name] = tensor
                continue
            mean, std = self.feature_mean[name], self.feature_std[name]
            if tensor.shape[-1] != mean.shape[0]:
                raise ValueError(
                    f"feature set {name!r} has {tensor.shape[-1]} values per clip, "
                    f"but the normaliser was fitted on {mean.shape[0]}"
                )
            scaled = (tensor - mean.to(tensor.device, tensor.dtype)) / std.to(tensor.device, tensor.dtype)
            mask = masks.get(name)
            if mask is not None:
                scaled = torch.where(mask.to(tensor.device)[:, None], scaled, torch.zeros_like(scaled))
            features[name] = scaled
        age = batch.age
        if age is not None and self.age_mean is not None:
            age = (age - self.age_mean) / self.age_std  # NaN (unknown) stays NaN
        extra = dict(batch.extra)
        extra["normalized"] = True
        return dataclasses.replace(batch, features=features, age=age, extra=extra)

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors for a safetensors checkpoint: ``feature.<name>.mean|std``, ``age.mean|std``."""
        state: dict[str, torch.Tensor] = {}
        for name in sorted(self.feature_mean):
            state[f"feature.{name}.mean"] = self.feature_mean[name].clone()
            state[f"feature.{name}.std"] = self.feature_std[name].clone()
        if self.age_mean is not None:
            state["age.mean"] = torch.tensor(self.age_mean, dtype=torch.float64)
            state["age.std"] = torch.tensor(self.age_std, dtype=torch.float64)
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Normalizer":
        norm = cls()
        for key, value in state.items():
            if key.startswith("feature.") and key.endswith(".mean"):
                name = key[len("feature.") : -len(".mean")]
                std_key = f"feature.{name}.std"
                if std_key not in state:
                    raise ValueError(f"normaliser state has {key} but no {std_key}")
                norm.feature_mean[name] = value.detach().cpu().float()
                norm.feature_std[name] = state[std_key].detach().cpu().float()
            elif key in ("age.mean", "age.std", ) or (key.startswith("feature.") and key.endswith(".std")):
                continue
            else:
                raise ValueError(f"unknown key {key!r} in normaliser state")
        if "age.mean" in state:
            norm.age_mean = float(state["age.mean"])
            norm.age_std = float(state["age.std"])
        return norm

    def fingerprint(self) -> str:
        """Hash of the statistics, so cached outputs computed from normalised inputs follow them."""
        h = hashlib.sha256()
        for key, value in sorted(self.state_dict().items()):
            h.update(key.encode())
            h.update(value.numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        sets = ", ".join(f"{k}[{v.shape[0]}]" for k, v in sorted(self.feature_mean.items()))
        age = f"age {self.age_mean:.1f}±{self.age_std:.1f}" if self.age_mean is not None else "age unknown"
        return f"Normalizer({sets or 'no features'}; {age})"
