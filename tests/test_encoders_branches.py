"""The three branch encoders (mimamo, mm-lstm, features): shapes, gradients, frozen backbones, missing
modalities, the cached-extraction path, and what they expose for inspection."""
from __future__ import annotations

import pytest
import torch

from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import collate_extracted
from emofuse.core.registry import get_registry
from emofuse.core.types import AUDIO, FEATURES, TEXT, VIDEO

from conftest import make_batch

REG = get_registry()
NUM_CLASSES = 5
SMALL = dict(size=96, audio_s=1.0)  # frames are resized inside the frame CNN anyway; keeps tests quick


def build(name: str, **options):
    torch.manual_seed(0)
    cls = REG.cls("encoder", name)
    return cls(cls.make_config(options, where=f"branches.{name}"), NUM_CLASSES)


@pytest.fixture(scope="module")
def mimamo():
    return build("mimamo")


@pytest.fixture(scope="module")
def mm_lstm():
    return build("mm-lstm")


def _backbone_params(enc):
    return [p for m in enc.pretrained_modules if getattr(enc, m, None) is not None for p in getattr(enc, m).parameters()]


@pytest.mark.parametrize("fixture", ["mimamo", "mm_lstm"])
def test_forward_backward_and_frozen_backbones(fixture, request):
    enc = request.getfixturevalue(fixture)
    enc.zero_grad(set_to_none=True)
    enc.train()
    batch = make_batch(4, num_classes=NUM_CLASSES, **SMALL)
    out = enc(batch)
    assert out.logits.shape == (4, NUM_CLASSES) and torch.isfinite(out.logits).all()
    assert out.embedding.shape == (4, enc.embedding_dim)
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    backbone = _backbone_params(enc)
    assert backbone, "the pretrained backbones are registered as submodules"
    assert all(not p.requires_grad and p.grad is None for p in backbone)
    head = [p for p in enc.parameters() if p.requires_grad]
    assert head and all(p.grad is not None for p in head)
    # frozen backbones stay in eval mode (fixed batch-norm statistics, no dropout) while the head trains
    assert all(not getattr(enc, m).training for m in enc.pretrained_modules if getattr(enc, m, None) is not None)
    assert enc.cacheable and not enc.backbone_trainable
    # checkpoints leave the frozen pretrained weights out: they are rebuilt from their source
    kept = enc.checkpoint_state()
    assert kept and not any(k.startswith(enc.pretrained_modules) for k in kept)


@pytest.mark.parametrize("fixture", ["mimamo", "mm_lstm"])
def test_cached_extraction_gives_the_same_logits(fixture, request):
    """What the trainer does: extract once per clip (per-sample tensors), collate, run only the head."""
    enc = request.getfixturevalue(fixture)
    enc.eval()
    batch = make_batch(3, num_classes=NUM_CLASSES, **SMALL)
    with torch.no_grad():
        direct = enc(batch).logits
        per_clip = enc.extract(batch)
        cached = enc(batch, collate_extracted(per_clip)).logits
    torch.testing.assert_close(cached, direct, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture,primary", [("mimamo", VIDEO), ("mm_lstm", AUDIO)])
def test_missing_modalities(fixture, primary, request):
    enc = request.getfixturevalue(fixture)
    enc.eval()
    gappy = make_batch(3, num_classes=NUM_CLASSES, missing={primary: [0], TEXT: [1, 2], "metadata": [2]}, **SMALL)
    with torch.no_grad():
        out = enc(gappy)
    assert torch.isfinite(out.logits).all()
    assert out.present.tolist() == [False, True, True]
    nothing = make_batch(2, num_classes=NUM_CLASSES, missing={m: [0, 1] for m in enc.modalities}, **SMALL)
    with torch.no_grad():
        out = enc(nothing)
    assert torch.isfinite(out.logits).all() and not out.present.any()


def test_a_training_batch_of_one(mimamo, mm_lstm):
    for enc in (mimamo, mm_lstm):
        enc.train()
        out = enc(make_batch(1, num_classes=NUM_CLASSES, **SMALL))
        assert out.logits.shape == (1, NUM_CLASSES) and torch.isfinite(out.logits).all()


def test_mimamo_attention_maps_are_exposed_and_sum_to_one(mimamo):
    mimamo.eval()
    batch = make_batch(2, num_classes=NUM_CLASSES, **SMALL)
    with torch.no_grad():
        out = mimamo(batch)
    att = out.extras["attention"]
    assert att.shape == (2, 8, 4, 4)  # FER mini-Xception: 64x64 faces -> 4x4 maps, one per frame
    assert (att >= 0).all()
    torch.testing.assert_close(att.sum(dim=(-2, -1)), torch.ones(2, 8))
    torch.testing.assert_close(mimamo.last_attention, att)


def test_mimamo_text_conditions_the_video_representation(mimamo):
    """The FiLM layer is trainable; once it is not the identity, different text changes the output."""
    mimamo.eval()
    batch = make_batch(2, num_classes=NUM_CLASSES, **SMALL)
    with torch.no_grad():
        torch.nn.init.normal_(mimamo.film.weight, std=0.5)
        a = mimamo(batch).logits
        batch.text = ["I am furious about this!", "What a lovely surprise."]
        b = mimamo(batch).logits
        batch.present[TEXT][:] = False
        c = mimamo(batch).logits
        batch.text = ["", ""]
        d = mimamo(batch).logits
        torch.nn.init.zeros_(mimamo.film.weight)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, d)  # absent text is ignored whatever the string holds


