"""The packaged Whisper tiny.en on real RAVDESS clips: feature speed against eGeMAPS, the clip's own frames
against Whisper's 30 s padded window (speed and accuracy), and transcription (word error rate, speed).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_whisper.py --threads 2 [--parts speed,padding,transcription] \\
        [--speed-clips 96] [--transcribe-clips 120] [--markdown benchmarks/results/whisper.md]

1. Feature extraction, clips/s, the same clips decoded beforehand (decoding is not counted): eGeMAPS
   low-level descriptors (openSMILE), the 64-band log-mel front end, the Whisper encoder over the clip's
   own frames (every layer, as `mm-lstm` caches them), and over the 30 s padded window.
2. Own frames vs padded: scikit-learn logistic regression on mean+std of the last layer, the reference
   table's 4 actor folds (fit on train+val actors), all 720 clips, once per encoding.
3. Transcription: greedy decoding of `--transcribe-clips` clips spread over every actor, emotion and
   statement; word error rate against the RAVDESS statement (lower case, no punctuation), and clips/s,
   with this project's PyTorch port and with the ctranslate2 runtime when it is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from emofuse.core.data.decode import decode_audio  # noqa: E402
from emofuse.core.types import Sample  # noqa: E402

def spread(samples: Sequence[Sample], n: int) -> list[Sample]:
    """`n` clips evenly spaced over the sorted list (every actor, emotion and statement appear)."""
    ordered = sorted(samples, key=lambda s: s.id)
    step = max(1, len(ordered) // n)
    return ordered[::step][:n]


def rate(fn: Callable[[np.ndarray], object], waves: Sequence[np.ndarray]) -> float:
    fn(waves[0])  # warm-up (first-call allocations)
    start = time.perf_counter()
    for w in waves:
        fn(w)
    return len(waves) / (time.perf_counter() - start)


def feature_speed(waves: Sequence[np.ndarray]) -> dict[str, float]:
    from emofuse.plugins.encoders.audio_backbone import EgemapsFrontEnd, LogMelFrontEnd, WhisperFrontEnd

    whisper = WhisperFrontEnd().eval()
    encoder, mel = whisper.encoder, whisper.mel
    fronts = {"egemaps": EgemapsFrontEnd(), "log-mel": LogMelFrontEnd(), "whisper (own frames, 5 layers)": whisper}
    out = {}
    with torch.no_grad():
        for name, front in fronts.items():
            out[name] = rate(lambda w, f=front: f([torch.from_numpy(w)]), waves)
        out["whisper (30 s padded window)"] = rate(lambda w: encoder(mel(torch.from_numpy(w), pad_to_chunk=True)[None]), waves)
    return out


def last_layer_statistics(samples: Sequence[Sample], *, padded: bool) -> dict[str, np.ndarray]:
    """Mean+std of the last layer over the clip's own frames, encoded alone or inside the padded 30 s window."""
    from emofuse.plugins.encoders.whisper import WhisperLogMel, packaged_whisper

    encoder, mel = packaged_whisper().encoder, WhisperLogMel()
    out = {}
    with torch.no_grad():
        for s in samples:
            wav = torch.from_numpy(decode_audio(s.audio_path))
            frames = (mel(wav).shape[1] + 1) // 2
            last = encoder(mel(wav, pad_to_chunk=padded)[None])[-1][0, :frames].double()
            out[s.id] = torch.cat([last.mean(0), last.std(0, unbiased=False)]).numpy()
    return out


