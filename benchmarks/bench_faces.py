"""Face pipeline speed on real video: decode + detect + crop frames/s on 2 cores, and seeking against
decoding the whole clip, in one run.

    flock /tmp/emofuse-cpu.lock .venv/bin/python benchmarks/bench_faces.py [--repeats 4] [--markdown out.md]

Clips: the 6 real CREMA-D Flash videos of ../shared/data (480x360, 2 s, one keyframe each), and a
long clip made in a temporary folder from their frames (the six twice over, ~25 s, MPEG-4 with a
keyframe every second): the layout of a user's own recording, where seeking can skip most of the
decoding. Each clip gives 8 evenly spaced frames (the encoder's), faces are found with the Haar
cascade, tracked and cropped to 224x224; the crop cache is off, so every run detects. OpenCV and
PyAV run on one thread per process; "2 cores" runs two worker processes.
"""
from __future__ import annotations

import argparse
import fractions
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
FRAMES = 8


def _single_thread() -> None:
    import cv2

    cv2.setNumThreads(1)


def make_long_clip(folder: Path, clips: list[Path], *, rate: int = 30) -> Path:
    """The real clips' frames, twice over, as one MPEG-4 file with a keyframe every second."""
    path = folder / "long.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 480, 360, "yuv420p"
        stream.codec_context.gop_size = rate
        stream.bit_rate = 4_000_000
        n = 0
        for clip in clips * 2:
            with av.open(str(clip)) as inp:
                for frame in inp.decode(video=0):
                    f = frame.reformat(format="yuv420p")
                    f.pts, f.time_base, n = n, fractions.Fraction(1, rate), n + 1
                    out.mux(stream.encode(f))
        out.mux(stream.encode())
    return path


def decode_costs(paths: list[Path], repeats: int) -> dict[str, dict[str, float]]:
    """Per way of getting the 8 frames: ms per clip (median over repeats) and frames decoded per clip."""
    from emofuse.core.data.decode import decode_all_frames, sample_frames

    ways = {
        "whole clip decoded": lambda p: decode_all_frames(p),
        "decode from the start to the last target": lambda p: sample_frames(p, num_frames=FRAMES, seek=False).decoded,
        "seek to the keyframe before each target": lambda p: sample_frames(p, num_frames=FRAMES, seek=True).decoded,
    }
    out = {}
    for name, fn in ways.items():
        times, decoded = [], []
        for _ in range(repeats):
            for p in paths:
                start = time.perf_counter()
                decoded.append(fn(p))
                times.append(time.perf_counter() - start)
        out[name] = {"ms_per_clip": 1000 * statistics.median(times), "frames_decoded_per_clip": float(np.mean(decoded))}
    return out


def stage_split(paths: list[Path], repeats: int) -> dict[str, float]:
    """ms per sampled frame of each step, one process: decode (seeking) + RGB, detect, track + crop."""
    from emofuse.core.data.decode import sample_frames
    from emofuse.core.data.faces import MAX_DECODE_SIDE, FaceSettings, crop_faces, detector_for, track_faces

    settings = FaceSettings()
    detector = detector_for(settings)
    spent = {"decode": 0.0, "detect": 0.0, "track + crop": 0.0}
    frames_done = found = 0
    for _ in range(repeats):
        for p in paths:
            t0 = time.perf_counter()
            frames = sample_frames(p, num_frames=FRAMES).rgb(MAX_DECODE_SIDE)
            t1 = time.perf_counter()
            candidates = [detector.detect(f) for f in frames]
            t2 = time.perf_counter()
            track = track_faces(candidates)
            if track is not None:
                crop_faces(frames, track.boxes, size=224, margin=settings.margin)
                found += int(track.detected.sum())
            t3 = time.perf_counter()
            spent["decode"] += t1 - t0
            spent["detect"] += t2 - t1
            spent["track + crop"] += t3 - t2
            frames_done += len(frames)
    result = {f"{k} ms/frame": 1000 * v / frames_done for k, v in spent.items()}
    result["frames with a detection"] = found / frames_done
    return result


def _faces_of(path: str) -> int:
    from emofuse.core.data.faces import FaceSettings, face_clip

    found = face_clip(path, FaceSettings(), num_frames=FRAMES)
    return 0 if found is None else len(found.crops)


def throughput(paths: list[Path], repeats: int, workers: int) -> dict[str, float]:
    """Sampled frames/s of decode + detect + crop over `workers` processes (after a warm-up clip each)."""
    jobs = [str(p) for _ in range(repeats) for p in paths]
    with ProcessPoolExecutor(max_workers=workers, initializer=_single_thread) as pool:
        list(pool.map(_faces_of, [str(paths[0])] * workers))  # imports and cascade loading, not timed
        start = time.perf_counter()
        frames = sum(pool.map(_faces_of, jobs))
        wall = time.perf_counter() - start
    return {"frames_per_s": frames / wall, "clips_per_s": len(jobs) / wall, "clips": len(jobs)}


def markdown(result: dict) -> str:
    lines = [f"Load average at the start: {result['load_average']}; {result['repeats']} passes.", "",
             "| clips | decode + detect + crop, 1 process | 2 processes (2 cores) | per frame: decode / detect / track + crop | frames with a detection |",
             "| --- | ---: | ---: | --- | ---: |"]
    for name, r in result["pipeline"].items():
        s = r["stages"]
        lines.append(f"| {name} | {r['1 process']['frames_per_s']:.1f} frames/s | {r['2 processes']['frames_per_s']:.1f} frames/s "
                     f"({r['2 processes']['clips_per_s']:.2f} clips/s) | {s['decode ms/frame']:.1f} / {s['detect ms/frame']:.1f} / "
                     f"{s['track + crop ms/frame']:.1f} ms | {s['frames with a detection']:.0%} |")
    lines += ["", "| clips | way to get the 8 frames | ms per clip | frames decoded per clip |", "| --- | --- | ---: | ---: |"]
    for name, ways in result["decode"].items():
        for way, r in ways.items():
            lines.append(f"| {name} | {way} | {r['ms_per_clip']:.1f} | {r['frames_decoded_per_clip']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--repeats", type=int, default=4, help="passes over the clips")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    _single_thread()
    clips = sorted((args.data / "crema-d" / "media").glob("*.flv"))
    if not clips:
        print(f"no CREMA-D .flv clips under {args.data}", file=sys.stderr)
        return 2
    result: dict = {"load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()), "repeats": args.repeats,
                    "pipeline": {}, "decode": {}}
    with tempfile.TemporaryDirectory() as tmp:
        long_clip = make_long_clip(Path(tmp), clips)
        sets = {"CREMA-D .flv (6 real clips, 2 s, 1 keyframe)": clips,
                "long .mp4 from their frames (25 s, keyframe every 1 s)": [long_clip]}
        for name, paths in sets.items():
            reps = args.repeats if len(paths) > 1 else 2 * args.repeats
            result["decode"][name] = decode_costs(paths, reps)
            result["pipeline"][name] = {
                "stages": stage_split(paths, reps),
                "1 process": throughput(paths, reps, 1),
                "2 processes": throughput(paths, 2 * reps, 2),
            }
    result["load_average_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    text = markdown(result)
    print(text)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
