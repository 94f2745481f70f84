"""The packaged Whisper tiny.en: the CTranslate2 reader, the pinned weights, the log-mel front end against
transformers, the PyTorch encoder against the CTranslate2 runtime, transcription of a real clip, and the
``whisper`` audio backbone inside mm-lstm (a learned mix of its layers)."""
from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
import torch

from emofuse.core.config import ComponentRef
from emofuse.core.data.decode import decode_audio
from emofuse.core.engine.compose import build_encoder
from emofuse.core.errors import CheckpointError, DataError
from emofuse.core.interfaces import collate_extracted
from emofuse.core.types import AUDIO
from emofuse.plugins.encoders.audio_backbone import WhisperFrontEnd, make_audio_backbone
from emofuse.plugins.encoders.ctranslate2_format import read_ctranslate2_model
from emofuse.plugins.encoders.whisper import (
    WhisperEncoder,
    WhisperLogMel,
    load_whisper,
    packaged_whisper,
    packaged_whisper_folder,
)

from conftest import make_batch, needs_whisper_base

KIDS = "Actor_01/03-01-01-01-01-01-01.ogg"  # statement 01: "Kids are talking by the door"


@pytest.fixture(scope="module")
def kids_clip(shared_data) -> np.ndarray:
    return decode_audio(shared_data / "ravdess-speech" / KIDS)


# --- the file format ------------------------------------------------------------------------------------
def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _ct2_file(version: int = 6, *, dtype_id: int = 4, extra: bytes = b"") -> bytes:
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    body = struct.pack("<I", version) + _string("TestSpec") + struct.pack("<I", 2) + struct.pack("<I", 2)
    body += _string("layer/weight") + struct.pack("<B", 2) + struct.pack("<II", 2, 3)
    body += struct.pack("<BI", dtype_id, weight.nbytes) + weight.tobytes()
    body += _string("layer/heads") + struct.pack("<B", 0) + struct.pack("<BI", 2, 2) + struct.pack("<h", 6)
    body += struct.pack("<I", 1) + _string("tied/weight") + _string("layer/weight")
    return body + extra


