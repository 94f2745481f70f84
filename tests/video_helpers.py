"""Writing small test videos with PyAV, from real clips' frames (kept in tmp folders, never committed)."""
from __future__ import annotations

import fractions
from pathlib import Path

import av
import numpy as np


def all_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def write_video(path: Path, frames, *, rate: int = 30, gop: int = 15, audio: np.ndarray | None = None) -> Path:
    """An MPEG-4 file from RGB frames (a keyframe every `gop` frames), optionally with a mono audio track."""
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.bit_rate = 8_000_000
        sound = out.add_stream("aac", rate=16000, layout="mono") if audio is not None else None
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, fractions.Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
        if sound is not None:
            for start in range(0, len(audio), 1024):
                frame = av.AudioFrame.from_ndarray(audio[None, start:start + 1024].astype(np.float32), format="fltp",
                                                   layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = 16000, start, fractions.Fraction(1, 16000)
                out.mux(sound.encode(frame))
            out.mux(sound.encode())
    return path
