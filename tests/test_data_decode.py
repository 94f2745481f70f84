"""Decoding real ogg/mp3/flv with PyAV, and clear errors for truncated, garbage and track-less files."""
from __future__ import annotations

import os

import av
import numpy as np
import pytest

from emofuse.core.engine.compose import default_data_dir
from emofuse.core.data.decode import SAMPLE_RATE, decode_audio, decode_video, probe
from emofuse.core.errors import DataError

DATA = default_data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="the shared corpora (../shared/data) are not beside this checkout")

OGG = DATA / "ravdess-speech" / "Actor_01" / "03-01-01-01-01-01-01.ogg" if DATA else None
MP3 = DATA / "crema-d" / "media" / "1002_DFA_ANG_XX.mp3" if DATA else None
FLV = DATA / "crema-d" / "media" / "1001_DFA_ANG_XX.flv" if DATA else None


@pytest.mark.parametrize("name, seconds", [("OGG", 3.31), ("MP3", 2.61), ("FLV", 2.27)])
def test_audio_is_16k_mono_float_of_the_clip_length(name, seconds):
    audio = decode_audio(globals()[name])
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.shape[0] / SAMPLE_RATE == pytest.approx(seconds, abs=0.05)
    assert 0.01 < np.abs(audio).max() <= 1.0  # real speech, not silence or clipping garbage
    assert decode_audio(globals()[name], max_seconds=1.0).shape == (SAMPLE_RATE,)


def test_audio_is_really_resampled_not_relabelled():
    """A 48 kHz Opus stream resampled to 16 kHz keeps its spectrum: the energy stays below 8 kHz."""
    audio = decode_audio(OGG)
    spectrum = np.abs(np.fft.rfft(audio))
    freqs = np.fft.rfftfreq(audio.shape[0], 1 / SAMPLE_RATE)
    speech_band = spectrum[(freqs > 100) & (freqs < 4000)].sum()
    assert speech_band / spectrum.sum() > 0.7


def test_video_gives_eight_224px_frames_sampled_evenly_over_the_clip():
    frames = decode_video(FLV)
    assert frames.shape == (8, 224, 224, 3) and frames.dtype == np.uint8
    with av.open(str(FLV)) as c:
        stream = c.streams.video[0]
        duration = c.duration / av.time_base
        every = [(f.time, f.reformat(width=224, height=224, format="rgb24", interpolation="BILINEAR").to_ndarray()) for f in c.decode(stream)]
    times = np.array([t for t, _ in every])
    for i, frame in enumerate(frames):
        target = (i + 0.5) * duration / 8
        expected = every[int(np.searchsorted(times, target, side="right")) - 1][1]
        np.testing.assert_array_equal(frame, expected)
    assert len({f.tobytes() for f in frames}) == 8


def test_probe_reports_streams_and_duration():
    info = probe(FLV)
    assert info.has_audio and info.has_video and info.duration == pytest.approx(2.235, abs=0.01)
    assert not probe(MP3).has_video


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """Truncated copies (10%, 50%, 90%), garbage bytes and empty files with real extensions."""
    folder = tmp_path_factory.mktemp("broken")
    out = {}
    rng = np.random.default_rng(0)
    for src in (OGG, MP3, FLV):
        data = src.read_bytes()
        for frac in (10, 50, 90):
            p = folder / f"cut{frac}{src.suffix}"
            p.write_bytes(data[: len(data) * frac // 100])
            out[p.name] = p
        g = folder / f"garbage{src.suffix}"
        g.write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
        out[g.name] = g
        e = folder / f"empty{src.suffix}"
        e.write_bytes(b"")
        out[e.name] = e
    return out


@pytest.mark.parametrize("ext", [".ogg", ".mp3", ".flv"])
@pytest.mark.parametrize("kind", ["cut10", "cut50", "cut90", "garbage", "empty"])
def test_broken_audio_is_a_clear_error_naming_the_file(broken, kind, ext):
    path = broken[f"{kind}{ext}"]
    with pytest.raises(DataError) as info:
        decode_audio(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert info.value.path == str(path)
    if kind.startswith("cut"):
        assert "truncated" in message or "corrupt" in message or "not a readable" in message


@pytest.mark.parametrize("kind", ["cut10", "cut50", "cut90", "garbage", "empty"])
def test_broken_video_is_a_clear_error_naming_the_file(broken, kind):
    path = broken[f"{kind}.flv"]
    with pytest.raises(DataError, match=f"^{path}: "):
        decode_video(path)


def test_clip_without_audio_track_and_missing_file(tmp_path):
    video_only = tmp_path / "video_only.mp4"
    with av.open(str(FLV)) as inp, av.open(str(video_only), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = 240, 180, "yuv420p"
        for frame in inp.decode(video=0):
            for packet in stream.encode(frame.reformat(width=240, height=180, format="yuv420p")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert decode_video(video_only).shape == (8, 224, 224, 3)
    with pytest.raises(DataError, match=f"^{video_only}: has no audio track"):
        decode_audio(video_only)
    with pytest.raises(DataError, match=f"^{MP3}: has no video track"):
        decode_video(MP3)
    with pytest.raises(DataError, match="no such file"):
        decode_audio(tmp_path / "nope.wav")


def test_every_shared_ravdess_clip_passes_the_truncation_checks():
    """The strict checks must not reject good files: a sample of one clip per actor and emotion."""
    clips = sorted((DATA / "ravdess-speech").glob("Actor_*/03-01-0?-01-01-01-*.ogg"))
    assert len(clips) == 96
    for clip in clips[:: max(1, len(clips) // 24)]:
        assert decode_audio(clip).shape[0] > SAMPLE_RATE
    assert os.path.getsize(clips[0]) > 0


def test_long_clip_stops_decoding_early_but_still_notices_a_cut_tail(tmp_path):
    """Frames are picked before the end of a long clip; the rest is only demuxed, yet a cut is caught."""
    import fractions

    long_clip = tmp_path / "long.flv"
    with av.open(str(long_clip), "w", format="flv") as out:
        stream = out.add_stream("flv1", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        n = 0
        for _ in range(5):  # the real clip five times over: ~11 s
            with av.open(str(FLV)) as inp:
                for frame in inp.decode(video=0):
                    f = av.VideoFrame.from_ndarray(frame.to_ndarray(width=320, height=240, format="yuv420p"),
                                                   format="yuv420p")
                    f.pts, f.time_base, n = n, fractions.Fraction(1, 30), n + 1
                    for packet in stream.encode(f):
                        out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert probe(long_clip).duration > 10
    assert decode_video(long_clip).shape == (8, 224, 224, 3)
    data = long_clip.read_bytes()
    cut = tmp_path / "cut.flv"
    cut.write_bytes(data[: int(len(data) * 0.95)])
    with pytest.raises(DataError, match=f"^{cut}: .*(truncated|corrupt)"):
        decode_video(cut)