def padding_accuracy(samples: Sequence[Sample]) -> dict[str, list[float]]:
    """Accuracy on each of 4 folds of actors (scikit-learn GroupKFold) of a standardised logistic regression
    on own-frame and padded-window features: the same folds and model for both."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.array([s.label for s in samples])
    groups = np.array([s.speaker for s in samples])
    out = {}
    for name, padded in (("own frames", False), ("30 s padded window", True)):
        feats = last_layer_statistics(samples, padded=padded)
        x = np.stack([feats[s.id] for s in samples])
        scores = []
        for train, test in GroupKFold(n_splits=4).split(x, labels, groups):
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            scores.append(float(model.fit(x[train], labels[train]).score(x[test], labels[test])))
        out[name] = scores
    return out


def ravdess_samples() -> list[Sample]:
    """The labelled RAVDESS speech clips of the shared data (the `ravdess` reader's defaults)."""
    from emofuse.core.config import DataConfig
    from emofuse.core.engine.compose import build_reader

    return [s for s in build_reader(DataConfig(dataset="ravdess")).samples() if s.label is not None]


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


def transcription(samples: Sequence[Sample], waves: Sequence[np.ndarray]) -> dict[str, dict[str, object]]:
    import jiwer

    from emofuse.plugins.transcription import transcriber

    truth = [normalise(s.text or "") for s in samples]  # the reader's RAVDESS statement
    model = transcriber()
    runs: dict[str, Callable[[np.ndarray], str]] = {"PyTorch port (emofuse)": model}
    try:
        import ctranslate2
        from transformers import WhisperFeatureExtractor

        runtime = ctranslate2.models.Whisper(str(model.weights.folder), device="cpu", compute_type="float32",
                                             intra_threads=torch.get_num_threads())
        features = WhisperFeatureExtractor()

        def with_ctranslate2(w: np.ndarray) -> str:
            mel = features(w, sampling_rate=16_000, return_tensors="np").input_features.astype(np.float32)
            result = runtime.generate(ctranslate2.StorageView.from_array(mel), [[50257, 50362]], beam_size=1)
            return model.tokenizer.decode(result[0].sequences_ids[0], skip_special_tokens=True).strip()

        runs["ctranslate2 runtime (float32)"] = with_ctranslate2
    except ImportError:
        pass
    out = {}
    for name, fn in runs.items():
        fn(waves[0])  # warm-up
        start = time.perf_counter()
        texts = [fn(w) for w in waves]
        seconds = time.perf_counter() - start
        hyp = [normalise(t) for t in texts]
        out[name] = {"wer": jiwer.wer(truth, hyp), "exact": sum(h == t for h, t in zip(hyp, truth)) / len(truth),
                     "clips_per_s": len(waves) / seconds,
                     "errors": sorted({t for t, h, r in zip(texts, hyp, truth) if h != r})[:8]}
    return out


PARTS = ("speed", "padding", "transcription")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run: {', '.join(PARTS)}")
    p.add_argument("--speed-clips", type=int, default=96)
    p.add_argument("--transcribe-clips", type=int, default=120)
    p.add_argument("--markdown", type=Path, default=Path(__file__).resolve().parent / "results" / "whisper.md")
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or parts - set(PARTS):
        p.error(f"--parts: choose from {', '.join(PARTS)}")
    torch.set_num_threads(args.threads)
    samples = ravdess_samples()
    load = os.getloadavg()
    command = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_whisper.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["### Whisper tiny.en on RAVDESS (packaged, offline)", "", "Made with:", "", "```", command, "```", "",
             f"{os.cpu_count()} cores, torch threads {args.threads}, load average {load[0]:.1f} {load[1]:.1f} "
             f"{load[2]:.1f} at the start."]
    results: dict[str, object] = {"command": command}

    if "speed" in parts:
        speed_waves = [decode_audio(s.audio_path) for s in spread(samples, args.speed_clips)]
        seconds = sum(len(w) for w in speed_waves) / 16_000 / len(speed_waves)
        speeds = results["feature_clips_per_s"] = feature_speed(speed_waves)
        own, padded = speeds["whisper (own frames, 5 layers)"], speeds["whisper (30 s padded window)"]
        lines += ["", f"**Feature extraction** ({len(speed_waves)} clips, {seconds:.1f} s long on average, decoded "
                      "beforehand):", "", "| front end | clips/s |", "|:---|---:|"]
        lines += [f"| {name} | {v:.1f} |" for name, v in speeds.items()]
        lines += ["", f"Encoding only the clip's own frames is {own / padded:.1f}x faster than the 30 s padded window."]
    if "padding" in parts:
        padding = results["padding_accuracy"] = padding_accuracy(samples)
        lines += ["", "**Own frames vs padded window, accuracy** (logistic regression on mean+std of the last layer, "
                      "4 folds of actors, all 720 clips):", "",
                  "| encoding | Acc % (mean ± std over folds) | per fold |", "|:---|---:|:---|"]
        lines += [f"| {name} | {100 * np.mean(a):.1f} ± {100 * np.std(a, ddof=1):.1f} | "
                  + ", ".join(f"{100 * x:.1f}" for x in a) + " |" for name, a in padding.items()]
        diff = np.subtract(padding["own frames"], padding["30 s padded window"])
        lines += ["", f"Own frames minus padded window, paired by fold: {100 * diff.mean():+.1f} ± "
                      f"{100 * diff.std(ddof=1):.1f} points."]
    if "transcription" in parts:
        clips = spread(samples, args.transcribe_clips)
        transcripts = results["transcription"] = transcription(clips, [decode_audio(s.audio_path) for s in clips])
        lines += ["", f"**Transcription** ({len(clips)} clips over every actor, emotion and statement; greedy "
                      "decoding, 30 s padded window, WER against the RAVDESS statement text, lower case without "
                      "punctuation):", "", "| decoder | WER % | clips transcribed exactly % | clips/s |",
                  "|:---|---:|---:|---:|"]
        lines += [f"| {name} | {100 * r['wer']:.1f} | {100 * r['exact']:.1f} | {r['clips_per_s']:.2f} |"
                  for name, r in transcripts.items()]
        first = next(iter(transcripts.values()))
        if first["errors"]:
            lines += ["", "Some wrong transcripts: " + "; ".join(f'"{e}"' for e in first["errors"]) + "."]
    text = "\n".join(lines) + "\n"
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text)
    args.markdown.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
