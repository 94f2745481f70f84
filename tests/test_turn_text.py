"""Neighbouring turns read by the text encoder itself: the context segment built from the batch's own
dialogues, the utterance's tokens kept apart from it, and what that asks of batching and caching."""
from __future__ import annotations

import torch

from emofuse.core.config import ComponentRef
from emofuse.core.engine.compose import build_encoder
from emofuse.plugins.encoders.turn_text import FUTURE_MARK, turn_context

from tests.test_context import _batches, dialogue_slice, meld  # noqa: F401  (the fixtures)


def test_turn_context_is_the_dialogue_nearest_first(batch_factory):
    batch = batch_factory(4, frames=1, size=8)
    batch.text = ["hi", "how are you", "fine", "alone here"]
    batch.speakers = ["Ross", "Joey", "Ross", "Monica"]
    batch.dialogue_ids = ["d1", "d1", "d1", None]
    batch.utterance_indices = [2, 0, 1, None]  # turn order Joey, Ross(fine), Ross(hi)
    lines, contexts = turn_context(batch, past=2, future=1)
    assert lines == ["Ross: hi", "Joey: how are you", "Ross: fine", "Monica: alone here"]
    assert contexts[0] == "Ross: fine Joey: how are you"  # nearest first, no future: it is the last turn
    assert contexts[1] == FUTURE_MARK + "Ross: fine"  # the first turn: nothing before it
    assert contexts[2] == "Joey: how are you" + FUTURE_MARK + "Ross: hi"
    assert contexts[3] is None  # a clip alone has no context
    assert turn_context(batch, past=1)[1][0] == "Ross: fine"
    assert turn_context(batch, past=0)[1] == [None] * 4


def test_backbone_returns_only_the_utterance_tokens():
    from emofuse.plugins.encoders.text_backbone import TextBackbone

    backbone = TextBackbone("minilm", max_length=16).eval()
    texts = ["I can't believe you did that", "ok"]
    with torch.no_grad():
        alone = backbone.token_embeddings(texts)
        paired = backbone.token_embeddings(texts, ["Monica: we are leaving " * 20, None], context_tokens=8)
    assert [t.shape[0] for t in paired] == [t.shape[0] for t in alone]  # [CLS] words [SEP], context cut
    assert not torch.allclose(paired[0], alone[0], atol=1e-4)  # the words attended to the context


def test_text_classifier_reading_turns_batches_dialogues_and_is_not_cached(meld, dialogue_slice):  # noqa: F811
    inner = {"name": "text-classifier", "context_past_turns": 2}
    plain = build_encoder(ComponentRef(name="text-classifier"), 7, where="test")
    turns = build_encoder(ComponentRef(**inner), 7, where="test").eval()
    assert turns.batches_by_dialogue and not turns.cacheable
    assert not plain.batches_by_dialogue and plain.cacheable
    assert turns.fingerprint() != plain.fingerprint()
    wrapped = build_encoder(ComponentRef(name="dialogue-context", inner=inner, direction="none"), 7, where="test")
    assert wrapped.batches_by_dialogue  # the wrapper batches by dialogue for its inner encoder
    batch = next(_batches(meld, dialogue_slice[:30]))
    with torch.no_grad():
        out = turns(batch)
    assert out.logits.shape == (len(batch), 7) and torch.isfinite(out.logits).all()


def test_name_speaker_reads_each_utterance_with_its_speaker(meld, dialogue_slice):  # noqa: F811
    plain = build_encoder(ComponentRef(name="text-classifier"), 7, where="test")
    named = build_encoder(ComponentRef(name="text-classifier", name_speaker=True), 7,
                          where="test")
    assert named.cacheable and not named.batches_by_dialogue  # a clip's speaker is its own: still cached per clip
    assert named.fingerprint() != plain.fingerprint()
    batch = next(_batches(meld, dialogue_slice[:6]))
    with torch.no_grad():
        got = named.extract(batch)
        expected = named.text_backbone.token_embeddings([f"{s}: {t.strip()}" for s, t in zip(batch.speakers, batch.text)])
        alone = plain.extract(batch)
    for mine, want, without in zip(got, expected, alone):
        torch.testing.assert_close(mine["text_tokens"], want)
        assert mine["text_tokens"].shape[0] > without["text_tokens"].shape[0]  # the name's tokens came first
