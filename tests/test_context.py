"""Dialogue context: whole-dialogue batches, the turn layout, and the context encoder's causality,
masking and training on real MELD transcripts."""
from __future__ import annotations

import pytest
import torch

from emofuse.core.engine.compose import build_encoder
from emofuse.core.config import ComponentRef, DataConfig
from emofuse.core.data.dialogue import (
    FIRST_TURN,
    SAME_SPEAKER,
    SPEAKER_CHANGED,
    DialogueBatchSampler,
    dialogue_layout,
    dialogue_loader,
    group_dialogues,
    layout_from_lists,
)
from emofuse.core.data.pipeline import load_data
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import collate_extracted
from emofuse.core.types import TEXT


@pytest.fixture(scope="module")
def meld(shared_data):
    """Real MELD train/dev transcripts (the corpus' own partition)."""
    return load_data(DataConfig(dataset="meld", data_dir=shared_data), {TEXT})


@pytest.fixture(scope="module")
def dialogue_slice(meld):
    """The first 12 train dialogues, whole (about 100 utterances)."""
    by_dialogue: dict[str, list] = {}
    for s in meld.splits["train"]:
        if len(by_dialogue) < 12 or s.dialogue_id in by_dialogue:
            by_dialogue.setdefault(s.dialogue_id, []).append(s)
    return [s for group in by_dialogue.values() for s in group]


def test_sampler_yields_whole_dialogues_in_turn_order(meld):
    samples = meld.splits["val"]
    sampler = DialogueBatchSampler(samples, 40, shuffle=True, seed=3)
    seen: list[int] = []
    for batch in sampler:
        dialogues = {samples[i].dialogue_id for i in batch}
        for d in dialogues:
            members = [i for i in batch if samples[i].dialogue_id == d]
            everywhere = [i for i, s in enumerate(samples) if s.dialogue_id == d]
            assert sorted(members) == sorted(everywhere), "a dialogue was cut across batches"
            turns = [samples[i].utterance_index for i in members]
            assert turns == sorted(turns)
        assert len(batch) <= 40 or len(dialogues) == 1  # only an over-long dialogue exceeds the cap
        seen += batch
    assert sorted(seen) == list(range(len(samples)))
    first = list(sampler)
    assert first == list(sampler), "the same epoch must give the same batches"
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_sampler_shards_whole_dialogues_across_ranks(meld):
    samples = meld.splits["val"]
    parts = [list(DialogueBatchSampler(samples, 64, shuffle=True, seed=0, rank=r, world_size=2)) for r in (0, 1)]
    flat = [i for p in parts for b in p for i in b]
    assert sorted(flat) == list(range(len(samples)))
    dialogues = [{samples[i].dialogue_id for b in p for i in b} for p in parts]
    assert not dialogues[0] & dialogues[1]


def test_layout_speaker_signals():
    layout = layout_from_lists(
        ["a", "b", "a", "a", None, "b"], [2, 0, 0, 1, None, 1], ["Ross", "Joey", "Rachel", "Ross", "Monica", "Joey"])
    assert group_dialogues(["a", "b", "a", "a", None, "b"], [2, 0, 0, 1, None, 1]) == [[2, 3, 0], [1, 5], [4]]
    assert layout.index.tolist() == [[2, 3, 0], [1, 5, 0], [4, 0, 0]]
    assert layout.mask.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    assert layout.speaker_index[0].tolist() == [0, 1, 1]  # Rachel, Ross, Ross
    assert layout.speaker_change[0].tolist() == [FIRST_TURN, SPEAKER_CHANGED, SAME_SPEAKER]
    assert layout.speaker_change[1, :2].tolist() == [FIRST_TURN, SAME_SPEAKER]
    values = torch.arange(6.0)[:, None].repeat(1, 2)
    turns = layout.gather(values)
    assert turns[1, 2].abs().sum() == 0  # padding is zero
    assert torch.equal(layout.scatter(turns, 6), values)


