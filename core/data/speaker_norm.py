"""Per-speaker standardisation (``data.speaker_normalization = "per-speaker"``). TRANSDUCTIVE.

Each clip's inputs are standardised (zero mean, unit variance per dimension) with the statistics of its
speaker, computed over every clip of that speaker in the data bundle, whatever its split: the test
speakers' clips shape the test speakers' inputs. No label is read, but the setting is not that of a model
meeting one new clip: it assumes a batch of each test speaker's recordings at hand beforehand (the usual
"speaker normalisation" of emotion-recognition papers). Speaker differences (voice, face, recording) are
a large share of the variance of frozen features, which is why it helps so much on acted corpora.

One statistic per place, the same idea each time:
- feature tables (`Sample.features`, e.g. RAVDESS's action units): `standardize_tables`, in `load_data`,
  before the train-fitted `Normalizer` (which is then about the identity);
- the frozen backbones' cached features (`Encoder.extract`): `SpeakerNormalizedFeatures` wraps the feature
  store, statistics over all frames of all the speaker's cached clips (padding excluded);
- the baselines' pooled per-clip vectors: `standardize_by_speaker`, before their own scaler.

A single clip has no speaker statistics: `refuse_single_clips` turns such checkpoints away from
prediction and serving (`emofuse evaluate CHECKPOINT --data DIR` scores a folder of clips instead).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from emofuse.core.data.feature_store import encoder_namespace
from emofuse.core.errors import ConfigError
from emofuse.core.types import Batch, Sample

OPTION = "data.speaker_normalization"
PER_SPEAKER = "per-speaker"
#: A dimension whose spread within a speaker is below this is only centred (std 1), as in `Normalizer`.
MIN_STD = 1e-8

__all__ = ["OPTION", "PER_SPEAKER", "SpeakerNormalizedFeatures", "refuse_checkpoint", "refuse_single_clips",
           "speakers_of", "standardize_by_speaker", "standardize_tables", "unwrapped"]


def speakers_of(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """speaker -> that speaker's clips; a clip without a speaker is refused (it would have no statistics)."""
    groups: dict[str, list[Sample]] = {}
    lacking = []
    for s in samples:
        if s.speaker is None or not str(s.speaker).strip():
            lacking.append(s)
        else:
            groups.setdefault(str(s.speaker), []).append(s)
    if lacking:
        raise ConfigError(f"{OPTION} = {PER_SPEAKER!r} (transductive) needs a speaker on every clip; "
                          f"{len(lacking)} clip(s) have none (e.g. {lacking[0].source or lacking[0].id})",
                          hint=f"give the clips speakers (a manifest's speaker column) or set {OPTION} = 'none'")
    return groups


