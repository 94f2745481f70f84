"""mm-lstm's sequence model option (BiLSTM or transformer layers), and its text-only options refused
with a message naming the text-classifier encoder (tests/test_text_classifier.py tests that encoder)."""
from __future__ import annotations

import pytest
import torch

from emofuse.core.engine.compose import ComposedModel, build_encoder
from emofuse.core.config import ComponentRef, validate
from emofuse.core.errors import ConfigError
from emofuse.plugins.encoders.mm_lstm import MultimodalLSTMEncoder, SequenceEncoder

from conftest import make_batch

NUM_CLASSES = 7
SMALL = dict(size=32, audio_s=1.0)


def build(**options) -> MultimodalLSTMEncoder:
    torch.manual_seed(0)
    return build_encoder(ComponentRef(name="mm-lstm", **options), NUM_CLASSES, where="branches.mm-lstm")


def test_transformer_has_the_lstm_interface():
    lstm = build(audio_backbone="log-mel")
    transformer = build(audio_backbone="log-mel", sequence_model="transformer", transformer_layers=2)
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


@pytest.mark.parametrize("options", [{"audio_backbone": "none"}, {"audio_backbone": " None "}, {"head": "linear"},
                                     {"sequence_model": "none"}])
def test_text_only_options_name_the_text_classifier(options):
    with pytest.raises(ConfigError, match='text only is the "text-classifier" encoder now'):
        build(**options)
    with pytest.raises(ConfigError, match="text-classifier"):
        build(audio_backbone=" ")


def test_a_checkpoint_of_a_text_only_mm_lstm_is_refused_with_what_to_do(tmp_path):
    """A checkpoint saved when mm-lstm was text-only (its sidecar names mm-lstm with audio_backbone "none")."""
    from emofuse.core.engine.model_io import load_model, save_model

    config = validate({"data": {"dataset": "meld"}, "branches": {"text": {"name": "text-classifier"}}})
    torch.manual_seed(0)
    model = ComposedModel({"text": build_encoder(config.branches["text"], NUM_CLASSES, where="branches.text")})
    path = tmp_path / "model.safetensors"
    old = config.model_copy(update={"branches": {"text": ComponentRef(name="mm-lstm", audio_backbone="none",
                                                                          metadata=False)}})
    save_model(path, model, old, [f"c{i}" for i in range(NUM_CLASSES)])
    with pytest.raises(ConfigError, match=r'branches.text.*"text-classifier".*retrain it'):
        load_model(path)
