"""mm-lstm's sequence model option (BiLSTM or transformer layers), its text-only form (no audio side,
text first for the trainer's primary-modality check) and the smaller learning rate of its unfrozen
text backbone."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from emofuse.cli.app import app
from emofuse.core.engine.compose import ComposedModel, build_encoder
from emofuse.core.config import ComponentRef, DataConfig, validate
from emofuse.core.data.pipeline import load_data
from emofuse.core.errors import ConfigError, DataError
from emofuse.core.interfaces import collate_extracted
from emofuse.core.registry import get_registry
from emofuse.core.engine.training import check_branch_inputs
from emofuse.core.engine.fit import parameter_groups
from emofuse.core.types import AUDIO, METADATA, TEXT
from emofuse.plugins.encoders.mm_lstm import MMLSTMConfig, MultimodalLSTMEncoder, SequenceEncoder

from conftest import make_batch

NUM_CLASSES = 7
SMALL = dict(size=32, audio_s=1.0)


def build(**options) -> MultimodalLSTMEncoder:
    torch.manual_seed(0)
    return build_encoder(ComponentRef(name="mm-lstm", **options), NUM_CLASSES, where="branches.mm-lstm")


@pytest.fixture(scope="module")
def meld_val(shared_data):
    """A real MELD slice: the first 40 dev utterances (short and long transcripts)."""
    bundle = load_data(DataConfig(dataset="meld", data_dir=shared_data), {TEXT})
    return bundle, bundle.splits["val"][:40]


def _meld_batch(bundle, samples):
    from emofuse.core.data.pipeline import make_batch as data_batch

    return data_batch(list(samples), {TEXT, METADATA}, bundle.normalizer)


@pytest.mark.parametrize("audio_backbone", ["log-mel", "none"])
def test_transformer_has_the_lstm_interface(audio_backbone):
    lstm = build(audio_backbone=audio_backbone)
    transformer = build(audio_backbone=audio_backbone, sequence_model="transformer", transformer_layers=2)
    assert isinstance(transformer.sequence.transformer, torch.nn.TransformerEncoder)
    batch = make_batch(3, num_classes=NUM_CLASSES, **SMALL)
    for enc in (lstm, transformer):
        enc.train()
        out = enc(batch)
        assert out.logits.shape == (3, NUM_CLASSES) and out.embedding.shape == (3, enc.embedding_dim)
        torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.sequence.parameters())
    assert lstm.embedding_dim == transformer.embedding_dim


def test_transformer_padding_never_changes_real_positions():
    torch.manual_seed(0)
    seq = SequenceEncoder("transformer", 32, lstm_hidden=16, lstm_layers=1, transformer_layers=2, heads=4,
                          dropout=0.0).eval()
    x = torch.randn(3, 9, 32)
    lengths = torch.tensor([9, 5, 2])
    noisy = x.clone()
    for i, n in enumerate(lengths.tolist()):
        noisy[i, n:] = torch.randn(9 - n, 32) * 100  # garbage where there is only padding
    longer = torch.cat([x, torch.randn(3, 4, 32)], dim=1)  # padded further, as beside a longer sequence
    with torch.no_grad():
        a, b, c = seq(x, lengths), seq(noisy, lengths), seq(longer, lengths)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(a[i, :n], b[i, :n])
        torch.testing.assert_close(a[i, :n], c[i, :n])
        assert a[i, n:].abs().sum() == 0 and c[i, n:].abs().sum() == 0
    # sine/cosine positions: the transformer sees order, so a reversed sequence reads differently
    with torch.no_grad():
        reversed_out = seq(x.flip(1), lengths.new_tensor([9, 9, 9]))
        forward_out = seq(x, lengths.new_tensor([9, 9, 9]))
    assert not torch.allclose(reversed_out.flip(1), forward_out, atol=1e-3)


@pytest.mark.parametrize("sequence_model", ["lstm", "transformer"])
def test_text_only_utterance_scored_alone_or_padded_in_a_batch(meld_val, sequence_model):
    """Real MELD transcripts: an utterance's logits do not depend on the longer ones padding its batch."""
    bundle, samples = meld_val
    enc = build(audio_backbone="none", sequence_model=sequence_model).eval()
    batch = _meld_batch(bundle, samples)
    lengths = [len(enc.text_backbone.tokenizer(t)["input_ids"]) for t in batch.text]
    shortest = min(range(len(samples)), key=lambda i: lengths[i])
    assert lengths[shortest] < max(lengths)
    with torch.no_grad():
        together = enc(batch, collate_extracted(enc.extract(batch))).logits
        alone_batch = _meld_batch(bundle, [samples[shortest]])
        alone = enc(alone_batch).logits
    torch.testing.assert_close(together[shortest], alone[0], atol=1e-5, rtol=1e-4)


def test_text_only_branch_reads_text_first():
    config = MMLSTMConfig(audio_backbone="none")
    assert MultimodalLSTMEncoder.modalities_for(config) == (TEXT, METADATA)
    assert MultimodalLSTMEncoder.modalities_for(MMLSTMConfig()) == (AUDIO, TEXT, METADATA)
    enc = build(audio_backbone="None")
    assert enc.modalities == (TEXT, METADATA) and enc.audio_backbone is None
    batch = make_batch(2, num_classes=NUM_CLASSES, missing={TEXT: [1]}, **SMALL)
    assert set(enc.extract(batch)[0]) == {"text_tokens"}
    with torch.no_grad():
        out = enc.eval()(batch)
    assert out.present.tolist() == [True, False]  # presence follows the text now
    context = get_registry().cls("encoder", "dialogue-context")
    ctx_config = context.make_config({"inner": {"name": "mm-lstm", "audio_backbone": "none"}})
    assert context.modalities_for(ctx_config)[0] == TEXT
    with pytest.raises(ConfigError, match="audio_backbone"):
        build(audio_backbone=" ")
    with pytest.raises(ConfigError, match="sequence_model"):
        build(sequence_model="gru")


