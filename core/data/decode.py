"""Media decoding with PyAV: any container ffmpeg reads, to 16 kHz mono audio and evenly spaced frames.

Decoders are strict on purpose: a file that cannot be opened, has no stream of the asked kind, or
ends well before the duration its header declares (a truncated download) raises `DataError` naming
the file, instead of quietly yielding half a clip.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from emofuse.core.errors import DataError

#: Sample rate every audio clip is resampled to.
SAMPLE_RATE = 16_000

#: A decoded stream may end this much before its declared duration (codec priming, rounding).
_MIN_SLACK_S = 0.2
_REL_SLACK = 0.02

_BAD_HINT = "re-encode or replace the file, or pass --on-bad-sample skip to leave it out"

#: What a damaged file can make PyAV/ffmpeg raise (FFmpegError subclasses OSError); all mean bad input.
_DECODE_ERRORS = (av.FFmpegError, OSError, EOFError, ValueError, IndexError, ZeroDivisionError, RuntimeError,
                  UnicodeDecodeError)

# ffmpeg logs recoverable glitches of damaged files; the checks below decide, not the log.
av.logging.set_level(av.logging.FATAL)


@dataclass(frozen=True)
class MediaInfo:
    """What a container holds, read from its header without decoding."""

    path: str
    format: str
    duration: float | None
    has_audio: bool
    has_video: bool


def probe(path: str | os.PathLike) -> MediaInfo:
    """Open `path`'s header only: format, declared duration and which streams it has."""
    with _open(path) as container:
        return MediaInfo(
            path=str(path),
            format=container.format.name,
            duration=_container_duration(container),
            has_audio=bool(container.streams.audio),
            has_video=bool(_moving_video(container)),
        )


def media_duration(path: str | os.PathLike) -> float:
    """Seconds from the first to the last audio/video packet of `path`, read by demuxing (no decoding).

    A header's declared duration can understate what a file holds (or be absent), so a limit on
    clip length must measure the packets themselves.
    """
    with _open(path) as container:
        streams = list(container.streams.audio) + _moving_video(container)
        if not streams:
            raise DataError(path, "has no audio or video stream", hint=_BAD_HINT)
        first, last = None, 0.0
        try:
            for packet in container.demux(streams):
                if packet.pts is None or packet.time_base is None:
                    continue
                start = float(packet.pts * packet.time_base)
                first = start if first is None else min(first, start)
                last = max(last, float((packet.pts + (packet.duration or 0)) * packet.time_base))
        except _DECODE_ERRORS as exc:
            raise DataError(path, f"not a readable media file: {_reason(exc)}", hint=_BAD_HINT) from None
    if first is None:
        raise DataError(path, "holds no timed audio or video packets", hint=_BAD_HINT)
    return max(0.0, last - first)


def _moving_video(container) -> list:
    """The video streams that are not a still picture attached to audio (an MP3's or M4A's cover art)."""
    still = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video if not s.disposition & still]


def decode_audio(
    path: str | os.PathLike, *, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None
) -> np.ndarray:
    """The first audio stream of `path`, downmixed to mono and resampled: float32 ``[L]`` in [-1, 1]."""
    with _open(path) as container:
        if not container.streams.audio:
            raise DataError(path, "has no audio track", hint=_BAD_HINT)
        stream = container.streams.audio[0]
        declared = _stream_duration(stream) or _container_duration(container)
        is_ogg = container.format.name == "ogg"
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        limit = int(max_seconds * sample_rate) if max_seconds else None
        chunks: list[np.ndarray] = []
        total = 0
        cut = False
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].shape[0]
                if limit is not None and total >= limit:
                    cut = True
                    break
            if not cut:
                for out in resampler.resample(None):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].shape[0]
        except _DECODE_ERRORS as exc:
            raise DataError(path, f"audio is corrupt: {_reason(exc)}", hint=_BAD_HINT) from None
    if total == 0:
        raise DataError(path, "audio track holds no samples", hint=_BAD_HINT)
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    if cut:
        audio = audio[:limit]
    else:
        _check_complete(path, "audio", total / sample_rate, declared)
        if is_ogg:
            _check_ogg_complete(path)
    if not np.isfinite(audio).all():
        raise DataError(path, "audio decodes to non-finite values", hint=_BAD_HINT)
    return audio


