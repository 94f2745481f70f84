"""What the feature cache's checksums cost: reading one shard's entries (and collating them, as a
trainer does) with and without checking their xxh3-128 checksums.

    python benchmarks/bench_cache_checksum.py [--clips 64] [--frames 150] [--repeats 5]

The shard is shaped like `mm-lstm`'s entries for RAVDESS clips: Whisper tiny.en frames of every layer
(``[frames, 5 x 384]`` float32, about 3 s of speech) plus MiniLM tokens (``[20, 384]``). A checksum is
checked the first time an open `FeatureCache` reads an entry; later reads cost nothing extra.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from emofuse.core.data.cache import FeatureCache, entry_checksum
from emofuse.core.interfaces import collate_extracted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = [f"clip{i}" for i in range(args.clips)]
        values = [{"audio_frames": torch.randn(args.frames, 5 * 384), "text_tokens": torch.randn(20, 384)} for _ in keys]
        FeatureCache(root).put_many("ns", keys, values)
        (shard,) = root.glob("ns/*.safetensors")
        mb = shard.stat().st_size / 1e6

        def read(checked: bool) -> float:
            best = float("inf")
            for _ in range(args.repeats):
                cache = FeatureCache(root)
                cache._lookup("ns", keys)
                if not checked:
                    cache._verified |= {(shard, k) for k in keys}
                start = time.perf_counter()
                collate_extracted(cache.get_many("ns", keys))
                best = min(best, time.perf_counter() - start)
            return best

        plain, checked = read(False), read(True)
        start = time.perf_counter()
        for value in values:
            entry_checksum(value)
        hashing = time.perf_counter() - start
    print(f"shard of {args.clips} clips, {mb:.1f} MB: read + collate {plain * 1e3:.1f} ms unchecked, "
          f"{checked * 1e3:.1f} ms checked (+{(checked - plain) * 1e3:.1f} ms, {(checked / plain - 1) * 100:+.0f}%); "
          f"checksums alone {hashing * 1e3:.1f} ms ({mb / 1e3 / hashing:.1f} GB/s)")


if __name__ == "__main__":
    main()
