"""`mm-lstm`'s ``audio_padding_seconds``: a Whisper backbone over each clip's own frames (0), padded with silence
to a few seconds, or to Whisper's full 30 s window; validated, and part of the feature cache's namespace."""
from __future__ import annotations

import pytest
import torch

from emofuse.core.config import ComponentRef
from emofuse.core.data.cache import encoder_namespace
from emofuse.core.data.decode import decode_audio
from emofuse.core.engine.compose import build_encoder
from emofuse.core.errors import ConfigError
from emofuse.core.interfaces import collate_extracted
from emofuse.plugins.encoders.audio_backbone import WhisperFrontEnd, make_audio_backbone
from emofuse.plugins.encoders.whisper import WhisperLogMel

from conftest import make_batch

KIDS = "Actor_01/03-01-01-01-01-01-01.ogg"  # 3.3 s


@pytest.fixture(scope="module")
def clip(shared_data) -> torch.Tensor:
    wav = torch.from_numpy(decode_audio(shared_data / "ravdess-speech" / KIDS))
    assert 2.0 < len(wav) / 16_000 < 4.0  # the sizes below assume a clip between 2 and 4 s
    return wav


def own_frames(wav: torch.Tensor) -> int:
    """Whisper encoder positions of the clip's own length: 100 mel frames/s, halved by the second convolution."""
    return (len(wav) // 160 + 1) // 2


@pytest.mark.parametrize(("seconds", "frames"), [(0.0, None), (4.0, 200), (30.0, 1500), (2.0, None)])
def test_padding_sets_the_frame_count_and_never_cuts_a_clip(clip, seconds, frames):
    front = WhisperFrontEnd(all_layers=False, padding_seconds=seconds).eval()
    with torch.no_grad():
        (out,) = front([clip])
    assert out.shape == (frames or own_frames(clip), 384)  # 2 s is shorter than the clip: its own length


def test_padding_to_30_seconds_is_whispers_own_window(clip):
    mel = WhisperLogMel()
    assert torch.equal(mel(clip, pad_to_seconds=30.0), mel(clip, pad_to_chunk=True))


def test_padded_frames_are_kept_and_their_lengths_say_so(clip):
    encoder = build_encoder(ComponentRef(name="mm-lstm", audio_padding_seconds=4.0), 8, where="branches.audio_text")
    batch = make_batch(2, size=32, audio_s=1.0)
    batch.audio = torch.zeros(2, len(clip))
    batch.audio[0] = clip
    batch.audio_lengths = torch.tensor([len(clip), 16_000])
    with torch.no_grad():
        extracted = collate_extracted(encoder.extract(batch))
    assert extracted["audio_frames_lengths"].tolist() == [200, 200]  # 3.3 s and 1 s clips, both padded to 4 s
    assert extracted["audio_frames"].shape == (2, 200, 5 * 384)
    silence = extracted["audio_frames"][0, own_frames(clip) + 5:]
    assert torch.isfinite(silence).all() and silence.abs().sum() > 0  # encoded silence, not zero padding


@pytest.mark.parametrize(("seconds", "message"), [(-1.0, "outside Whisper's window: give 0"),
                                                  (30.5, "outside Whisper's window: give 0"),
                                                  (float("nan"), "a finite number")])
def test_padding_outside_whispers_window_is_refused(seconds, message):
    with pytest.raises(ConfigError, match=f"branches.audio_text.audio_padding_seconds: .*{message}"):
        build_encoder(ComponentRef(name="mm-lstm", audio_padding_seconds=seconds), 8, where="branches.audio_text")


def test_padding_a_backbone_that_is_not_whisper_is_refused():
    with pytest.raises(ConfigError, match="audio_padding_seconds = 4.0: only a Whisper audio backbone pads clips"):
        make_audio_backbone("log-mel", padding_seconds=4.0)


def test_each_padding_has_its_own_cache_namespace():
    def namespace(seconds: float) -> str:
        ref = ComponentRef(name="mm-lstm", audio_padding_seconds=seconds)
        return encoder_namespace(build_encoder(ref, 8, where="branches.audio_text"))

    clip_length, four, window = namespace(0.0), namespace(4.0), namespace(30.0)
    assert len({clip_length, four, window}) == 3
    assert namespace(4.0) == four  # the same padding finds the same features again
    head_only = ComponentRef(name="mm-lstm", audio_padding_seconds=4.0, lstm_hidden=64)
    assert encoder_namespace(build_encoder(head_only, 8, where="branches.audio_text")) == four
    assert encoder_namespace(build_encoder(ComponentRef(name="mm-lstm"), 8, where="x")) == clip_length  # the default