def test_collate_exposes_dialogue_fields(meld, dialogue_slice):
    loader = dialogue_loader(meld, "train", max_utterances=32, shuffle=False, seed=0, modalities={TEXT})
    batch = next(iter(loader))
    by_id = {s.id: s for s in meld.splits["train"]}
    for i, sid in enumerate(batch.ids):
        assert batch.dialogue_ids[i] == by_id[sid].dialogue_id
        assert batch.utterance_indices[i] == by_id[sid].utterance_index
        assert batch.extra["sample_extra"][i]["sentiment"] == by_id[sid].extra["sentiment"]
    layout = dialogue_layout(batch)
    assert layout.num_dialogues == len(set(batch.dialogue_ids))


def _batches(meld, samples, max_utterances=200):
    from emofuse.core.data.dialogue import DialogueBatchSampler
    from emofuse.core.data.pipeline import ClipDataset
    from emofuse.core.data.collate import Collator

    dataset = ClipDataset(samples, {TEXT}, meld.spec, meld.normalizer.fingerprint())
    collate = Collator(frozenset({TEXT}), meld.spec, {}, meld.normalizer)
    for idx in DialogueBatchSampler(samples, max_utterances, shuffle=False):
        yield collate([dataset[i] for i in idx])


def _encoder(direction: str, sequence_model: str = "lstm", **options):
    ref = ComponentRef(name="dialogue-context", inner={"name": "mm-lstm"}, direction=direction,
                       sequence_model=sequence_model, **options)
    torch.manual_seed(0)
    return build_encoder(ref, 7, where="test").eval()


@pytest.mark.parametrize("sequence_model", ["lstm", "transformer"])
def test_causal_context_sees_only_past_turns(meld, dialogue_slice, sequence_model):
    batch = next(_batches(meld, dialogue_slice))
    layout = dialogue_layout(batch)
    row = int(layout.mask.sum(dim=1).argmax())  # the longest dialogue
    turns = layout.index[row][layout.mask[row]].tolist()
    last, earlier = turns[-1], turns[:-1]
    changed_text = list(batch.text)
    changed_text[last] = "I am absolutely furious with you, get out!"
    changed = type(batch)(**{**batch.__dict__, "text": changed_text})
    for direction, past_only in (("causal", True), ("bidirectional", False)):
        enc = _encoder(direction, sequence_model)
        with torch.no_grad():
            a, b = enc(batch).logits, enc(changed).logits
        assert not torch.allclose(a[last], b[last])
        assert torch.allclose(a[earlier], b[earlier], atol=1e-5) == past_only, direction
        others = [i for i in range(len(batch)) if i not in turns]
        assert torch.allclose(a[others], b[others], atol=1e-5), "context leaked across dialogues"


@pytest.mark.parametrize("sequence_model", ["lstm", "transformer"])
def test_padded_turns_do_not_change_outputs(meld, dialogue_slice, sequence_model):
    """A dialogue scored alone or beside longer dialogues (so padded) gets the same logits."""
    enc = _encoder("bidirectional", sequence_model)
    batch = next(_batches(meld, dialogue_slice))
    layout = dialogue_layout(batch)
    row = int(layout.mask.sum(dim=1).argmin())
    alone_ids = {batch.ids[i] for i in layout.index[row][layout.mask[row]].tolist()}
    alone_samples = [s for s in dialogue_slice if s.id in alone_ids]
    alone = next(_batches(meld, alone_samples))
    with torch.no_grad():
        together, single = enc(batch).logits, enc(alone).logits
    pos = {sid: i for i, sid in enumerate(batch.ids)}
    assert torch.allclose(together[[pos[i] for i in alone.ids]], single, atol=1e-5)


