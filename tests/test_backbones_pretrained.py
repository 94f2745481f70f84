"""Backbone name resolution, offline behaviour and the packaged defaults being real pretrained models."""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch

from emofuse.core.errors import ConfigError, MissingDependencyError
from emofuse.core.registry import get_registry
from emofuse.plugins.encoders import pretrained
from emofuse.plugins.encoders.audio_backbone import EgemapsFrontEnd, LogMelFrontEnd, make_audio_backbone
from emofuse.plugins.encoders.frame_backbone import make_frame_backbone
from emofuse.plugins.encoders.packaged_archive import MPNET
from emofuse.plugins.encoders.pretrained import HUB, LOCAL, PACKAGE, resolve_backbone
from emofuse.plugins.encoders.text_backbone import TextBackbone

REG = get_registry()
RAVDESS_CLIP = "ravdess-speech/Actor_01/03-01-05-02-01-01-01.ogg"  # angry, strong intensity


@pytest.fixture(scope="module")
def minilm():
    return TextBackbone("minilm").eval()


def _cached_on_this_machine(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def test_resolution_kinds(tmp_path):
    assert resolve_backbone("minilm").kind == PACKAGE
    assert resolve_backbone("sentence-transformers/all-MiniLM-L6-v2").kind == PACKAGE
    assert resolve_backbone("fer-mini-xception").location.endswith("emotion_model.hdf5")
    assert resolve_backbone(str(tmp_path)).kind == LOCAL
    assert resolve_backbone("bert-base-uncased").kind == HUB
    assert resolve_backbone("facebook/wav2vec2-base") == pretrained.BackboneSource("facebook/wav2vec2-base", HUB, "facebook/wav2vec2-base")
    with pytest.raises(ConfigError, match="no such local file"):
        resolve_backbone(str(tmp_path / "missing" / "model"))


def test_minilm_default_is_a_real_pretrained_model(minilm):
    """Paraphrases land closer together than unrelated sentences: random weights would not do that."""
    with torch.no_grad():
        emb = torch.nn.functional.normalize(
            minilm.sentence_embeddings(
                ["The children are chatting near the door.", "Kids are talking by the door.", "Stock prices fell sharply on Monday."]
            ),
            dim=-1,
        )
    paraphrase, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert minilm.dim == 384
    assert paraphrase > 0.6 and unrelated < 0.3, (paraphrase, unrelated)


def _mpnet_installed() -> bool:
    from importlib import metadata

    try:
        return all(metadata.distribution(d.split("==")[0]) for d in MPNET.distributions)
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _mpnet_installed(), reason="optional: EMOFUSE_MPNET=1 bash scripts/setup.sh")
def test_mpnet_option_is_the_real_all_mpnet_base_v2():
    """The split package joins to the pinned zip and loads as MPNet (768 wide) with pretrained weights."""
    backbone = TextBackbone("mpnet").eval()
    assert backbone.dim == 768 and type(backbone.model).__name__ == "MPNetModel"
    with torch.no_grad():
        emb = torch.nn.functional.normalize(backbone.sentence_embeddings(
            ["The children are chatting near the door.", "Kids are talking by the door.", "Stock prices fell sharply on Monday."]), dim=-1)
    paraphrase, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert paraphrase > 0.5 and unrelated < 0.2, (paraphrase, unrelated)


def test_token_embeddings_do_not_depend_on_batch_mates(minilm):
    with torch.no_grad():
        alone = minilm.token_embeddings(["Dogs are sitting by the door"])[0]
        together = minilm.token_embeddings(["Dogs are sitting by the door", "a much longer sentence " * 5])[0]
    assert alone.shape == together.shape
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)


def test_local_folder_backbone_loads(minilm):
    local = TextBackbone(resolve_backbone("minilm").location)
    assert local.dim == minilm.dim


@pytest.mark.parametrize(
    "encoder,options",
    [
        ("mm-lstm", {"text_backbone": "bert-base-uncased"}),
        ("mm-lstm", {"audio_backbone": "facebook/wav2vec2-base"}),
        ("mimamo", {"frame_backbone": "resnet18"}),
    ],
)
def test_hub_id_fails_fast_offline(encoder, options, monkeypatch):
    name = next(iter(options.values()))
    repo = "timm/resnet18.a1_in1k" if name == "resnet18" else name
    if _cached_on_this_machine(repo):
        pytest.skip(f"{repo} is in this machine's Hugging Face cache, so it loads offline by design")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = REG.cls("encoder", encoder)
    start = time.monotonic()
    with pytest.raises(MissingDependencyError) as err:
        cls(cls.make_config(options), 4)
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    assert "offline" in message and name in message
    assert "=" in message.split("(", 1)[1]  # the hint names the option to point at local weights


