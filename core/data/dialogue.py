"""Conversation structure for context models: batches made of whole dialogues, and the per-batch layout
(turn order, within-dialogue speaker index, speaker change) that a context model runs over.

In a conversation corpus (MELD) an utterance's emotion depends on the turns before it and on who
speaks; a context model can only see that context when the whole dialogue is in its batch, which a
plain shuffled sampler does not guarantee. Clips without a dialogue id are dialogues of one turn.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from emofuse.core.errors import ConfigError
from emofuse.core.types import Batch, Sample

#: `DialogueLayout.speaker_change` codes.
FIRST_TURN, SAME_SPEAKER, SPEAKER_CHANGED = 0, 1, 2


def group_dialogues(dialogue_ids: Sequence[str | None], utterance_indices: Sequence[int | None]) -> list[list[int]]:
    """Positions grouped by dialogue, each group in utterance order; groups in order of first appearance.

    A position without a dialogue id is a group of its own; ties (or missing utterance indices) keep
    the given order.
    """
    groups: dict[object, list[int]] = {}
    for i, dia in enumerate(dialogue_ids):
        key: object = ("dialogue", dia) if dia is not None else ("alone", i)
        groups.setdefault(key, []).append(i)
    out = []
    for members in groups.values():
        order = sorted(range(len(members)), key=lambda j: (
            utterance_indices[members[j]] if utterance_indices[members[j]] is not None else j, j))
        out.append([members[j] for j in order])
    return out


class DialogueBatchSampler:
    """Batches of whole dialogues (up to `max_utterances` turns each; a longer dialogue gets a batch of
    its own), dialogues shuffled per epoch when `shuffle` is set. With several processes each rank gets
    whole dialogues of every global batch, so no dialogue is cut across ranks.

    Has the interface of `emofuse.core.engine.distributed.ShardedBatchSampler` (`set_epoch`, `global_batches`).
    """

    def __init__(self, samples: Sequence[Sample], max_utterances: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if max_utterances < 1:
            raise ConfigError(f"dialogue batches need max_utterances >= 1, got {max_utterances}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world size {world_size}")
        self.dialogues = group_dialogues([s.dialogue_id for s in samples], [s.utterance_index for s in samples])
        self.max_utterances, self.shuffle, self.seed = max_utterances, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_dialogue_batches(self) -> list[list[list[int]]]:
        order = list(range(len(self.dialogues)))
        if self.shuffle:
            rng = np.random.default_rng((self.seed * 1_000_003 + self.epoch * 7919 + 12345) % (2**63 - 1))
            rng.shuffle(order)
        batches: list[list[list[int]]] = []
        current: list[list[int]] = []
        size = 0
        for d in order:
            dialogue = self.dialogues[d]
            if current and size + len(dialogue) > self.max_utterances:
                batches.append(current)
                current, size = [], 0
            current.append(dialogue)
            size += len(dialogue)
        if current:
            batches.append(current)
        return batches

    def global_batches(self) -> list[list[int]]:
        """Every global batch as positions into the samples (dialogues contiguous, turns in order)."""
        return [[i for d in batch for i in d] for batch in self._global_dialogue_batches()]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_dialogue_batches():
            part = [i for d in batch[self.rank::self.world_size] for i in d]
            if part:
                yield part

    def __len__(self) -> int:
        return sum(1 for b in self._global_dialogue_batches() if b[self.rank::self.world_size])


@dataclass
class DialogueLayout:
    """A batch's utterances arranged as ``[D, T]`` dialogues x turns (padded), with speaker signals.

    - `index`: position in the batch of each turn (0 on padding; use `mask`)
    - `mask`: True on real turns
    - `speaker_index`: order of first appearance of the turn's speaker within its dialogue (0, 1, ...)
    - `speaker_change`: `FIRST_TURN`, `SAME_SPEAKER` or `SPEAKER_CHANGED` against the previous turn
    """

    index: torch.Tensor
    mask: torch.Tensor
    speaker_index: torch.Tensor
    speaker_change: torch.Tensor

    @property
    def num_dialogues(self) -> int:
        return int(self.index.shape[0])

    def gather(self, per_utterance: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` per-utterance values -> ``[D, T, ...]`` (zeros on padding)."""
        out = per_utterance[self.index.reshape(-1)].reshape(*self.index.shape, *per_utterance.shape[1:])
        mask = self.mask.reshape(*self.mask.shape, *([1] * (per_utterance.dim() - 1)))
        return out * mask.to(out.dtype)

    def scatter(self, per_turn: torch.Tensor, batch_size: int) -> torch.Tensor:
        """``[D, T, ...]`` values -> ``[B, ...]`` in the batch's order (the inverse of `gather`)."""
        flat_mask = self.mask.reshape(-1)
        rows = per_turn.reshape(-1, *per_turn.shape[2:])[flat_mask]
        out = per_turn.new_zeros(batch_size, *per_turn.shape[2:])
        return out.index_copy(0, self.index.reshape(-1)[flat_mask], rows)


