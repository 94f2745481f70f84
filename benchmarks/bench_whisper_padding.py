"""What padding clips before Whisper buys: accuracy and encoding time of mm-lstm's ``audio_padding_seconds``.

    nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_whisper_padding.py \\
        [--backbones whisper,whisper-base] [--paddings 0,4,30] [--budget-s 420] [--cache /tmp/emofuse-whisper-padding]

For each packaged Whisper (tiny.en ``whisper``, multilingual ``whisper-base``) and each padding (0: each clip's
own frames; 4: shorter clips padded with silence to 4 s; 30: Whisper's full window), the last layer of
`WhisperFrontEnd` (the front end mm-lstm reads, at that padding) over every RAVDESS clip of ../shared/data,
pooled per clip by the baselines' `pool` (mean and std over every frame the front end returns, padded
silence included, as mm-lstm's statistics see them). Then the baselines' logistic regression
(`baselines.logistic_regression`: standardised inputs, C chosen on the validation actors, refit on train +
validation) leave one actor out (`speaker_folds`, 12 folds of actors 1-12; the next 2 actors validate), or over
`--folds` groups of contiguous actors.

Also reported: the same regression over the padded encoding pooled over the clip's own frames only (the
padding's context without its silence in the statistics), and each padding's accuracy minus the clip
length's, paired clip by clip (95% bootstrap interval) and by fold.

Encoding seconds count the front end alone (decoding apart, done once beforehand), on `--threads` torch
threads. A configuration whose rate, timed over its first `--probe` clips, projects past `--budget-s` is
skipped, its measured rate reported. Pooled features are cached under `--cache` (one .npz per
configuration, with its measured seconds), so reruns only refit the regressions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from emofuse.core.apps.baselines import logistic_regression, paired_difference, pool  # noqa: E402
from emofuse.core.data.decode import decode_audio  # noqa: E402
from emofuse.core.data.splits import speaker_folds  # noqa: E402
from emofuse.core.types import Sample  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Bump when what is cached changes (what is pooled, how).
CACHE_VERSION = 1


def ravdess_samples(data: Path | None) -> list[Sample]:
    """The labelled RAVDESS speech clips (the `ravdess` reader's defaults), sorted by id."""
    from emofuse.core.config import DataConfig
    from emofuse.core.engine.compose import build_reader

    samples = build_reader(DataConfig(dataset="ravdess", data_dir=data)).samples()
    return sorted((s for s in samples if s.label is not None), key=lambda s: s.id)


def own_frames(samples_count: int) -> int:
    """Encoder positions of a clip's own length: 100 mel frames/s, halved by Whisper's second convolution."""
    return (samples_count // 160 + 1) // 2


def cache_path(cache: Path, backbone: str, padding: float, samples: Sequence[Sample]) -> Path:
    from emofuse.plugins.encoders.whisper import packaged_model

    key = json.dumps([CACHE_VERSION, packaged_model(backbone).sha256, padding, [s.id for s in samples]])
    return cache / f"{backbone}-pad{padding:g}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def extract(backbone: str, padding: float, samples: Sequence[Sample], waves: dict[str, np.ndarray], *,
            budget_s: float, probe: int) -> dict[str, Any]:
    """Pooled last-layer features over the whole returned window and over the clip's own frames, and the
    encoding seconds; or, when the first `probe` clips project past `budget_s`, the measured rate alone."""
    from emofuse.plugins.encoders.audio_backbone import WhisperFrontEnd

    front = WhisperFrontEnd(backbone, all_layers=False, padding_seconds=padding).eval()
    window, clip, seconds, frames = [], [], 0.0, 0
    with torch.inference_mode():
        front([torch.from_numpy(waves[samples[0].id])])  # warm-up: first-call allocations
        for n, s in enumerate(samples, 1):
            wav = torch.from_numpy(waves[s.id])
            start = time.perf_counter()
            (out,) = front([wav])
            seconds += time.perf_counter() - start
            frames += out.shape[0]
            window.append(pool(out))
            clip.append(pool(out[: min(own_frames(len(wav)), out.shape[0])]))
            if n == probe and seconds / n * len(samples) > budget_s:
                return {"skipped": True, "clips_timed": n, "seconds_timed": seconds, "clips_per_s": n / seconds,
                        "projected_seconds": seconds / n * len(samples)}
    return {"skipped": False, "window": np.stack(window), "clip": np.stack(clip), "seconds": seconds,
            "clips_per_s": len(samples) / seconds, "mean_frames": frames / len(samples)}


def load_or_extract(cache: Path, backbone: str, padding: float, samples: Sequence[Sample],
                    waves_of: Any, *, budget_s: float, probe: int) -> dict[str, Any]:
    """The cached features of a configuration, or its cached probe when that projects past `budget_s`, else
    extracted now (and cached: the features, or the probe of a configuration skipped)."""
    path = cache_path(cache, backbone, padding, samples)
    probed = path.with_suffix(".skipped.json")
    if path.is_file():
        with np.load(path) as f:
            stored = {k: f[k] for k in f.files}
        meta = json.loads(str(stored.pop("meta")))
        return {**meta, **stored, "skipped": False, "from_cache": True}
    if probed.is_file() and (known := json.loads(probed.read_text()))["projected_seconds"] > budget_s:
        return {**known, "from_cache": True}
    got = extract(backbone, padding, samples, waves_of(), budget_s=budget_s, probe=probe)
    cache.mkdir(parents=True, exist_ok=True)
    if got["skipped"]:
        probed.write_text(json.dumps(got))
    else:
        meta = {k: got[k] for k in ("seconds", "clips_per_s", "mean_frames")} | {"threads": torch.get_num_threads()}
        np.savez(path, window=got["window"], clip=got["clip"], meta=np.array(json.dumps(meta)))
    return {**got, "from_cache": False}


def cross_validate(features: np.ndarray, samples: Sequence[Sample],
                        folds: Sequence[dict[str, list[str]]]) -> tuple[list[float], dict[str, float], list[float]]:
    """(accuracy per fold, clip id -> 1.0 if right, C chosen per fold) of the baselines' regression over
    `folds` (train / val / test clip ids each)."""
    row = {s.id: i for i, s in enumerate(samples)}
    label = {s.id: int(s.label) for s in samples}
    num_classes = max(label.values()) + 1
    accuracies, correct, chosen = [], {}, []
    for split in folds:
        x = {part: features[[row[i] for i in ids]] for part, ids in split.items()}
        y = {part: np.array([label[i] for i in ids]) for part, ids in split.items()}
        probabilities, C, _ = logistic_regression(x, y, num_classes, fit_on=("train", "val"))
        right = probabilities.argmax(axis=1) == y["test"]
        accuracies.append(float(right.mean()))
        correct |= dict(zip(split["test"], right.astype(float)))
        chosen.append(C)
    return accuracies, correct, chosen


def versus(mine: tuple[dict[str, float], list[float]], reference: tuple[dict[str, float], list[float]],
           samples: Sequence[Sample]) -> dict[str, Any]:
    """Accuracy minus the reference's: paired by clip (mean, 95% bootstrap interval) and by fold."""
    ids = [s.id for s in samples]
    by_clip = paired_difference(np.array([mine[0][i] for i in ids]), np.array([reference[0][i] for i in ids]))
    by_fold = np.subtract(mine[1], reference[1])
    return {"by_clip": list(by_clip), "by_fold_mean": float(by_fold.mean()), "by_fold_std": float(by_fold.std(ddof=1)),
            "folds": {"above": int((by_fold > 1e-9).sum()), "equal": int((abs(by_fold) <= 1e-9).sum()),
                      "below": int((by_fold < -1e-9).sum())}}


def difference_text(delta: dict[str, Any] | None) -> str:
    if delta is None:
        return "(reference)"
    mean, low, high = (100 * v for v in delta["by_clip"])
    return f"{mean:+.1f} ({low:+.1f} to {high:+.1f})"


def percent(values: Sequence[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def padding_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as one Markdown table (this script's .md and the docs' results page, `results_tables.py`)."""
    folds = rows[0]["folds"]
    lines = [f"| backbone | padding | Acc % (mean ± std, {folds} folds) "
             "| Δ vs clip length, points (95% CI, paired by clip) "
             "| folds above / equal / below | Acc % pooled over the clip's own frames; Δ vs clip length | encoding s "
             "| clips/s | frames per clip |", "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        padding = "clip length" if r["padding_seconds"] == 0 else f"{r['padding_seconds']:g} s"
        if r.get("skipped"):
            lines.append(f"| {r['backbone']} | {padding} | skipped: {r['clips_per_s']:.2f} clips/s over "
                         f"{r['clips_timed']} clips projects {r['projected_seconds']:.0f} s | | | | | "
                         f"{r['clips_per_s']:.2f} | |")
            continue
        delta, own = r.get("minus_clip_length"), r.get("clip_frames_minus_clip_length")
        folds_text = "" if delta is None else "{above} / {equal} / {below}".format(**delta["folds"])
        own_text = "" if own is None else f"; {difference_text(own)}"
        lines.append(f"| {r['backbone']} | {padding} | {percent(r['accuracy_per_fold'])} | {difference_text(delta)} "
                     f"| {folds_text} | {percent(r['accuracy_clip_frames_per_fold'])}{own_text} "
                     f"| {r['extraction_seconds']:.0f} | {r['clips_per_s']:.2f} | {r['mean_frames']:.0f} |")
    return "\n".join(lines) + "\n"


def markdown(rows: Sequence[dict[str, Any]], command: str, header: str, protocol: str) -> str:
    lines = ["### Whisper padding on RAVDESS: each clip's own frames, padded to 4 s, padded to Whisper's 30 s window",
             "", "Made with:", "", "```", command, "```", "", header, "", padding_table(rows).rstrip("\n")]
    lines += ["", "Features: the last layer of the packaged Whisper (`WhisperFrontEnd`, as mm-lstm's "
              "`audio_padding_seconds` pads), mean and std over every frame it returns (the padded silence "
              "included); the column \"pooled over the clip's own frames\" pools the same encoding over the frames "
              "of the clip's own length only. Regression: `emofuse.core.apps.baselines.logistic_regression` "
              "(standardised, C in {0.001, 0.01, 0.1, 1} chosen on the 2 validation actors, refit on train + "
              f"validation), {protocol}. Encoding seconds: the front end "
              "alone, clips decoded beforehand; rows read from the feature cache report the seconds measured when "
              "they were extracted."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="whisper,whisper-base", help="packaged Whisper names, comma-separated")
    p.add_argument("--paddings", default="0,4,30", help="audio_padding_seconds values, comma-separated")
    p.add_argument("--data", type=Path, default=None, help="folder holding the corpora (default ../shared/data)")
    p.add_argument("--folds", type=int, default=0, help="actor folds (`speaker_folds`); 0: leave one actor out")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip a configuration projected to encode longer")
    p.add_argument("--probe", type=int, default=24, help="clips timed before projecting a configuration's time")
    p.add_argument("--cache", type=Path, default=Path("/tmp/emofuse-whisper-padding"))
    p.add_argument("--out", type=Path, default=RESULTS / "whisper_padding.json", help="the .json; the .md beside it")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    paddings = [float(x) for x in args.paddings.split(",") if x.strip()]
    samples = ravdess_samples(args.data)
    actors = len({s.speaker for s in samples})
    folds = speaker_folds(samples, args.folds or actors, val_speakers=2)
    protocol = (f"leave one actor out (`speaker_folds`, {len(folds)} folds)" if len(folds) == actors else
                f"{len(folds)} folds of contiguous actors (`speaker_folds`)")
    load = os.getloadavg()
    command = "nice -n 19 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_whisper_padding.py"
    command += (" " + shlex.join(argv)) if argv else ""
    header = (f"{len(samples)} RAVDESS clips, actors 1-{actors}, {protocol}; {os.cpu_count()} cores, torch threads "
              f"{args.threads}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the start.")

    waves: dict[str, np.ndarray] = {}

    def waves_of() -> dict[str, np.ndarray]:  # decoded once, only when some configuration is not cached
        if not waves:
            waves.update({s.id: decode_audio(s.audio_path) for s in samples})
        return waves

    rows: list[dict[str, Any]] = []
    reference: dict[str, dict[str, float]] = {}
    for backbone in backbones:
        for padding in sorted(paddings):
            got = load_or_extract(args.cache, backbone, padding, samples, waves_of, budget_s=args.budget_s,
                                  probe=args.probe)
            row: dict[str, Any] = {"backbone": backbone, "padding_seconds": padding, "n_clips": len(samples),
                                   "folds": len(folds), "threads": args.threads}
            if got["skipped"]:
                rows.append(row | {k: got[k] for k in ("skipped", "clips_timed", "seconds_timed", "clips_per_s",
                                                       "projected_seconds")} | {"accuracy_mean": None})
                continue
            accuracies, correct, chosen = cross_validate(got["window"], samples, folds)
            clip_accuracies, clip_correct, _ = cross_validate(got["clip"], samples, folds)
            row |= {"accuracy_mean": float(np.mean(accuracies)), "accuracy_std": float(np.std(accuracies, ddof=1)),
                    "accuracy_per_fold": accuracies, "C_per_fold": chosen,
                    "accuracy_clip_frames_mean": float(np.mean(clip_accuracies)),
                    "accuracy_clip_frames_per_fold": clip_accuracies,
                    "extraction_seconds": float(got["seconds"]), "clips_per_s": float(got["clips_per_s"]),
                    "mean_frames": float(got["mean_frames"]), "from_cache": got["from_cache"]}
            if padding == 0:
                reference[backbone] = (correct, accuracies)
            elif backbone in reference:
                row["minus_clip_length"] = versus((correct, accuracies), reference[backbone], samples)
                row["clip_frames_minus_clip_length"] = versus((clip_correct, clip_accuracies), reference[backbone],
                                                              samples)
            rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, command, header, protocol))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