def test_context_encoder_trains_and_shares_the_inner_cache(meld, dialogue_slice):
    enc = _encoder("causal", "transformer")
    plain = _encoder("none")
    assert enc.fingerprint() == plain.fingerprint() == enc.inner.fingerprint()
    assert enc.cacheable and set(enc.modalities) == set(enc.inner.modalities)
    assert all(k.startswith("inner.") for k in enc.pretrained_modules)
    assert not any(k.startswith("inner.text_backbone.") for k in enc.checkpoint_state())
    batches = list(_batches(meld, dialogue_slice, max_utterances=48))
    extracted = [collate_extracted(enc.extract(b)) for b in batches]
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)

    def loss_now() -> float:
        enc.eval()
        with torch.no_grad():
            return sum(float(torch.nn.functional.cross_entropy(enc(b, x).logits, b.labels))
                       for b, x in zip(batches, extracted))

    before = loss_now()
    for _ in range(6):
        enc.train()
        for b, x in zip(batches, extracted):
            loss = torch.nn.functional.cross_entropy(enc(b, x).logits, b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert loss_now() < 0.8 * before


def test_without_dialogue_ids_each_utterance_is_alone(batch_factory):
    enc = _encoder("causal")
    batch = batch_factory(4)
    with torch.no_grad():
        out = enc(batch)
    assert out.logits.shape == (4, 7) and out.embedding.shape == (4, enc.embedding_dim)
    assert enc.last_layout.num_dialogues == 4


def test_bad_options_fail_clearly():
    with pytest.raises(ConfigError, match="divisible by heads"):
        build_encoder(ComponentRef(name="dialogue-context", sequence_model="transformer", hidden_dim=30, heads=4),
                      7, where="branches.text")
    with pytest.raises(ConfigError, match="sequence_model"):
        build_encoder(ComponentRef(name="dialogue-context", sequence_model="gru"), 7, where="branches.text")


def test_evaluate_predict_and_compare_score_whole_dialogues_as_the_trainer_does(meld, dialogue_slice, tmp_path):
    """Every scorer batches a context model by whole dialogues (the trainer's `DialogueBatchSampler`),
    so each utterance is scored with its whole dialogue around it, whatever the batch size."""
    from emofuse.core.apps.compare import TrainedModel, score_models
    from emofuse.core.apps.evaluation import evaluate_samples
    from emofuse.core.apps.predict import Predictor
    from emofuse.core.config import validate
    from emofuse.core.data.pipeline import make_batch
    from emofuse.core.engine.compose import build_model
    from emofuse.core.engine.model_io import load_model, save_model

    config = validate({"name": "ctx", "branches": {"text": {
        "name": "dialogue-context", "direction": "bidirectional", "hidden_dim": 16,
        "inner": {"name": "text-classifier", "model_dim": 16, "lstm_hidden": 8,
                  "attention_heads": 2}}}})
    torch.manual_seed(0)
    labels = meld.label_names
    save_model(tmp_path / "model", build_model(config, len(labels)), config, labels)
    loaded = load_model(tmp_path / "model.safetensors")
    samples = sorted(dialogue_slice, key=lambda s: s.id)  # split order: ids, not turns
    reference: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for idx in DialogueBatchSampler(samples, 1, shuffle=False):  # one dialogue per batch
            batch = make_batch([samples[i] for i in idx], loaded.model.modalities, None)
            reference.update(zip(batch.ids, loaded.model(batch)[0].float()))

    def assert_whole(ids, logits):
        expected = torch.stack([reference[i] for i in ids])
        torch.testing.assert_close(logits.float(), expected, atol=1e-5, rtol=1e-4)

    evaluated = evaluate_samples(loaded, samples, batch_size=16, bootstrap=0, device="cpu").outputs
    assert sorted(evaluated.ids) == sorted(reference)
    assert_whole(evaluated.ids, evaluated.logits)
    records = Predictor(loaded, device="cpu", batch_size=8).predict_samples(samples)
    assert [r["id"] for r in records] == [s.id for s in samples]  # input order kept
    probabilities = torch.tensor([[r["probabilities"][c] for c in labels] for r in records])
    torch.testing.assert_close(probabilities, torch.stack([reference[s.id].softmax(0) for s in samples]),
                               atol=2e-6, rtol=0)
    row = TrainedModel(key="ctx", title="ctx", kind="branch", component="dialogue-context",
                       checkpoint=tmp_path / "model.safetensors", loaded=loaded)
    _, compared = score_models([row], {"test": samples}, batch_size=32, device="cpu")["ctx"]["test"]
    assert_whole(compared.ids, compared.logits)
