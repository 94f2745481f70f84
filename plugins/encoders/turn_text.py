"""The neighbouring turns of each utterance as text, for a text encoder that reads them with the utterance.

A fine-tuned transformer can attend from an utterance's words to the turns around it when both are in
its input (the utterance first, its context as the second segment), which an LSTM over frozen per-
utterance vectors cannot. Each turn is written ``"Speaker: words"``; past turns nearest first, so
truncation drops the oldest. The turns come from the batch itself, so the encoder that asks for them
batches whole dialogues (`Encoder.batches_by_dialogue`); a clip alone has no context.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar

import torch

from emofuse.core import Batch, dialogue_fields, group_dialogues

#: The options of the neighbouring turns: hashed into a reader's cache key only when turns are read.
TURN_OPTIONS = ("context_past_turns", "context_future_turns", "context_tokens")

#: Between the past turns and the future ones in the context segment.
FUTURE_MARK = " || "


def speaker_line(speaker: str | None, text: str | None) -> str:
    """``"Speaker: text"``, or the text alone when the speaker is unknown."""
    words = (text or "").strip()
    return f"{speaker}: {words}" if speaker else words


def turn_context(batch: Batch, *, past: int, future: int = 0) -> tuple[list[str], list[str | None]]:
    """Per utterance of `batch`: its own line (with its speaker) and the context segment, None where the
    utterance has no neighbouring turn in the batch (or `past` and `future` are both 0)."""
    b = len(batch)
    texts = list(batch.text or [None] * b)
    dialogue_ids, utterance_indices, speakers = dialogue_fields(batch)
    lines = [speaker_line(speakers[i], texts[i]) for i in range(b)]
    contexts: list[str | None] = [None] * b
    if past <= 0 and future <= 0:
        return lines, contexts
    groups = group_dialogues(dialogue_ids, utterance_indices)
    for group in groups:
        for t, pos in enumerate(group):
            before = [lines[p] for p in reversed(group[max(0, t - past):t])] if past > 0 else []
            after = [lines[p] for p in group[t + 1:t + 1 + future]] if future > 0 else []
            if before or after:
                contexts[pos] = " ".join(before) + (FUTURE_MARK + " ".join(after) if after else "")
    return lines, contexts


class ReadsTranscripts:
    """What an encoder over a pretrained text backbone (``self.text_backbone``) shares, whether its utterances
    come alone, as ``"Speaker: words"`` or with their neighbouring turns: the backbone's training flags,
    whole-dialogue batching when turns are read, and a cache fingerprint over what shapes `extract` (its
    `extract_options` and the frozen `pretrained_modules`' weights), not over the head. Mixed in before
    `Encoder`; the config carries ``freeze_backbone``, ``backbone_lr_scale``, ``name_speaker`` and the turn
    options."""

    #: The config options that change `extract`'s output.
    extract_options: ClassVar[tuple[str, ...]] = ()
    config: Any
    text_backbone: Any

    @property
    def backbone_trainable(self) -> bool:
        return not self.config.freeze_backbone

    @property
    def backbone_lr_scale(self) -> float:
        """Learning-rate factor of the unfrozen backbones (read by the trainer's parameter groups)."""
        return float(self.config.backbone_lr_scale)

    @property
    def reads_turns(self) -> bool:
        """Whether the text encoder reads neighbouring turns with each utterance."""
        return bool(self.config.context_past_turns or self.config.context_future_turns)

    @property
    def batches_by_dialogue(self) -> bool:
        """The neighbouring turns come from the batch, so it must hold whole dialogues."""
        return self.reads_turns

    @property
    def cacheable(self) -> bool:
        """Not with neighbouring turns: a clip's features then depend on the rest of its dialogue."""
        return super().cacheable and not self.reads_turns  # type: ignore[misc]

    def fingerprint(self) -> str:
        """Hash of what shapes `extract`: the backbones' options and frozen weights, not the head's options,
        so heads that differ (LSTM or transformer, widths, dropout) share one set of cached features."""
        h = hashlib.sha256(self.name.encode())  # type: ignore[attr-defined]
        options = self.extract_options + (TURN_OPTIONS if self.reads_turns else ()) + (
            ("name_speaker",) if self.config.name_speaker else ())
        h.update(json.dumps({k: getattr(self.config, k) for k in options}, sort_keys=True).encode())
        prefixes = tuple(m + "." for m in self.pretrained_modules)  # type: ignore[attr-defined]
        for key, tensor in sorted(self.state_dict().items()):  # type: ignore[attr-defined]
            if key.startswith(prefixes):
                h.update(key.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def utterance_tokens(self, batch: Batch) -> list[torch.Tensor]:
        """Each utterance's token vectors: with its turns, as ``"Speaker: words"``, or its words alone."""
        c = self.config
        if self.reads_turns:
            lines, contexts = turn_context(batch, past=c.context_past_turns, future=c.context_future_turns)
            return self.text_backbone.token_embeddings(lines, contexts, context_tokens=c.context_tokens)
        if c.name_speaker:
            lines, _ = turn_context(batch, past=0)
            return self.text_backbone.token_embeddings(lines)
        return self.text_backbone.token_embeddings(list(batch.text or [""] * len(batch)))