def dialogue_fields(batch: Batch) -> tuple[list[str | None], list[int | None], list[str | None]]:
    """`batch`'s dialogue ids, utterance indices and speakers, one entry per utterance each (None where
    the batch does not carry them)."""
    b = len(batch)
    ids = list(batch.dialogue_ids or [None] * b)
    order = list(batch.utterance_indices or [None] * b)
    speakers = list(batch.speakers) if batch.speakers and len(batch.speakers) == b else [None] * b
    return ids, order, speakers


def dialogue_layout(batch: Batch) -> DialogueLayout:
    """The dialogue layout of `batch` from `Batch.dialogue_ids`, `Batch.utterance_indices` and
    `Batch.speakers`; a batch without dialogue ids is B dialogues of one turn."""
    return layout_from_lists(*dialogue_fields(batch), device=batch.labels.device)


def layout_from_lists(dialogue_ids: Sequence[str | None], utterance_indices: Sequence[int | None],
                      speakers: Sequence[str | None], *, device: torch.device | str = "cpu") -> DialogueLayout:
    groups = group_dialogues(dialogue_ids, utterance_indices)
    longest = max((len(g) for g in groups), default=1)
    d = len(groups)
    index = torch.zeros(d, longest, dtype=torch.long)
    mask = torch.zeros(d, longest, dtype=torch.bool)
    speaker_index = torch.zeros(d, longest, dtype=torch.long)
    change = torch.zeros(d, longest, dtype=torch.long)
    for row, group in enumerate(groups):
        seen: dict[object, int] = {}
        previous: object = None
        for t, pos in enumerate(group):
            # an unknown speaker is a new person each turn: it cannot be matched to anyone
            who: object = speakers[pos] if speakers[pos] else ("unknown", pos)
            index[row, t] = pos
            mask[row, t] = True
            speaker_index[row, t] = seen.setdefault(who, len(seen))
            change[row, t] = FIRST_TURN if t == 0 else (SAME_SPEAKER if who == previous else SPEAKER_CHANGED)
            previous = who
    return DialogueLayout(index.to(device), mask.to(device), speaker_index.to(device), change.to(device))


def needs_whole_dialogues(model: object) -> bool:
    """Whether any branch of a composed model reads dialogue context (``batches_by_dialogue``)."""
    branches = getattr(model, "branches", {})
    return any(bool(getattr(encoder, "batches_by_dialogue", False)) for encoder in branches.values())


def batch_positions(samples: Sequence[Sample], batch_size: int, *, by_dialogue: bool) -> list[list[int]]:
    """Positions of `samples` cut into batches for scoring: in order, `batch_size` at a time, or (for
    context models) whole dialogues exactly as the trainer batches them (`DialogueBatchSampler`)."""
    if by_dialogue:
        return DialogueBatchSampler(samples, batch_size, shuffle=False).global_batches()
    return [list(range(start, min(start + batch_size, len(samples)))) for start in range(0, len(samples), batch_size)]


def dialogue_loader(bundle, split: str, *, max_utterances: int, shuffle: bool, seed: int, modalities: set[str],
                    epoch: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1):
    """Batches of whole dialogues of `split` from a `DataBundle` (same dataset, collate and bad-clip
    policy as `DataBundle.loader`), for training and scoring context models."""
    from emofuse.core.data.pipeline import BundleLoader

    base = bundle.loader(split, batch_size=1, shuffle=False, seed=seed, modalities=set(modalities),
                         num_workers=num_workers)
    sampler = DialogueBatchSampler(bundle.splits[split], max_utterances, shuffle=shuffle, seed=seed, rank=rank,
                                   world_size=world_size)
    sampler.set_epoch(epoch)
    return BundleLoader(base.dataset, on_bad_sample=bundle.on_bad_sample, skipped=bundle.skipped,
                        batch_sampler=sampler, collate_fn=base.collate_fn, num_workers=base.num_workers,
                        worker_init_fn=base.worker_init_fn)