def test_mimamo_with_a_timm_cnn_and_unfrozen_backbone():
    enc = build("mimamo", frame_backbone="resnet10t", frame_pretrained=False, freeze_backbone=False, text_backbone=None)
    assert enc.backbone_trainable and not enc.cacheable
    enc.train()
    batch = make_batch(2, num_classes=NUM_CLASSES, size=64, audio_s=0.5)
    out = enc(batch)
    assert out.extras["attention"].shape[:2] == (2, 8)
    out.logits.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.frame_backbone.parameters())
    assert any(k.startswith("frame_backbone.") for k in enc.checkpoint_state())


def test_mm_lstm_attends_to_text_and_to_the_no_text_slot_when_text_is_absent(mm_lstm):
    mm_lstm.eval()
    batch = make_batch(3, num_classes=NUM_CLASSES, missing={TEXT: [1]}, **SMALL)
    with torch.no_grad():
        out = mm_lstm(batch)
    weights = out.extras["audio_text_attention"]  # [B, audio frames, 1 + text tokens]
    assert weights.shape[0] == 3 and weights.shape[-1] >= 3
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    assert torch.allclose(weights[1, :, 0], torch.ones(weights.shape[1]))
    assert weights[0, :, 1:].sum() > 0


def test_mm_lstm_with_egemaps_audio():
    pytest.importorskip("opensmile", reason="the optional extra emofuse[egemaps] is not installed")
    enc = build("mm-lstm", audio_backbone="egemaps")
    enc.train()
    out = enc(make_batch(2, num_classes=NUM_CLASSES, **SMALL))
    assert out.logits.shape == (2, NUM_CLASSES)
    out.logits.sum().backward()


def test_mm_lstm_unfrozen_text_backbone_trains():
    enc = build("mm-lstm", freeze_backbone=False)
    assert enc.backbone_trainable and not enc.cacheable
    enc.train()
    enc(make_batch(2, num_classes=NUM_CLASSES, **SMALL)).logits.sum().backward()
    assert any(p.grad is not None for p in enc.text_backbone.parameters())


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="branches.mm-lstm"):
        build("mm-lstm", model_dim=100, attention_heads=8)
    with pytest.raises(ConfigError, match="dropout"):
        build("mimamo", dropout=1.5)
    with pytest.raises(ConfigError, match="face_box"):
        build("mimamo", face_box=(0.6, 0.1, 0.3, 0.5))


# -- the features encoder ------------------------------------------------------------------------


@pytest.mark.parametrize("names,dims", [(["au"], {}), (["au", "mfcc"], {"au": 35, "mfcc": 259})])
def test_features_encoder(names, dims):
    enc = build("features", features=names, feature_dims=dims)
    enc.train()
    batch = make_batch(4, num_classes=NUM_CLASSES, missing={FEATURES: [3]})
    out = enc(batch)
    assert out.logits.shape == (4, NUM_CLASSES) and out.embedding.shape == (4, 64)
    assert out.present.tolist() == [True, True, True, False]
    torch.nn.functional.cross_entropy(out.logits, batch.labels).backward()
    assert all(p.grad is not None for p in enc.parameters())
    assert not enc.cacheable  # nothing frozen to cache without a text backbone
    first = enc.mlp[0]
    assert first.in_features == sum({"au": 35, "mfcc": 259}[n] for n in names) + 16


def test_features_encoder_with_text_and_bad_names():
    enc = build("features", features=["au"], text_backbone="minilm")
    assert enc.cacheable
    enc.eval()
    batch = make_batch(2, num_classes=NUM_CLASSES)
    with torch.no_grad():
        assert enc(batch).logits.shape == (2, NUM_CLASSES)
    wrong = build("features", features=["landmarks"])
    with pytest.raises(ConfigError, match="landmarks"):
        wrong(batch)
    with pytest.raises(ConfigError, match="feature_dims"):
        build("features", features=["au"], feature_dims={"mfcc": 259})


def test_running_standardizer_accumulates_whole_data_statistics():
    from emofuse.plugins.encoders.layers import RunningStandardizer

    rows = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 0.1, 2.0]) + 3.0
    norm = RunningStandardizer(3).train()
    for chunk in rows.split(37):  # uneven batches, as the last one of an epoch
        norm(chunk)
    torch.testing.assert_close(norm.mean, rows.mean(0))
    torch.testing.assert_close(norm.var, rows.var(0, unbiased=False))
    norm.eval()
    out = norm(rows)
    torch.testing.assert_close(norm.mean, rows.mean(0))  # fixed in eval mode
    torch.testing.assert_close(out.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
