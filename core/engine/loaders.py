"""Batches for the trainer: the same global batches on one process or several, and the frozen
backbones' features extracted once into the feature cache before training starts."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence, Sized

import torch
from torch.utils.data import DataLoader

from emofuse.core.config import RunConfig
from emofuse.core.engine.distributed import (
    DistContext,
    ShardedBatchSampler,
)
from emofuse.core.engine.progress import note, reporter
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import Encoder
from emofuse.core.types import AUDIO, VIDEO


def base_loader(bundle: Any, split: str, modalities: set[str], batch_size: int, seed: int, num_workers: int) -> Any:
    return bundle.loader(split, batch_size=batch_size, shuffle=False, seed=seed, modalities=set(modalities),
                         num_workers=num_workers)


def split_batches(
    bundle: Any, split: str, *, modalities: set[str], batch_size: int, shuffle: bool, seed: int, epoch: int,
    ctx: DistContext, num_workers: int = 0, training: bool = False, lengths: Sequence[int] | None = None,
) -> DataLoader:
    """This rank's batches of `split`: global batches drawn by `ShardedBatchSampler`, so one process and
    several cut the data identically; the bundle's dataset, collate function and bad-clip policy load them.
    `lengths` (see `padding_lengths`) groups shuffled batches by length."""
    base = base_loader(bundle, split, modalities, batch_size, seed, num_workers)
    if not isinstance(base, DataLoader) or not isinstance(base.dataset, Sized):
        raise TypeError("DataBundle.loader must return a torch DataLoader over a sized dataset")
    sampler = ShardedBatchSampler(len(base.dataset), batch_size, shuffle=shuffle, seed=seed, rank=ctx.rank,
                                  world_size=ctx.world_size, drop_small_last=training, lengths=lengths)
    sampler.set_epoch(epoch)
    options: dict[str, Any] = dict(
        batch_sampler=sampler, collate_fn=base.collate_fn, num_workers=base.num_workers,
        worker_init_fn=base.worker_init_fn, pin_memory=base.pin_memory,
        generator=torch.Generator().manual_seed(seed * 1_000 + epoch),
    )
    if base.num_workers:
        options["multiprocessing_context"] = base.multiprocessing_context
    from emofuse.core.data.pipeline import BundleLoader

    if isinstance(base, BundleLoader):
        return BundleLoader(base.dataset, on_bad_sample=bundle.on_bad_sample, skipped=bundle.skipped, **options)
    return DataLoader(base.dataset, **options)


def padding_lengths(samples: Sequence[Any], modalities: set[str]) -> list[int]:
    """What a batch of each sample pads to, known before decoding: the audio file's size when the
    encoder reads audio (its duration, for one corpus's format), else the transcript's characters."""
    if AUDIO in modalities:
        return [os.path.getsize(s.audio_path) if s.audio_path and os.path.exists(s.audio_path) else 0 for s in samples]
    return [len(s.text or "") for s in samples]


def light_modalities(encoder: Encoder) -> set[str]:
    """What the loader must decode once `encoder`'s frozen features are cached: no frames, no waveforms."""
    mods = set(encoder.modalities)
    return mods - {VIDEO, AUDIO} if encoder.cacheable else mods


def ensure_extracted(encoder: Encoder, cache: Any, bundle: Any, *, splits: Sequence[str], batch_size: int, seed: int,
                     num_workers: int, ctx: DistContext, progress: bool) -> None:
    """Fill `cache` with `encoder.extract` outputs for every clip of `splits` (main rank; others wait).

    A first pass without decoding media collects the clips' keys; only when some are missing does a
    second pass decode them and run the backbone.
    """
    from emofuse.core.data.cache import batch_keys, encoder_namespace
    from emofuse.core.data.speaker_norm import unwrapped

    if not encoder.cacheable:
        return
    cache = unwrapped(cache)  # filling stores raw features; a per-speaker wrapper's statistics need them all first
    if ctx.is_main:
        namespace = encoder_namespace(encoder)
        light = light_modalities(encoder)
        for split in splits:
            if not bundle.splits.get(split):
                continue
            missing = 0
            for batch in split_batches(bundle, split, modalities=light, batch_size=batch_size, shuffle=False,
                                       seed=seed, epoch=0, ctx=DistContext(device=ctx.device), num_workers=num_workers):
                missing += len(cache.missing(namespace, batch_keys(batch, encoder.modalities)))
            if not missing:
                continue
            full = split_batches(bundle, split, modalities=set(encoder.modalities), batch_size=batch_size,
                                 shuffle=False, seed=seed, epoch=0, ctx=DistContext(device=ctx.device),
                                 num_workers=num_workers)
            with reporter(progress).steps(f"{encoder.name}: frozen features ({split})", len(full)) as tick:
                for batch in full:
                    cache.extract(encoder, batch.to(ctx.device))
                    tick()
    ctx.barrier()
    if bundle.on_bad_sample == "skip":
        drop_uncached(encoder, cache, bundle, splits)


def drop_uncached(encoder: Encoder, cache: Any, bundle: Any, splits: Sequence[str]) -> None:
    """Skip mode: take the clips whose features could not be extracted (already listed in
    ``bundle.skipped`` by the decoding pass) out of `splits`, so that later passes, which read the
    cache instead of decoding, do not meet them again. Every rank does this on the same cache."""
    from emofuse.core.data.cache import encoder_namespace
    from emofuse.core.data.keys import sample_key

    namespace = encoder_namespace(encoder)
    for split in splits:
        samples = bundle.splits.get(split) or []
        keys = [sample_key(s, encoder.modalities, spec=bundle.spec, normalizer=bundle.normalizer) for s in samples]
        missing = set(cache.missing(namespace, keys))
        if missing:
            bundle.splits[split] = [s for s, k in zip(samples, keys) if k not in missing]


def cache_root(config: RunConfig) -> Path:
    """The run's feature-cache folder: ``cache_dir``, else ``<output_dir>/.cache``."""
    return Path(config.cache_dir) if config.cache_dir is not None else Path(config.output_dir) / ".cache"


def open_cache(config: RunConfig) -> Any:
    from emofuse.core.data.cache import FeatureCache

    return FeatureCache(cache_root(config), notify=note)


def existing_cache(config: RunConfig) -> Any:
    """The run's feature cache when its folder exists here (a checkpoint scored where it was trained), else
    None: scoring then computes frozen features as it goes and writes nothing."""
    return open_cache(config) if cache_root(config).is_dir() else None


def feature_store(config: RunConfig, bundle: Any, *, existing: bool = False) -> Any:
    """The store every route reads frozen features through: `open_cache` (with `existing`, `existing_cache`:
    None when the run's cache folder is not here), wrapped by `SpeakerNormalizedFeatures` over `bundle`'s clips
    with ``data.speaker_normalization = "per-speaker"`` (transductive: each speaker's features standardised over
    all that speaker's clips, test clips included; its statistics are read from stored features, so the cache
    is opened, and made, even with `existing`)."""
    from emofuse.core.data.speaker_norm import PER_SPEAKER, SpeakerNormalizedFeatures

    wanted, loaded = config.data.speaker_normalization, getattr(bundle, "speaker_normalization", "none")
    if wanted != loaded:  # the feature tables were (or were not) standardised when the bundle was read
        raise ConfigError(f"data.speaker_normalization: the run asks for {wanted!r}, its data was read with {loaded!r}",
                          hint="load the data with the run's own data config (emofuse.core.data.load_data)")
    if wanted == PER_SPEAKER:
        return SpeakerNormalizedFeatures(open_cache(config), bundle)
    return existing_cache(config) if existing else open_cache(config)