def test_reader_parses_header_tensors_and_aliases(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(_ct2_file())
    model = read_ctranslate2_model(path)
    assert (model.spec, model.revision) == ("TestSpec", 2)
    assert model.get("layer/weight").dtype == torch.float16
    assert model.get("layer/weight").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert model.scalar("layer/heads") == 6
    assert model.get("tied/weight") is model.get("layer/weight")
    with pytest.raises(DataError, match="no tensor 'missing'"):
        model.get("missing")


@pytest.mark.parametrize("content, message", [
    (_ct2_file()[:-20], "truncated"),
    (_ct2_file(version=9), "binary version 9"),
    (_ct2_file(dtype_id=5), "bfloat16"),
    (_ct2_file(extra=b"junk"), "unexpected bytes"),
    (b"PK\x03\x04 a zip, not a model", "not supported|truncated"),
])
def test_reader_refuses_damaged_or_foreign_files(tmp_path, content, message):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_ctranslate2_model(path)


# --- the pinned weights -----------------------------------------------------------------------------------
def test_a_corrupt_or_substituted_weight_file_is_refused(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(packaged_whisper_folder(), folder)
    data = bytearray((folder / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    (folder / "model.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 .* is not the pinned .*damaged or was replaced"):
        load_whisper(folder)
    (folder / "model.bin").write_bytes(_ct2_file())  # a well-formed file of another model
    with pytest.raises(CheckpointError, match="not the pinned"):
        load_whisper(folder)
    (folder / "model.bin").unlink()
    with pytest.raises(CheckpointError, match="no Whisper model file"):
        load_whisper(folder)


def test_packaged_model_has_whisper_tiny_dimensions():
    weights = packaged_whisper()
    dims = weights.encoder.dims
    assert (dims.n_mels, dims.dim, dims.heads, dims.encoder_layers, dims.decoder_layers) == (80, 384, 6, 4, 4)
    assert sum(p.numel() for p in weights.encoder.parameters()) == pytest.approx(7.6e6, rel=0.05)


# --- numerics against the reference implementations --------------------------------------------------------
def test_log_mel_matches_transformers_feature_extractor(kids_clip):
    from transformers import WhisperFeatureExtractor

    expected = WhisperFeatureExtractor()(kids_clip, sampling_rate=16_000, return_tensors="np").input_features[0]
    mel = WhisperLogMel()
    padded = mel(torch.from_numpy(kids_clip), pad_to_chunk=True).numpy()
    assert padded.shape == (80, 3000)
    np.testing.assert_allclose(padded, expected, atol=1e-4)
    own = mel(torch.from_numpy(kids_clip)).numpy()
    assert own.shape == (80, len(kids_clip) // 160)
    # the clip's own frames are the padded ones (the last frame's window reaches past the end: reflected vs zeros)
    np.testing.assert_allclose(own[:, :-1], expected[:, : own.shape[1] - 1], atol=1e-4)


def test_encoder_matches_the_ctranslate2_runtime(kids_clip):
    ctranslate2 = pytest.importorskip("ctranslate2")
    mel = WhisperLogMel()(torch.from_numpy(kids_clip), pad_to_chunk=True)
    runtime = ctranslate2.models.Whisper(str(packaged_whisper_folder()), device="cpu", compute_type="float32",
                                         intra_threads=1)
    expected = np.asarray(runtime.encode(ctranslate2.StorageView.from_array(mel[None].numpy())))
    with torch.no_grad():
        states = packaged_whisper().encoder(mel[None])
    assert len(states) == 5 and states[-1].shape == (1, 1500, 384)
    np.testing.assert_allclose(states[-1][0].numpy(), expected[0], atol=2e-3)


def test_encoder_reads_only_the_clips_own_frames(kids_clip):
    encoder = packaged_whisper().encoder
    mel = WhisperLogMel()(torch.from_numpy(kids_clip))
    with torch.no_grad():
        states = encoder(mel[None])
    assert all(s.shape == (1, (mel.shape[1] + 1) // 2, 384) for s in states)
    with pytest.raises(ValueError, match="at most 1500 positions"):
        encoder(torch.zeros(1, 80, 3002))


def test_transformers_whisper_checkpoint_loads_into_the_same_encoder(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    config = WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                           max_source_positions=1500, max_target_positions=8, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    model = WhisperModel(config).eval()
    model.save_pretrained(tmp_path / "tiny-whisper")
    front = make_audio_backbone(str(tmp_path / "tiny-whisper"))
    assert isinstance(front, WhisperFrontEnd) and (front.dim, front.num_layers) == (16, 3)
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        expected = model.encoder(mel, output_hidden_states=True).hidden_states
        mine = WhisperEncoder.from_transformers(model)(mel)
    for a, b in zip(mine, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# --- transcription ------------------------------------------------------------------------------------------
def test_transcribes_a_real_clip_offline(kids_clip):
    from emofuse.plugins.transcription import transcribe

    assert transcribe([kids_clip]) == ["Kids are talking by the door."]


# --- the audio backbone in mm-lstm ----------------------------------------------------------------------------
def test_mm_lstm_mixes_every_whisper_layer_with_learned_weights():
    torch.manual_seed(0)
    enc = build_encoder(ComponentRef(name="mm-lstm", audio_backbone="whisper"), 7, where="branches.audio_text")
    batch = make_batch(2, size=32, audio_s=1.0)
    frames = [e["audio_frames"] for e in enc.extract(batch)]
    assert frames[0].shape == (50, 5 * 384)  # 1 s: 50 positions, 5 hidden states of 384
    assert not any(p.requires_grad for p in enc.audio_backbone.parameters())
    enc.train()
    enc(batch).logits.sum().backward()
    assert enc.layer_mix.logits.grad is not None and enc.layer_mix.logits.grad.abs().sum() > 0
    last = build_encoder(ComponentRef(name="mm-lstm", audio_backbone="whisper", audio_layers="last"), 7, where="x")
    assert last.layer_mix is None and last.extract(batch)[0]["audio_frames"].shape == (50, 384)
    assert last.fingerprint() != enc.fingerprint()


def test_statistics_path_pools_each_layer_and_standardises_on_training_clips():
    """The default statistics path keeps every layer's mean and std apart (2 * 5 * 384 values, standardised by
    running statistics of training clips with audio); "mixed" pools the learned mix alone (2 * 384)."""
    torch.manual_seed(0)
    layers = build_encoder(ComponentRef(name="mm-lstm", audio_backbone="whisper"), 7, where="x")
    mixed = build_encoder(ComponentRef(name="mm-lstm", audio_backbone="whisper", audio_statistics="mixed"), 7, where="x")
    assert layers.stats_norm is not None and layers.stats_norm.mean.shape == (2 * 5 * 384,)
    assert mixed.stats_norm is None
    assert layers.stats_head[1].in_features == 2 * 5 * 384 and mixed.stats_head[1].in_features == 2 * 384
    assert layers.head[0].in_features == mixed.head[0].in_features  # two experts: the main head reads no statistics
    both = build_encoder(ComponentRef(name="mm-lstm", audio_backbone="whisper", main_head_statistics=True), 7, where="x")
    assert both.head[0].in_features - layers.head[0].in_features == 2 * 5 * 384
    batch = make_batch(3, size=32, audio_s=1.0)
    batch.present[AUDIO][2] = False  # a clip without audio leaves the running statistics alone
    extracted = collate_extracted(layers.extract(batch))
    layers.train()
    layers(batch, extracted).logits.sum().backward()
    assert float(layers.stats_norm.count) == 2.0
    layers.eval()
    with torch.no_grad():
        a = layers(batch, extracted).logits
        b = layers(batch, extracted).logits
    assert torch.equal(a, b)  # fixed statistics in eval mode
    # the statistics head's answer is averaged in where the clip has audio, and left out where it has none
    with torch.no_grad():
        layers.stats_head[-1].weight.zero_()
        layers.stats_head[-1].bias.zero_()
        before = layers(batch, extracted).logits
        layers.stats_head[-1].bias[0] = 10.0
        after = layers(batch, extracted).logits
    assert torch.allclose(after[:2, 0] - before[:2, 0], torch.full((2,), 5.0))
    assert torch.equal(after[2], before[2])
    plain = build_encoder(ComponentRef(name="mm-lstm", audio_backbone="whisper", statistics_head=False), 7, where="x")
    assert plain.stats_head is None


def test_unfrozen_whisper_trains_its_own_copy():
    enc = build_encoder(ComponentRef(name="mm-lstm", audio_backbone="whisper", freeze_backbone=False), 7, where="x")
    enc.train()
    enc(make_batch(2, size=32, audio_s=0.5)).logits.sum().backward()
    assert enc.audio_backbone.encoder.conv1.weight.grad.abs().sum() > 0
    assert enc.audio_backbone.encoder is not packaged_whisper().encoder  # the shared copy stays untouched


def test_a_clip_longer_than_whisper_window_is_encoded_window_by_window():
    front = WhisperFrontEnd(all_layers=False).eval()
    with torch.no_grad():
        (frames,) = front([torch.randn(31 * 16_000) * 0.01])
    assert frames.shape == (1500 + 50, 384)  # 30 s window + 1 s window, nothing cut off


# --- the packaged multilingual Whisper base (optional install: EMOFUSE_WHISPER_BASE=1) ------------------------


@needs_whisper_base
def test_whisper_base_is_joined_checked_and_has_base_dimensions():
    weights = packaged_whisper("whisper-base")
    dims = weights.encoder.dims
    assert (dims.n_mels, dims.dim, dims.heads, dims.encoder_layers, dims.decoder_layers) == (80, 512, 8, 6, 6)
    assert sum(p.numel() for p in weights.encoder.parameters()) == pytest.approx(19.8e6, rel=0.02)
    assert packaged_whisper("Whisper-Base") is weights and packaged_whisper() is not weights


@needs_whisper_base
def test_whisper_base_encoder_matches_the_ctranslate2_runtime(kids_clip):
    ctranslate2 = pytest.importorskip("ctranslate2")
    mel = WhisperLogMel()(torch.from_numpy(kids_clip), pad_to_chunk=True)
    runtime = ctranslate2.models.Whisper(str(packaged_whisper_folder("whisper-base")), device="cpu",
                                         compute_type="float32", intra_threads=1)
    expected = np.asarray(runtime.encode(ctranslate2.StorageView.from_array(mel[None].numpy())))
    with torch.no_grad():
        states = packaged_whisper("whisper-base").encoder(mel[None])
    assert len(states) == 7 and states[-1].shape == (1, 1500, 512)
    np.testing.assert_allclose(states[-1][0].numpy(), expected[0], atol=5e-3)


@needs_whisper_base
def test_whisper_base_backbone_stacks_its_seven_hidden_states(kids_clip):
    backbone = make_audio_backbone("whisper-base")
    assert isinstance(backbone, WhisperFrontEnd) and (backbone.dim, backbone.num_layers) == (512, 7)
    with torch.no_grad():
        (frames,) = backbone([torch.from_numpy(kids_clip)])
    assert frames.shape == ((len(kids_clip) // 160 + 1) // 2, 7 * 512)
    assert backbone.encoder is not packaged_whisper("whisper-base").encoder  # its own copy


def test_an_unknown_packaged_whisper_name_is_refused():
    from emofuse.core.errors import ConfigError
    from emofuse.plugins.encoders.whisper import packaged_model

    with pytest.raises(ConfigError, match="'whisper-large' is not a packaged Whisper model.*whisper-base"):
        packaged_model("whisper-large")