def test_unreachable_hub_fails_fast_without_the_env_flag(monkeypatch):
    """No HF_HUB_OFFLINE set, but no network: the probe says so and no download is attempted."""
    if _cached_on_this_machine("bert-base-uncased"):
        pytest.skip("bert-base-uncased is cached here")
    for var in pretrained._OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pretrained, "hub_reachable", lambda timeout=2.0: False)

    def never(*args, **kwargs):
        if not kwargs.get("local_files_only"):
            raise AssertionError("tried to download while offline")
        raise OSError("not cached")

    start = time.monotonic()
    with pytest.raises(MissingDependencyError, match="text_backbone=DIR"):
        pretrained.load_pretrained("bert-base-uncased", never, what="text backbone", option="text_backbone", alternative="minilm")
    assert time.monotonic() - start < 5.0


def test_timm_name_without_pretrained_weights_builds_offline():
    backbone = make_frame_backbone("resnet10t", pretrained=False)
    with torch.no_grad():
        fmap = backbone(torch.zeros(2, 3, 64, 64))
    assert fmap.dim() == 4 and fmap.shape[1] == backbone.out_channels


def test_unknown_frame_backbone_is_a_config_error():
    with pytest.raises(ConfigError, match="timm model name"):
        make_frame_backbone("no-such-cnn", pretrained=False)


def _real_speech(shared_data, seconds: float = 2.0) -> torch.Tensor:
    from emofuse.core.data.decode import decode_audio

    wav = decode_audio(shared_data / RAVDESS_CLIP)
    wav = torch.as_tensor(np.asarray(wav), dtype=torch.float32).flatten()
    return wav[: int(16_000 * seconds)]


def test_log_mel_front_end_on_a_tone_and_real_speech(shared_data):
    front = make_audio_backbone("log-mel")
    assert isinstance(front, LogMelFrontEnd) and front.dim == 64 and front.frame_rate == 100
    t = torch.arange(16_000) / 16_000
    (tone,) = front([torch.sin(2 * torch.pi * 1000 * t)])
    assert tone.shape == (101, 64)
    centres = torch.from_numpy(front.mel_filters.numpy().argmax(axis=0)) * 16_000 / 512
    peak_band = int(tone.mean(dim=0).argmax())
    assert abs(float(centres[peak_band]) - 1000) < 150
    (speech,) = front([_real_speech(shared_data)])
    assert speech.shape[1] == 64 and torch.isfinite(speech).all() and speech.std() > 1.0


def test_egemaps_front_end_on_real_speech(shared_data):
    pytest.importorskip("opensmile", reason="the optional extra emofuse[egemaps] is not installed")
    front = make_audio_backbone("egemaps")
    (lld,) = front([_real_speech(shared_data)])
    assert front.dim == 25 and lld.shape[1] == 25 and 150 <= lld.shape[0] <= 205
    assert torch.isfinite(lld).all() and lld.abs().sum() > 0


def test_egemaps_without_opensmile_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "opensmile", None)
    with pytest.raises(MissingDependencyError, match=r"emofuse\[egemaps\]"):
        EgemapsFrontEnd()



def test_wav2vec2_family_from_a_local_folder(tmp_path):
    """The transformers audio path (what facebook/wav2vec2-base takes online), with a small randomly
    initialised Wav2Vec2 saved to a folder: 50 frames/s of every layer's hidden states, one clip at a time."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    Wav2Vec2Model(config).save_pretrained(tmp_path / "w2v")
    front = make_audio_backbone(str(tmp_path / "w2v"))
    assert front.has_weights and front.dim == 32 and front.frame_rate == 50
    with torch.no_grad():
        one, two = front([torch.randn(16_000) * 0.1, torch.randn(8_000) * 0.1])
    # every hidden state (the CNN features' projection and the one transformer layer), layer-major per frame
    assert front.num_layers == 2 and one.shape == (49, 2 * 32) and two.shape == (24, 2 * 32)
    last = make_audio_backbone(str(tmp_path / "w2v"), all_layers=False)
    with torch.no_grad():
        torch.testing.assert_close(last([torch.ones(8_000) * 0.1])[0], front([torch.ones(8_000) * 0.1])[0][:, 32:])
    enc_cls = REG.cls("encoder", "mm-lstm")
    enc = enc_cls(enc_cls.make_config({"audio_backbone": str(tmp_path / "w2v")}), 3)
    assert len(enc.audio_front.convs) == 1  # 50 -> 25 frames/s
    assert enc.layer_mix.num_layers == 2
    assert not any(p.requires_grad for p in enc.audio_backbone.parameters())
