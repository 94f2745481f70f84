"""The one route from a batch to encoder outputs: each encoder's frozen features from a `FeatureStore`
(computed once per clip, then kept), then its trainable head. Training, scoring, evaluation and
prediction all go this way, so a frozen backbone never runs twice over a clip the store holds.

Scoring without a modality (an ablation) reads the same stored features: the encoder sees the modality
marked absent, and the conformance suite holds every encoder to ignoring what it extracted from an
absent modality (`emofuse.core.testing.checks`), so no backbone reruns for it.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from emofuse.core.data.collate import drop_modalities, select
from emofuse.core.data.feature_store import FeatureStore, batch_keys, encoder_namespace
from emofuse.core.data.speaker_norm import unwrapped
from emofuse.core.engine.compose import ComposedModel
from emofuse.core.engine.loaders import light_modalities
from emofuse.core.interfaces import Encoder
from emofuse.core.types import Batch, EncoderOutput, Sample

#: Decodes `samples` with `modalities`, in order, `Batch` by batch (a bound `batches_of`, a loader).
BatchSource = Callable[[Sequence[Sample], set[str]], Iterable[Batch]]


def extracted_features(encoder: Encoder, batch: Batch, store: FeatureStore | None) -> dict[str, torch.Tensor] | None:
    """The encoder's frozen features for `batch` from `store` (computed and kept where missing); None when
    the encoder has no frozen part, or no store is given (the encoder then extracts them itself)."""
    if store is None or not encoder.cacheable:
        return None
    return store.extract(encoder, batch)


def encoder_output(encoder: Encoder, batch: Batch, store: FeatureStore | None = None, *,
                   without: Sequence[str] = ()) -> EncoderOutput:
    """One encoder's output for `batch`, `without` those modalities (marked absent after extraction)."""
    seen = drop_modalities(batch, without) if without else batch
    return encoder(seen, extracted_features(encoder, batch, store))


def branch_outputs(model: ComposedModel, batch: Batch, store: FeatureStore | None = None, *,
                   without: Sequence[str] = ()) -> dict[str, EncoderOutput]:
    """Every branch's output for `batch` by branch name (see `encoder_output`)."""
    seen = drop_modalities(batch, without) if without else batch
    return {name: enc(seen, extracted_features(enc, batch, store)) for name, enc in model.branches.items()}


def model_outputs(model: ComposedModel, batch: Batch, store: FeatureStore | None = None, *,
                  without: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, EncoderOutput]]:
    """(final logits, branch outputs): the fusion over the branches, or the only branch's logits."""
    outputs = branch_outputs(model, batch, store, without=without)
    if model.fusion is None:
        (only,) = outputs.values()
        return only.logits, outputs
    return model.fusion(outputs), outputs


def batches_with_features(encoders: Iterable[Encoder], store: FeatureStore, samples: Sequence[Sample],
                          modalities: Iterable[str], batches: BatchSource, *, device: torch.device | str = "cpu",
                          on_missing: str = "error", progress: Callable[[int, int], None] | None = None) -> list[Batch]:
    """Batches of `samples` that decode no frames or waveforms whose features `store` holds.

    A light pass (text, features, metadata: no media) reads every clip's keys; the clips some cacheable
    encoder has no features for are decoded once, their features extracted into `store`; the light
    batches are returned (kept in memory: they carry no media). A clip whose media cannot be decoded in
    skip mode (`on_missing = "skip"`) is left out; otherwise it fails as decoding failed.
    `progress(done, total)` is called per decoded batch of the filling pass.
    """
    encoders = list(encoders)
    modalities = set(modalities)
    light = set().union(*(light_modalities(e) for e in encoders)) & modalities
    if light >= modalities:  # nothing to save: the batches decode what the encoders read anyway
        return list(batches(samples, modalities))
    cacheable = [e for e in encoders if e.cacheable]
    kept = list(batches(samples, light))
    lacking = _lacking(cacheable, store, kept)
    if lacking:
        todo = [s for s in samples if s.id in lacking]
        filling = list(batches(todo, modalities))
        filler = unwrapped(store)  # raw features in; a per-speaker store's statistics need every clip stored first
        for done, batch in enumerate(filling, 1):
            on_device = batch.to(device)
            for enc in cacheable:
                filler.extract(enc, on_device)
            if progress is not None:
                progress(done, len(filling))
        still = _lacking(cacheable, store, kept)
        if still:
            if on_missing != "skip":  # the decoding pass raised for a bad clip unless skipping; this is a bug
                raise RuntimeError(f"{len(still)} clips still have no stored features after extraction")
            kept = [select(b, [i for i, sid in enumerate(b.ids) if sid not in still]) for b in kept]
            kept = [b for b in kept if len(b)]
    return kept


def _lacking(encoders: Sequence[Encoder], store: FeatureStore, light: Sequence[Batch]) -> set[str]:
    """Ids of the clips of `light` that some encoder in `encoders` has no stored features for."""
    out: set[str] = set()
    for enc in encoders:
        namespace = encoder_namespace(enc)
        for batch in light:
            keys = batch_keys(batch, enc.modalities)
            missing = set(store.missing(namespace, keys))
            out.update(sid for sid, key in zip(batch.ids, keys) if key in missing)
    return out
