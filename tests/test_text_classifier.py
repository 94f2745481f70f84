"""The text-classifier encoder (a pretrained text encoder and a head: what mm-lstm's text-only form was):
text first for the trainer's primary-modality check, utterances independent of their batch, cached
features shared by heads, its unfrozen backbone's own learning rate, the mean-token and linear heads, and
a real MELD training through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from emofuse.cli.app import app
from emofuse.core.config import ComponentRef, DataConfig, validate
from emofuse.core.data.pipeline import load_data
from emofuse.core.engine.compose import ComposedModel, build_encoder
from emofuse.core.engine.fit import parameter_groups
from emofuse.core.engine.training import check_branch_inputs
from emofuse.core.errors import ConfigError, DataError
from emofuse.core.interfaces import collate_extracted
from emofuse.core.registry import get_registry
from emofuse.core.types import METADATA, TEXT
from emofuse.plugins.encoders.text_classifier import TextClassifierConfig, TextClassifierEncoder

from conftest import make_batch

NUM_CLASSES = 7
SMALL = dict(size=32, audio_s=1.0)


def build(**options) -> TextClassifierEncoder:
    torch.manual_seed(0)
    return build_encoder(ComponentRef(name="text-classifier", **options), NUM_CLASSES, where="branches.text")


@pytest.fixture(scope="module")
def meld_val(shared_data):
    """A real MELD slice: the first 40 dev utterances (short and long transcripts)."""
    bundle = load_data(DataConfig(dataset="meld", data_dir=shared_data), {TEXT})
    return bundle, bundle.splits["val"][:40]


def _meld_batch(bundle, samples):
    from emofuse.core.data.pipeline import make_batch as data_batch

    return data_batch(list(samples), {TEXT, METADATA}, bundle.normalizer)


@pytest.mark.parametrize("sequence_model", ["lstm", "transformer"])
def test_an_utterance_scored_alone_or_padded_in_a_batch(meld_val, sequence_model):
    """Real MELD transcripts: an utterance's logits do not depend on the longer ones padding its batch."""
    bundle, samples = meld_val
    enc = build(sequence_model=sequence_model).eval()
    batch = _meld_batch(bundle, samples)
    lengths = [len(enc.text_backbone.tokenizer(t)["input_ids"]) for t in batch.text]
    shortest = min(range(len(samples)), key=lambda i: lengths[i])
    assert lengths[shortest] < max(lengths)
    with torch.no_grad():
        together = enc(batch, collate_extracted(enc.extract(batch))).logits
        alone_batch = _meld_batch(bundle, [samples[shortest]])
        alone = enc(alone_batch).logits
    torch.testing.assert_close(together[shortest], alone[0], atol=1e-5, rtol=1e-4)


def test_it_reads_text_first_and_metadata_only_when_asked():
    assert TextClassifierEncoder.modalities_for(TextClassifierConfig()) == (TEXT,)
    assert TextClassifierEncoder.modalities_for(TextClassifierConfig(metadata=True)) == (TEXT, METADATA)
    enc = build(metadata=True)
    assert enc.modalities == (TEXT, METADATA)
    batch = make_batch(2, num_classes=NUM_CLASSES, missing={TEXT: [1]}, **SMALL)
    assert set(enc.extract(batch)[0]) == {"text_tokens"}
    with torch.no_grad():
        out = enc.eval()(batch)
    assert out.present.tolist() == [True, False]  # presence follows the text now
    context = get_registry().cls("encoder", "dialogue-context")
    ctx_config = context.make_config({"inner": {"name": "text-classifier"}})
    assert context.modalities_for(ctx_config)[0] == TEXT
    with pytest.raises(ConfigError, match="audio_backbone"):  # an mm-lstm option: not this encoder's
        build(audio_backbone="none")
    with pytest.raises(ConfigError, match="sequence_model"):
        build(sequence_model="gru")


def test_cached_features_are_shared_by_heads_over_the_same_backbones():
    base = build()
    assert base.fingerprint() == build(sequence_model="transformer", model_dim=64, metadata=True).fingerprint()
    assert base.fingerprint() != build(max_text_tokens=32).fingerprint()
    assert base.fingerprint() != build(name_speaker=True).fingerprint()


def test_primary_modality_check_accepts_it_on_meld(meld_val):
    bundle, _ = meld_val
    text_only = validate({"data": {"dataset": "meld"},
                          "branches": {"text": {"name": "text-classifier"}}})
    check_branch_inputs(text_only, bundle, get_registry())
    with_audio = validate({"data": {"dataset": "meld"}, "branches": {"text": {"name": "mm-lstm"}}})
    with pytest.raises(DataError, match="no audio, the input this run reads|reads audio"):
        check_branch_inputs(with_audio, bundle, get_registry())


@pytest.mark.parametrize("wrapped", [False, True])
def test_unfrozen_backbone_trains_at_its_own_smaller_learning_rate(wrapped):
    inner = {"name": "text-classifier", "freeze_backbone": False, "backbone_lr_scale": 0.1}
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
    frozen = build(backbone_lr_scale=0.1)
    assert len(parameter_groups(ComposedModel({"text": frozen}), 1e-3)) == 1


def test_emofuse_train_on_real_meld_with_a_transformer(shared_data, tmp_path):
    result = CliRunner().invoke(app, [
        "train", "--dataset", "meld", "--data", str(shared_data), "--encoder", "text=text-classifier",
        "--set", "branches.text.sequence_model=transformer",
        "--set", "branches.text.model_dim=64", "--set", "train.batch_size=16", "--set", "train.lr=0.003",
        "--limit", "160", "--epochs", "3", "--output", str(tmp_path), "--name", "meld-text",
    ])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "meld-text" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (tmp_path / "meld-text" / "model.safetensors").is_file()


def test_no_sequence_model_reads_the_mean_token_vector():
    enc = build(sequence_model="none")
    assert enc.sequence is None
    batch = make_batch(3, num_classes=NUM_CLASSES, **SMALL)
    enc.train()
    out = enc(batch)
    assert out.logits.shape == (3, NUM_CLASSES) and out.embedding.shape == (3, enc.embedding_dim)
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    assert enc.text_proj[0].weight.grad is not None and torch.isfinite(enc.text_proj[0].weight.grad).all()
    # the head reads the mean projected token vector alone: fewer inputs than beside an LSTM's summary
    assert enc.head[0].in_features == enc.config.model_dim < build().head[0].in_features


def test_linear_head_is_one_layer_over_the_backbones_mean_token_vector(meld_val):
    """``head = "linear"``: the plain sentence classifier, ``Linear(mean of the backbone's token vectors)``, every
    parameter at the one learning rate when the unfrozen backbone's scale is 1."""
    bundle, samples = meld_val
    enc = build(sequence_model="none", head="linear",
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
    for wrong in ({"sequence_model": "lstm"}, {"metadata": True}):
        options = {"metadata": False, "sequence_model": "none", "head": "linear", **wrong}
        with pytest.raises(ConfigError, match='head "linear"'):
            build(**options)