def _mean_std(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of `rows` [N, D] (NaN ignored; a flat or empty column: mean as is, std 1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column with no number
        mean, std = np.nanmean(rows, axis=0), np.nanstd(rows, axis=0)
    return np.nan_to_num(mean), np.where(~np.isfinite(std) | (std < MIN_STD), 1.0, std)


def standardize_tables(splits: Mapping[str, Sequence[Sample]]) -> dict[str, list[Sample]]:
    """`splits` with every clip's feature vectors standardised by its speaker's statistics over that speaker's
    clips of all splits (per vector name, over the clips that have it); copies, the readers' samples untouched."""
    every = [s for part in splits.values() for s in part]
    scaled: dict[int, dict[str, np.ndarray]] = {}
    for clips in speakers_of(every).values():
        names = sorted({n for s in clips for n in s.features})
        for name in names:
            having = [s for s in clips if name in s.features]
            rows = np.stack([np.asarray(s.features[name], dtype=np.float64).reshape(-1) for s in having])
            mean, std = _mean_std(rows)
            for s, row in zip(having, (rows - mean) / std):
                scaled.setdefault(id(s), {})[name] = row.astype(np.float32)
    return {split: [dataclasses.replace(s, features={**s.features, **scaled[id(s)]}) if id(s) in scaled else s
                    for s in part] for split, part in splits.items()}


def standardize_by_speaker(vectors: Mapping[str, np.ndarray], speaker_of: Mapping[str, str]) -> dict[str, np.ndarray]:
    """clip id -> vector, each standardised by its speaker's statistics over all of `vectors`' clips of that
    speaker (`speaker_of`: clip id -> speaker)."""
    groups: dict[str, list[str]] = {}
    for clip in vectors:
        groups.setdefault(speaker_of[clip], []).append(clip)
    out: dict[str, np.ndarray] = {}
    for clips in groups.values():
        rows = np.stack([np.asarray(vectors[c], dtype=np.float64) for c in clips])
        mean, std = _mean_std(rows)
        out.update(zip(clips, (rows - mean) / std))
    return out


class _Moments:
    """Running count, mean and sum of squared deviations per dimension (Chan et al.'s merge, float64)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to("cpu", torch.float64)
        k = rows.shape[0]
        if not k:
            return
        if self.mean is not None and rows.shape[1:] != self.mean.shape:
            raise ValueError(f"{OPTION}: a cached feature's last dimension varies between clips ({rows.shape[1]} "
                             f"vs {self.mean.shape[0]}); only tensors of a fixed width can be standardised per speaker")
        mean = rows.mean(dim=0)
        m2 = ((rows - mean) ** 2).sum(dim=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = k, mean, m2
            return
        total = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * k / total)
        self.n = total

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        std = (self.m2 / self.n).sqrt()
        return self.mean.float(), torch.where(std < MIN_STD, torch.ones_like(std), std).float()


class SpeakerNormalizedFeatures:
    """A feature store whose `extract` returns each clip's frozen features standardised by its speaker.

    Wraps a `FeatureStore` (``extract``, ``get_many``, ``put_many``, ``missing``: `FeatureCache` on disk):
    `extract` calls the inner store's, then standardises every floating tensor per last dimension with the
    statistics of the row's speaker, computed once per (encoder namespace, speaker) from the cached entries of
    all that speaker's clips in `bundle` (every split: TRANSDUCTIVE), all frames of a sequence counted, padding
    excluded (stored entries are unpadded; padded positions stay zero). Everything else reaches the inner
    store unchanged: the cache holds raw features only, and what is computed from them (statistics) is not stored.
    An encoder that is not cacheable (a backbone that trains) has no stored statistics: its features pass as
    computed (the trainers do not ask a store for them anyway).
    """

    def __init__(self, store: Any, bundle: Any):
        self.store = store
        #: What the statistics are taken over: ``splits`` (name -> clips), and the ``spec`` and ``normalizer``
        #: its batches are decoded with (they enter the clips' keys): a `DataBundle`, or see `over`.
        self.bundle = bundle
        self._stats: dict[tuple[str, str], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def over(cls, store: Any, clips: Sequence[Sample], *, spec: Any, normalizer: Any) -> "SpeakerNormalizedFeatures":
        """A store standardising by the statistics of `clips` alone (another corpus's, say), whose batches are
        decoded with `spec` and `normalizer` (a checkpoint's own)."""
        return cls(store, _Clips({"clips": list(clips)}, spec, normalizer))

    def __getattr__(self, name: str) -> Any:
        if name in ("store", "bundle"):  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.store, name)

    def extract(self, encoder: Any, batch: Batch) -> dict[str, torch.Tensor]:
        extracted = self.store.extract(encoder, batch)
        if not encoder.cacheable:
            return extracted
        namespace = encoder_namespace(encoder)
        speakers = list(batch.speakers or [])
        if len(speakers) != len(batch):
            raise ConfigError(f"{OPTION}: batch of {len(batch)} clips carries {len(speakers)} speakers",
                              hint="build batches with emofuse.core.data (loader or make_batch)")
        stats = [self.statistics(encoder, namespace, speaker, clip) for speaker, clip in zip(speakers, batch.ids)]
        out = dict(extracted)
        for name, value in extracted.items():
            if not value.is_floating_point() or value.dim() < 2 or not all(name in s for s in stats):
                continue  # lengths, scalars, integer ids: nothing to standardise
            mean = torch.stack([s[name][0] for s in stats]).to(value.device)
            std = torch.stack([s[name][1] for s in stats]).to(value.device)
            shape = (value.shape[0],) + (1,) * (value.dim() - 2) + (value.shape[-1],)
            scaled = (value.float() - mean.view(shape)) / std.view(shape)
            lengths = extracted.get(f"{name}_lengths")
            if value.dim() >= 3 and lengths is not None:  # a sequence: its padding stays zero
                steps = torch.arange(value.shape[1], device=value.device)
                real = steps[None, :] < lengths.to(value.device)[:, None]
                real = real.view(value.shape[:2] + (1,) * (value.dim() - 2))
                scaled = scaled * real
            out[name] = scaled.to(value.dtype)
        return out

    def statistics(self, encoder: Any, namespace: str, speaker: Any,
                   clip: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (mean, std) ``[D]`` of `speaker`'s cached features of `encoder` (computed once)."""
        if speaker is None:
            raise ConfigError(f"{OPTION} = {PER_SPEAKER!r}: clip {clip!r} has no speaker",
                              hint=f"give every clip a speaker, or set {OPTION} = 'none'")
        speaker = str(speaker)
        found = self._stats.get((namespace, speaker))
        if found is not None:
            return found
        from emofuse.core.data.keys import sample_key

        clips = [s for part in self.bundle.splits.values() for s in part if str(s.speaker) == speaker]
        if not clips:
            raise ConfigError(f"{OPTION} = {PER_SPEAKER!r}: speaker {speaker!r} (clip {clip!r}) has no clips in the "
                              "data these features are normalised over",
                              hint="score clips of the run's own data, e.g. emofuse evaluate CHECKPOINT --data DIR")
        keys = [sample_key(s, encoder.modalities, spec=self.bundle.spec, normalizer=self.bundle.normalizer)
                for s in clips]
        entries = self.store.get_many(namespace, keys)
        lacking = [s.id for s, e in zip(clips, entries) if e is None]
        if lacking:
            raise RuntimeError(
                f"{OPTION}: {len(lacking)} of speaker {speaker!r}'s {len(clips)} clips (e.g. {lacking[0]!r}) have no "
                f"cached features of encoder {encoder.name!r}; extract every split first (loaders.ensure_extracted)")
        moments: dict[str, _Moments] = {}
        for entry in entries:
            for name, tensor in entry.items():
                if tensor.is_floating_point() and tensor.dim() >= 1:
                    moments.setdefault(name, _Moments()).add(tensor.reshape(-1, tensor.shape[-1]))
        found = {name: m.mean_std() for name, m in moments.items() if m.n}
        self._stats[(namespace, speaker)] = found
        return found


@dataclasses.dataclass
class _Clips:
    """The part of a `DataBundle` that `SpeakerNormalizedFeatures` reads."""

    splits: dict[str, list[Sample]]
    spec: Any
    normalizer: Any


def unwrapped(store: Any) -> Any:
    """The plain store under a `SpeakerNormalizedFeatures` (what filling the cache writes to), else `store`."""
    return store.store if isinstance(store, SpeakerNormalizedFeatures) else store


def refuse_single_clips(config: Any, where: object) -> None:
    """Refuse to predict or serve with a model trained on per-speaker standardised inputs (`config`: its
    `RunConfig` or `DataConfig`; `where`: the checkpoint or model named in the message)."""
    _refuse(getattr(getattr(config, "data", config), "speaker_normalization", "none"), where)


def refuse_checkpoint(checkpoint: Any) -> None:
    """`refuse_single_clips` from the checkpoint's sidecar alone, before any weight is read; a sidecar that cannot
    be read is left for loading to report."""
    from pathlib import Path

    from emofuse.core.checkpoint import read_sidecar
    from emofuse.core.errors import EmofuseError

    try:
        config = read_sidecar(Path(checkpoint)).get("config")
    except (EmofuseError, OSError):
        return
    data = config.get("data") if isinstance(config, dict) else None
    _refuse(data.get("speaker_normalization") if isinstance(data, dict) else None, checkpoint)


def _refuse(setting: Any, where: object) -> None:
    if setting == PER_SPEAKER:
        raise ConfigError(f"{where}: trained with {OPTION} = {PER_SPEAKER!r} (transductive: inputs standardised over "
                          "each speaker's clips), so a single clip, without its speaker's other clips, cannot be "
                          "predicted",
                          hint="score a folder of the speakers' clips with `emofuse evaluate CHECKPOINT --data DIR`, "
                               f"or retrain with {OPTION} = 'none'")
