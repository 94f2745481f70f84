"""The neighbouring turns of each utterance as text, for a text encoder that reads them with the utterance.

A fine-tuned transformer can attend from an utterance's words to the turns around it when both are in
its input (the utterance first, its context as the second segment), which an LSTM over frozen per-
utterance vectors cannot. Each turn is written ``"Speaker: words"``; past turns nearest first, so
truncation drops the oldest. The turns come from the batch itself, so the encoder that asks for them
batches whole dialogues (`Encoder.batches_by_dialogue`); a clip alone has no context.
"""
from __future__ import annotations

from emofuse.core import Batch, dialogue_fields, group_dialogues

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