def decode_video(path: str | os.PathLike, *, num_frames: int = 8, size: int = 224) -> np.ndarray:
    """`num_frames` RGB frames sampled evenly over the clip, resized to ``size x size``: uint8 ``[T, size, size, 3]``.

    Frame i is the one on screen at time ``(i + 0.5) * duration / T`` (the middle of the i-th of T
    equal segments), so short and long clips are covered end to end.
    """
    if num_frames < 1:
        raise ValueError("num_frames must be >= 1")
    with _open(path) as container:
        if not container.streams.video:
            raise DataError(path, "has no video track", hint=_BAD_HINT)
        stream = container.streams.video[0]
        # Span of the clip: the stream's own when it declares one, else the container's.
        declared = _stream_duration(stream)
        if declared is not None:
            start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        else:
            declared = _container_duration(container)
            start = container.start_time / av.time_base if container.start_time is not None else 0.0
        rate = float(stream.average_rate) if stream.average_rate else None
        try:
            if declared:
                frames, end = _frames_at_times(container, stream, start, declared, num_frames, size, rate)
            else:
                frames, end = _frames_by_index(container, stream, num_frames, size, rate)
        except _DECODE_ERRORS as exc:
            raise DataError(path, f"video is corrupt: {_reason(exc)}", hint=_BAD_HINT) from None
    if not frames:
        raise DataError(path, "video track holds no frames", hint=_BAD_HINT)
    if declared:
        _check_complete(path, "video", end - start, declared)
    return np.stack(frames)


def _frames_at_times(container, stream, start, duration, num_frames, size, rate):
    """Decode in order, keeping for each target time the last frame shown at or before it."""
    targets = [start + (i + 0.5) * duration / num_frames for i in range(num_frames)]
    picked: list[np.ndarray] = []
    previous = None
    end = start
    stopped_early = False
    for index, frame in enumerate(container.decode(stream)):
        t = _frame_time(frame, index, rate, start)
        end = t + (1.0 / rate if rate else 0.0)
        while len(picked) < num_frames and t > targets[len(picked)]:
            picked.append(_to_rgb(previous if previous is not None else frame, size))
        if len(picked) == num_frames:
            stopped_early = True
            break
        previous = frame
    if stopped_early:
        # All frames are picked before the clip ends: read the rest's packet times (no decoding), so
        # a truncated tail is still noticed.
        for packet in container.demux(stream):
            if packet.pts is not None:
                end = max(end, float((packet.pts + (packet.duration or 0)) * stream.time_base))
    elif previous is not None:
        while len(picked) < num_frames:
            picked.append(_to_rgb(previous, size))
    return picked, end


def _frames_by_index(container, stream, num_frames, size, rate):
    """No declared duration: keep every frame small, then take evenly spaced indices."""
    small = [_to_rgb(f, size) for f in container.decode(stream)]
    if not small:
        return [], 0.0
    idx = np.minimum((np.arange(num_frames) + 0.5) * len(small) / num_frames, len(small) - 1).astype(int)
    return [small[i] for i in idx], (len(small) / rate if rate else 0.0)


def _to_rgb(frame, size: int) -> np.ndarray:
    return frame.reformat(width=size, height=size, format="rgb24", interpolation="BILINEAR").to_ndarray()


def _frame_time(frame, index: int, rate: float | None, start: float) -> float:
    if frame.time is not None:
        return float(frame.time)
    return start + (index / rate if rate else float(index))


def _open(path: str | os.PathLike):
    p = Path(path)
    if not p.is_file():
        raise DataError(path, "no such file", hint="check the path, or pass --on-bad-sample skip")
    if p.stat().st_size == 0:
        raise DataError(path, "file is empty", hint=_BAD_HINT)
    try:
        return av.open(str(p), mode="r")
    except _DECODE_ERRORS as exc:
        raise DataError(path, f"not a readable media file: {_reason(exc)}", hint=_BAD_HINT) from None


def _stream_duration(stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    return None


def _container_duration(container) -> float | None:
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def _check_complete(path, kind: str, decoded: float, declared: float | None) -> None:
    if declared is None:
        return
    if decoded < declared - max(_MIN_SLACK_S, _REL_SLACK * declared):
        raise DataError(
            path,
            f"{kind} ends at {decoded:.2f} s but the file declares {declared:.2f} s: the file is truncated",
            hint=_BAD_HINT,
        )


def _check_ogg_complete(path) -> None:
    """Ogg declares no duration up front, so a cut file decodes cleanly; its last page must carry end-of-stream.

    A complete Ogg file ends with a whole page whose header flags end-of-stream (0x04).
    """
    size = os.path.getsize(path)
    window = min(size, 70_000)  # an Ogg page is at most 65,307 bytes
    with open(path, "rb") as f:
        f.seek(size - window)
        tail = f.read(window)
    pos = tail.rfind(b"OggS")
    while pos != -1:
        header = tail[pos : pos + 27]
        if len(header) == 27 and header[4] == 0:
            n_segments = header[26]
            table = tail[pos + 27 : pos + 27 + n_segments]
            if len(table) == n_segments and pos + 27 + n_segments + sum(table) == window:
                if header[5] & 0x04:
                    return
                break
        pos = tail.rfind(b"OggS", 0, pos)
    raise DataError(path, "Ogg stream has no end-of-stream page: the file is truncated", hint=_BAD_HINT)


def _reason(exc: BaseException) -> str:
    """ffmpeg's message without the errno and the repeated file name."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text)
    text = re.sub(r":\s*'[^']*'(?=;|$)", "", text)
    return text or type(exc).__name__
