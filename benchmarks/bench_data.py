"""Data-pipeline benchmark on the shared corpora: decode + preprocessing throughput, and what the feature
cache buys (an epoch over cached features against the first epoch over raw media, in one run).

    HF_HUB_OFFLINE=1 python benchmarks/bench_data.py [--clips 240] [--workers 2] [--encoder mm-lstm] [--threads 1]

1. clips/s through `DataBundle.loader` (PyAV decode, 16 kHz resampling or 8 frames at 224x224,
   collation, normalisation) with `--workers` DataLoader processes: RAVDESS speech (.ogg, audio),
   CREMA-D audio-visual clips (.flv, frames + audio).
2. Two epochs of a frozen-backbone branch (a registered encoder, `mm-lstm` by default: MiniLM
   text + log-mel audio, frozen) over the same RAVDESS clips with a fresh `FeatureCache`: epoch 1
   decodes the audio and runs the backbone (cache misses), epoch 2 skips decoding and reads the
   cached features. Both epochs include the branch head's forward pass.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from emofuse.core.engine.compose import build_encoder, default_data_dir
from emofuse.core.config import ComponentRef, DataConfig
from emofuse.core.data.cache import FeatureCache
from emofuse.core.data.pipeline import DataBundle, load_data
from emofuse.core.types import AUDIO, VIDEO


def clips_per_second(bundle: DataBundle, split: str, modalities: set[str], *, workers: int,
                     batch_size: int) -> tuple[float, int]:
    clips, start = 0, time.perf_counter()
    for batch in bundle.loader(split, batch_size=batch_size, shuffle=False, seed=0, modalities=modalities,
                               num_workers=workers):
        clips += len(batch)
    return clips / (time.perf_counter() - start), clips


def epoch(bundle: DataBundle, encoder, cache: FeatureCache, modalities: set[str], *, workers: int,
          batch_size: int) -> tuple[float, float]:
    """(whole epoch, of which the branch head's forward) in seconds."""
    head = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in bundle.loader("train", batch_size=batch_size, shuffle=True, seed=1, modalities=modalities,
                                   num_workers=workers):
            extracted = cache.extract(encoder, batch)
            t = time.perf_counter()
            encoder(batch, extracted)
            head += time.perf_counter() - t
    return time.perf_counter() - start, head


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=240, help="RAVDESS clips to use (of 720)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (2 cores)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--encoder", default="mm-lstm", help="registered encoder with a frozen, cacheable part")
    parser.add_argument("--video-repeats", type=int, default=10, help="passes over the 6 CREMA-D .flv clips")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the main process (1: DataLoader workers already use the "
                             "cores; 2 threads here spin against them and made epoch 1 ~5x slower, see README)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if default_data_dir() is None:
        print("the shared corpora (../shared/data) are not beside this checkout", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"cores available: {len(os.sched_getaffinity(0))}, DataLoader workers: {args.workers}, "
          f"torch threads: {torch.get_num_threads()}")

    # Everything in one split so the clip count is exact; the split method does not matter here.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ravdess = load_data(DataConfig(dataset="ravdess", split="balanced", limit=args.clips),
                            {AUDIO, "text", "features"}, split_dir=tmp / "r")
        ravdess.splits["train"] = sorted(ravdess.splits["train"] + ravdess.splits["val"] + ravdess.splits["test"],
                                         key=lambda s: s.id)
        for split in ("val", "test"):
            ravdess.splits[split] = []
        rate, n = clips_per_second(ravdess, "train", {AUDIO, "text", "features"}, workers=args.workers,
                                   batch_size=args.batch_size)
        print(f"decode+preprocess RAVDESS .ogg -> 16 kHz mono: {rate:7.1f} clips/s ({n} clips)")

        # Whole frames, as before face tracking existed; bench_faces.py measures decode + detect + crop.
        crema = load_data(DataConfig(dataset="crema-d", split="balanced", video={"faces": "none"}), {VIDEO, AUDIO},
                          split_dir=tmp / "c")
        # The six audio-visual clips, several times over in one pass, so workers run at steady state.
        clips = sorted((s for k in crema.splits for s in crema.splits[k] if s.video_path), key=lambda s: s.id)
        crema.splits["train"] = clips * args.video_repeats
        rate, n = clips_per_second(crema, "train", {VIDEO, AUDIO}, workers=args.workers, batch_size=4)
        print(f"decode+preprocess CREMA-D .flv -> 8x224x224 frames + audio: {rate:7.1f} clips/s ({n} clips)")

        try:
            encoder = build_encoder(ComponentRef(name=args.encoder), ravdess.num_classes, where=args.encoder)
        except Exception as exc:  # the benchmark still reports decoding without an encoder
            print(f"encoder {args.encoder!r} unavailable ({exc}); skipping the cache benchmark", file=sys.stderr)
            return 1
        encoder.eval()
        if not encoder.cacheable:
            print(f"encoder {args.encoder!r} has no frozen cacheable part", file=sys.stderr)
            return 1
        cache = FeatureCache(tmp / "cache")
        full = set(encoder.modalities)
        light = full - {VIDEO, AUDIO}
        raw, raw_head = epoch(ravdess, encoder, cache, full, workers=args.workers, batch_size=args.batch_size)
        misses = cache.stats.misses
        cached, cached_head = epoch(ravdess, encoder, cache, light, workers=args.workers, batch_size=args.batch_size)
        hits = cache.stats.hits
        size = cache.size_bytes() / 2**20
        print(f"epoch 1 over raw media ({args.encoder}, {misses} backbone runs): {raw:7.2f} s "
              f"(head forward {raw_head:.2f} s)")
        print(f"epoch 2 over cached features ({hits} cache hits, {size:.1f} MiB on disk): {cached:7.2f} s "
              f"(head forward {cached_head:.2f} s)")
        print(f"cached / raw epoch time: {cached / raw:.3f}  (speed-up x{raw / cached:.1f})")
        data_raw, data_cached = raw - raw_head, cached - cached_head
        print(f"inputs only (decode + frozen backbone vs cache read): {data_raw:.2f} s vs {data_cached:.2f} s, "
              f"ratio {data_cached / data_raw:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