def test_cached_features_are_shared_by_heads_over_the_same_backbones():
    base = build(audio_backbone="none")
    assert base.fingerprint() == build(audio_backbone="none", sequence_model="transformer", model_dim=64).fingerprint()
    assert base.fingerprint() != build(audio_backbone="none", max_text_tokens=32).fingerprint()
    assert base.fingerprint() != build().fingerprint()


def test_primary_modality_check_accepts_text_only_mm_lstm_on_meld(meld_val):
    bundle, _ = meld_val
    text_only = validate({"data": {"dataset": "meld"},
                          "branches": {"text": {"name": "mm-lstm", "audio_backbone": "none"}}})
    check_branch_inputs(text_only, bundle, get_registry())
    with_audio = validate({"data": {"dataset": "meld"}, "branches": {"text": {"name": "mm-lstm"}}})
    with pytest.raises(DataError, match="no audio, the input this run reads|reads audio"):
        check_branch_inputs(with_audio, bundle, get_registry())


@pytest.mark.parametrize("wrapped", [False, True])
def test_unfrozen_backbone_trains_at_its_own_smaller_learning_rate(wrapped):
    inner = {"name": "mm-lstm", "audio_backbone": "none", "freeze_backbone": False, "backbone_lr_scale": 0.1}
    ref = ComponentRef(name="dialogue-context", inner=inner) if wrapped else ComponentRef(**inner)
    torch.manual_seed(0)
    enc = build_encoder(ref, NUM_CLASSES, where="branches.text")
    mm = enc.inner if wrapped else enc
    groups = parameter_groups(ComposedModel({"text": enc}), 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    backbone = {id(p) for p in mm.text_backbone.parameters()}
    assert {id(p) for p in groups[1]["params"]} == backbone
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == sum(1 for p in enc.parameters() if p.requires_grad)
    frozen = build(audio_backbone="none", backbone_lr_scale=0.1)
    assert len(parameter_groups(ComposedModel({"text": frozen}), 1e-3)) == 1


def test_emofuse_train_on_real_meld_with_a_text_only_transformer(shared_data, tmp_path):
    result = CliRunner().invoke(app, [
        "train", "--dataset", "meld", "--data", str(shared_data), "--encoder", "text=mm-lstm",
        "--set", "branches.text.audio_backbone=none", "--set", "branches.text.sequence_model=transformer",
        "--set", "branches.text.model_dim=64", "--set", "train.batch_size=16", "--set", "train.lr=0.003",
        "--limit", "160", "--epochs", "3", "--output", str(tmp_path), "--name", "meld-text",
    ])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "meld-text" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (tmp_path / "meld-text" / "model.safetensors").is_file()


def test_no_sequence_model_reads_the_mean_token_vector_of_a_text_only_branch():
    enc = build(audio_backbone="none", metadata=False, sequence_model="none")
    assert enc.sequence is None
    batch = make_batch(3, num_classes=NUM_CLASSES, **SMALL)
    enc.train()
    out = enc(batch)
    assert out.logits.shape == (3, NUM_CLASSES) and out.embedding.shape == (3, enc.embedding_dim)
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    assert enc.text_proj[0].weight.grad is not None and torch.isfinite(enc.text_proj[0].weight.grad).all()
    # the head reads the mean projected token vector alone: fewer inputs than beside an LSTM's summary
    assert enc.head[0].in_features == enc.config.model_dim < build(audio_backbone="none", metadata=False).head[0].in_features
    with pytest.raises(ConfigError, match="text-only branches"):
        build(audio_backbone="log-mel", sequence_model="none")


def test_linear_head_is_one_layer_over_the_backbones_mean_token_vector(meld_val):
    """``head = "linear"``: the plain sentence classifier, ``Linear(mean of the backbone's token vectors)``, every
    parameter at the one learning rate when the unfrozen backbone's scale is 1."""
    bundle, samples = meld_val
    enc = build(audio_backbone="none", metadata=False, sequence_model="none", head="linear",
                freeze_backbone=False, backbone_lr_scale=1.0, input_dropout=0.0)
    assert isinstance(enc.classifier, torch.nn.Linear) and enc.classifier.in_features == enc.text_backbone.dim
    assert enc.embedding_dim == enc.text_backbone.dim
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("text_backbone.")} == {"classifier.weight", "classifier.bias"}
    batch = _meld_batch(bundle, samples[:6])
    with torch.no_grad():
        out = enc.eval()(batch)
        expected = enc.classifier(enc.text_backbone.sentence_embeddings(list(batch.text)))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.embedding, enc.text_backbone.sentence_embeddings(list(batch.text)), atol=1e-5, rtol=1e-4)
    (group,) = parameter_groups(ComposedModel({"text": enc}), 3e-5)
    assert group["lr"] == 3e-5 and len(group["params"]) == len(trainable)
    enc.train()
    torch.nn.functional.cross_entropy(enc(batch).logits, batch.labels).backward()
    assert enc.text_backbone.model.embeddings.word_embeddings.weight.grad is not None
    for wrong in ({"audio_backbone": "log-mel"}, {"sequence_model": "lstm"}, {"metadata": True}):
        options = {"audio_backbone": "none", "metadata": False, "sequence_model": "none", "head": "linear", **wrong}
        with pytest.raises(ConfigError, match='head "linear"'):
            build(**options)
