"""Reproduce the reference report's comparison table on real RAVDESS data, and say where fusion helps.

Branches (the ``ravdess-reference`` preset): ``video`` = the ``features`` encoder over the clip's
facial action units (the AU table in ``../shared/data``), ``audio_text`` = the ``mm-lstm`` encoder
over the speech recording and its statement text. Every registered fusion (or ``--fusions``) is
trained over the same frozen branches, per seed, and each branch is also scored alone; robustness
columns score every model with one modality removed at test time.

Two protocols:

- ``split`` (default): one speaker-independent train/val/test split of actors 1-12, several seeds.
- ``actor-cv``: cross-validation with folds over actors (``--folds 4``: actors 1-3, 4-6, 7-9, 10-12
  held out in turn; two further actors validate, the rest train), the protocol of the baselines
  the project must beat (grouped CV by actor, 8 classes: eGeMAPS alone 47.2%, AUs alone 58.3%, both
  concatenated in one logistic regression 71.7%, averaged probabilities 67.9%). ``--baselines``
  recomputes those four logistic-regression baselines on exactly the same folds/split, so the
  comparison is like for like rather than against numbers measured elsewhere.

The baselines are fit twice: on train+val actors (as the reported figures were: every non-test actor
trains) and on the train actors only (the clips the models learn from; their validation actors only
pick the epoch). Each model is then paired, fold by fold, with the baseline that reads the same inputs
(AUs -> AU baseline, audio -> eGeMAPS, both -> concatenated and averaged), so the margin's spread is
not swamped by how hard each fold's actors are for everyone.

Finished branch and fusion runs are reused by fingerprint, so rerunning a command after a crash (or
after ``--only-fold`` runs) trains only what is missing. The Markdown written to ``--markdown`` starts
with the exact command that made it.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference_table.py --seeds 0,1,2 --baselines
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference_table.py --protocol actor-cv --folds 4 --seeds 0 --baselines \
        --set branches.audio_text.audio_backbone=egemaps --set fusion_inputs=out-of-fold --set fusion_folds=3 --threads 1
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from emofuse.core.apps.compare import ComparisonResult, compare, comparison_columns  # noqa: E402
from emofuse.core.engine.compose import build_reader  # noqa: E402
from emofuse.core.config import RunConfig  # noqa: E402
from emofuse.core.data.splits import save_split  # noqa: E402
from emofuse.core.presets import compose_config  # noqa: E402
from emofuse.core.apps.report import Column, markdown_table, write_json, write_text  # noqa: E402
from emofuse.core.types import Sample  # noqa: E402

PRESET = "ravdess-reference"
ROOT = Path(__file__).resolve().parents[1]
#: The baselines the project must beat, as reported for grouped CV by actor on actors 1-12 (8 classes);
#: the Whisper ones (tiny.en encoder, mean+std pooled last layer) for leave-one-actor-out.
REPORTED_BASELINES = {"egemaps": 0.472, "au": 0.583, "concat": 0.717, "average": 0.679,
                      "whisper": 0.692, "concat-whisper": 0.807, "average-whisper": 0.750}
BASELINE_TITLES = {
    "au": "baseline: AUs, logistic regression",
    "egemaps": "baseline: eGeMAPS, logistic regression",
    "concat": "baseline: AUs + eGeMAPS concatenated, logistic regression",
    "average": "baseline: averaged probabilities of the two",
    "whisper": "baseline: Whisper encoder, logistic regression",
    "concat-whisper": "baseline: AUs + Whisper concatenated, logistic regression",
    "average-whisper": "baseline: averaged probabilities of AUs and Whisper",
}
#: Audio features a baseline can read: eGeMAPS functionals (always), Whisper statistics (``--audio-baselines``).
AUDIO_BASELINES = ("egemaps", "whisper")


def concat_kind(audio: str) -> str:
    return "concat" if audio == "egemaps" else f"concat-{audio}"


def average_kind(audio: str) -> str:
    return "average" if audio == "egemaps" else f"average-{audio}"

log = logging.getLogger("emofuse.benchmark")


# --- configuration -------------------------------------------------------------------------------------
def base_config(data_dir: Path | None, sets: Sequence[str], out: Path) -> RunConfig:
    overrides: dict[str, Any] = {"output_dir": str(out)}
    if data_dir is not None:
        overrides["data"] = {"data_dir": str(data_dir)}
    return compose_config(preset=PRESET, overrides=overrides, sets=list(sets))


def corpus_samples(config: RunConfig) -> list[Sample]:
    reader = build_reader(config.data)
    return [s for s in reader.samples() if s.label is not None]


def actor_folds(samples: Sequence[Sample], folds: int) -> list[dict[str, list[str]]]:
    """Contiguous groups of actors held out in turn (mixed sexes: odd actors are male, even female);
    the next two actors after the held-out group validate, the others train."""
    actors = sorted({s.speaker for s in samples if s.speaker})
    if not 2 <= folds <= len(actors) or len(actors) - len(actors) // folds - 2 < 1:
        raise SystemExit(f"--folds must be between 2 and {len(actors)} for {len(actors)} actors "
                         "(each fold keeps two validation actors and at least one training actor)")
    groups = [list(g) for g in np.array_split(actors, folds)]
    out = []
    for k, test_actors in enumerate(groups):
        rest = [a for a in actors if a not in test_actors]
        start = actors.index(test_actors[-1]) + 1
        ordered = [a for a in actors[start:] + actors[:start] if a in rest]
        val_actors = ordered[:2]
        role = {a: "test" for a in test_actors} | {a: "val" for a in val_actors}
        split = {"train": [], "val": [], "test": []}
        for s in samples:
            split[role.get(s.speaker, "train")].append(s.id)
        out.append(split)
    return out


# --- logistic-regression baselines --------------------------------------------------------------------
def egemaps_functionals(samples: Sequence[Sample], cache: Path) -> dict[str, np.ndarray]:
    """The 88 eGeMAPS v02 functionals of each clip's speech (openSMILE), cached as JSON."""
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if all(s.id in stored for s in samples):
            return {k: np.asarray(v, dtype=np.float64) for k, v in stored.items()}
    import opensmile

    from emofuse.core.data.decode import SAMPLE_RATE, decode_audio

    smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=opensmile.FeatureLevel.Functionals)
    out = {}
    for i, s in enumerate(samples):
        signal = decode_audio(s.audio_path)
        out[s.id] = smile.process_signal(signal, SAMPLE_RATE).to_numpy().reshape(-1)
        if (i + 1) % 100 == 0:
            log.info("eGeMAPS: %d/%d clips", i + 1, len(samples))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({k: v.tolist() for k, v in out.items()}))
    return out


def whisper_functionals(samples: Sequence[Sample], cache: Path) -> dict[str, np.ndarray]:
    """Mean and standard deviation over time of the packaged Whisper encoder's last layer (the clip's own
    frames), 768 values per clip, cached as JSON: the figures-to-beat's Whisper features."""
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if all(s.id in stored for s in samples):
            return {k: np.asarray(v, dtype=np.float64) for k, v in stored.items()}
    import torch

    from emofuse.core.data.decode import decode_audio
    from emofuse.plugins.encoders.audio_backbone import WhisperFrontEnd

    front = WhisperFrontEnd(all_layers=False).eval()
    out = {}
    with torch.no_grad():
        for i, s in enumerate(samples):
            frames = front([torch.from_numpy(decode_audio(s.audio_path))])[0].double()
            out[s.id] = torch.cat([frames.mean(0), frames.std(0, unbiased=False)]).numpy()
            if (i + 1) % 100 == 0:
                log.info("Whisper: %d/%d clips", i + 1, len(samples))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({k: v.tolist() for k, v in out.items()}))
    return out


AUDIO_FEATURE_MAKERS = {"egemaps": egemaps_functionals, "whisper": whisper_functionals}


def audio_baseline_features(samples: Sequence[Sample], names: Sequence[str], cache_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Each named audio feature set (``AUDIO_BASELINES``) of every clip, cached under `cache_dir`."""
    return {name: AUDIO_FEATURE_MAKERS[name](samples, cache_dir / f"{name}-functionals.json") for name in names}


#: Which clips a baseline learns from: all non-test actors (as the reported figures were made), or only
#: the actors the toolkit's models train on (their validation actors only choose epochs).
FIT_ON = {"train+val": ("train", "val"), "train": ("train",)}


def baseline_scores(samples: Sequence[Sample], split: dict[str, list[str]], audio: dict[str, dict[str, np.ndarray]],
                    num_classes: int, *, fit_on: Sequence[str] = ("train", "val")) -> dict[str, dict[str, float]]:
    """Accuracy/F1s of the logistic-regression baselines trained on the `fit_on` splits, scored on test: AUs,
    and per audio feature set in `audio` (name -> clip id -> vector) the audio alone, both concatenated,
    and the two models' averaged probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import torch

    from emofuse.core.engine.metrics import classification_metrics

    by_id = {s.id: s for s in samples}
    fit_ids = [i for part in fit_on for i in split[part]]
    test_ids = split["test"]

    def matrix(ids, parts):
        au = lambda i: np.asarray(by_id[i].features["au"], dtype=np.float64).reshape(-1)  # noqa: E731
        return np.stack([np.concatenate([au(i) if part == "au" else audio[part][i] for part in parts]) for i in ids])

    y_fit = np.array([by_id[i].label for i in fit_ids])
    y_test = torch.tensor([by_id[i].label for i in test_ids])
    probs = {}
    inputs = {"au": ("au",)} | {kind: parts for name in audio
                                 for kind, parts in ((name, (name,)), (concat_kind(name), ("au", name)))}
    for kind, parts in inputs.items():
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        model.fit(matrix(fit_ids, parts), y_fit)
        p = np.zeros((len(test_ids), num_classes))
        p[:, model.classes_] = model.predict_proba(matrix(test_ids, parts))
        probs[kind] = p
    for name in audio:
        probs[average_kind(name)] = (probs["au"] + probs[name]) / 2
    return {k: classification_metrics(y_test, torch.from_numpy(p), num_classes) for k, p in probs.items()}


def baseline_runs(samples: Sequence[Sample], splits: Sequence[dict[str, list[str]]],
                  audio: dict[str, dict[str, np.ndarray]], num_classes: int) -> dict[str, list[dict[str, dict[str, float]]]]:
    """Per fit set (``FIT_ON``), the baselines' scores on each split's test clips, in split order."""
    return {name: [baseline_scores(samples, split, audio, num_classes, fit_on=parts) for split in splits]
            for name, parts in FIT_ON.items()}


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def baseline_rows(per_run: Sequence[dict[str, dict[str, float]]],
                  train_only: Sequence[dict[str, dict[str, float]]] | None = None) -> list[dict[str, Any]]:
    """One row per baseline: mean ± std over runs of the train+val fit, and the train-only fit's accuracy."""
    rows = []
    for kind in per_run[0]:
        row: dict[str, Any] = {"key": f"baseline:{kind}", "kind_of_baseline": kind, "model": BASELINE_TITLES[kind],
                               "short": BASELINE_TITLES[kind].removeprefix("baseline: "),
                               "reported_accuracy": REPORTED_BASELINES[kind],
                               "modalities": "features" if kind == "au" else
                               "audio" if kind in AUDIO_BASELINES else "audio+features"}
        for metric in ("accuracy", "macro_f1", "weighted_f1", "uar"):
            row[metric], row[f"{metric}_std"] = _mean_std([r[kind][metric] for r in per_run])
        if train_only:
            for metric in ("accuracy", "macro_f1"):
                row[f"{metric}_train_only"], row[f"{metric}_train_only_std"] = _mean_std(
                    [r[kind][metric] for r in train_only])
        rows.append(row)
    return rows


BASELINE_COLUMNS = [
    Column("model", "Baseline (same clips)", justify="left"),
    Column("accuracy", "Acc %", ".1f", std_key="accuracy_std", pct=True),
    Column("macro_f1", "Macro F1 %", ".1f", std_key="macro_f1_std", pct=True),
    Column("weighted_f1", "Weighted F1 %", ".1f", std_key="weighted_f1_std", pct=True),
    Column("uar", "UA %", ".1f", std_key="uar_std", pct=True),
    Column("accuracy_train_only", "Acc % fit on train actors only", ".1f", std_key="accuracy_train_only_std", pct=True),
    Column("reported_accuracy", "Reported acc % (grouped CV, elsewhere)", ".1f", pct=True),
]


# --- each model against the baseline that sees the same modalities ------------------------------------
def matching_baselines(modalities: str, audio: Sequence[str] = ("egemaps",)) -> list[str]:
    """The baselines a model is to beat, by what it reads: AUs (features) alone -> the AU baseline, audio
    alone -> each audio baseline (eGeMAPS, Whisper), both -> the concatenated and the averaged baselines."""
    mods = set(modalities.split("+"))
    if "audio" in mods and "features" in mods:
        return [kind for name in audio for kind in (concat_kind(name), average_kind(name))]
    if "features" in mods:
        return ["au"]
    if "audio" in mods:
        return list(audio)
    return []


def versus_baselines(per_fold_rows: Sequence[Sequence[dict[str, Any]]],
                     baseline_runs_by_fit: dict[str, Sequence[dict[str, dict[str, float]]]]) -> list[dict[str, Any]]:
    """Paired accuracy differences, fold by fold, between each model and its matching baselines.

    `per_fold_rows[k]` are fold k's model rows (seed means); `baseline_runs_by_fit[fit][k]` the same
    fold's baseline scores. Pairing by fold removes the fold-to-fold spread that both sides share
    (some actors are harder for every model), so ``diff_std`` says how steady the margin is.
    """
    out = []
    first_run = next(iter(baseline_runs_by_fit.values()))[0]
    audio = [name for name in AUDIO_BASELINES if name in first_run]
    keys = list(dict.fromkeys(r["key"] for rows in per_fold_rows for r in rows))
    for key in keys:
        # folds where this model exists (a fusion that failed in one fold is paired on the others)
        present = {k: r for k, rows in enumerate(per_fold_rows) for r in rows if r["key"] == key}
        fold_rows = list(present.values())
        first = fold_rows[0]
        for kind in matching_baselines(first.get("modalities", ""), audio):
            row: dict[str, Any] = {"key": key, "model": first["model"], "baseline": BASELINE_TITLES[kind].removeprefix(
                "baseline: "), "baseline_kind": kind}
            row["accuracy"], row["accuracy_std"] = _mean_std([r["accuracy"] for r in fold_rows])
            for fit, runs in baseline_runs_by_fit.items():
                suffix = "" if fit == "train+val" else "_train_only"
                base = [runs[k][kind]["accuracy"] for k in present]
                diffs = [r["accuracy"] - b for r, b in zip(fold_rows, base)]
                row[f"baseline_accuracy{suffix}"] = float(np.mean(base))
                row[f"diff{suffix}"], row[f"diff{suffix}_std"] = _mean_std(diffs)
                row[f"folds_won{suffix}"] = f"{sum(d > 0 for d in diffs)}/{len(diffs)}"
                std = row[f"diff{suffix}_std"]
                row[f"diff{suffix}_text"] = f"{100 * row[f'diff{suffix}']:+.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
            out.append(row)
    out.sort(key=lambda r: -r.get("diff", 0.0))
    return out


VERSUS_COLUMNS = [
    Column("model", "Model", justify="left"),
    Column("accuracy", "Acc %", ".1f", std_key="accuracy_std", pct=True),
    Column("baseline", "Baseline to beat", justify="left"),
    Column("baseline_accuracy", "Baseline acc % (fit on train+val)", ".1f", pct=True),
    Column("diff_text", "Δ points (paired by fold)"),
    Column("folds_won", "Folds won", justify="right"),
    Column("baseline_accuracy_train_only", "Baseline acc % (fit on train only)", ".1f", pct=True),
    Column("diff_train_only_text", "Δ points vs train-only fit"),
    Column("folds_won_train_only", "Folds won (train-only fit)", justify="right"),
]


# --- aggregation over folds -----------------------------------------------------------------------------
def over_folds(results: Sequence[ComparisonResult]) -> list[dict[str, Any]]:
    """One row per model: each fold's seed-mean, then mean and std across folds."""
    keys = [r["key"] for r in results[0].rows]
    numeric = [k for k, v in results[0].rows[0].items()
               if isinstance(v, (int, float)) and not k.endswith("_std") and k not in ("rank", "seeds")]
    rows = []
    for key in keys:
        fold_rows = [next(r for r in res.rows if r["key"] == key) for res in results if any(r["key"] == key for r in res.rows)]
        row = {k: fold_rows[0][k] for k in ("key", "model", "kind", "component", "modalities")}
        row["folds"] = len(fold_rows)
        for k in numeric:
            values = [r[k] for r in fold_rows if r.get(k) is not None]
            if not values:
                continue
            row[k] = float(np.mean(values))
            row[f"{k}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        for k in ("trainable_parameters", "total_parameters", "checkpoint_bytes", "test_clips"):
            if k in row:
                row[k] = int(round(row[k]))
        rows.append(row)
    rows.sort(key=lambda r: (-r.get("accuracy", -1), -r.get("macro_f1", -1)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


# --- the honest summary ----------------------------------------------------------------------------------
def findings(rows: Sequence[dict[str, Any]], ablations: Sequence[str], baselines: Sequence[dict[str, Any]] | None,
             spread: str, versus: Sequence[dict[str, Any]] | None = None) -> list[str]:
    """Plain sentences computed from the table: does fusion beat the best branch, by how much, when not."""
    def pct(v):
        return f"{100 * v:.1f}%"

    def pm(row, key="accuracy"):
        std = row.get(f"{key}_std")
        return pct(row[key]) + (f" ± {100 * std:.1f}" if std is not None else "")

    branches = [r for r in rows if r["kind"] == "branch"]
    fusions = [r for r in rows if r["kind"] == "fusion"]
    out = []
    if not branches or not fusions:
        return out
    best_branch = max(branches, key=lambda r: r["accuracy"])
    best_fusion = max(fusions, key=lambda r: r["accuracy"])
    gap = best_fusion["accuracy"] - best_branch["accuracy"]
    noise = max(best_fusion.get("accuracy_std") or 0, best_branch.get("accuracy_std") or 0)
    verdict = ("helps" if gap > noise else "does not clearly help" if gap > 0 else "does not help")
    out.append(f"Best fusion `{best_fusion['component']}` reaches {pm(best_fusion)} accuracy against "
               f"{pm(best_branch)} for the best single branch ({best_branch['model']}): "
               f"{100 * gap:+.1f} points, so fusion {verdict} here"
               + (f" (the gap is within one {spread} std)" if 0 < gap <= noise else "") + ".")
    beaten = [f for f in fusions if f["accuracy"] <= best_branch["accuracy"]]
    if beaten:
        out.append("Fusions no better than the best branch alone: "
                   + ", ".join(f"`{f['component']}` ({pm(f)})" for f in beaten) + ".")
    overfit = [r for r in rows if r.get("train_accuracy") is not None and r["train_accuracy"] - r["accuracy"] > 0.2]
    if overfit:
        out.append("Fits the training actors far better than unseen ones (train vs test accuracy): "
                   + ", ".join(f"{r['model']} ({pct(r['train_accuracy'])} vs {pct(r['accuracy'])})" for r in overfit)
                   + ".")
    for mod in ablations:
        key = f"accuracy_without_{mod}"
        if key in best_fusion:
            drop = best_fusion["accuracy"] - best_fusion[key]
            out.append(f"Without {mod} at test time, `{best_fusion['component']}` scores {pct(best_fusion[key])} "
                       f"({-100 * drop:+.1f} points).")
    weak = min(branches, key=lambda r: r["accuracy"])
    if weak is not best_branch:
        out.append(f"The weaker branch ({weak['model']}, {pm(weak)}) is where fusion has to find complementary "
                   f"information; each fusion's `Acc w/o` columns show what it takes from each modality.")
    if baselines:
        best_base = max(baselines, key=lambda r: r["accuracy"])
        diff = best_fusion["accuracy"] - best_base["accuracy"]
        out.append(f"The strongest logistic-regression baseline on the same clips ({best_base['short']}) scores "
                   f"{pm(best_base)}; the best fusion is {abs(100 * diff):.1f} points "
                   f"{'above' if diff > 0 else 'below'} it.")
    if versus:
        out += versus_summary(versus)
    return out


def versus_summary(versus: Sequence[dict[str, Any]]) -> list[str]:
    """One sentence per verdict (clearly above / above, not clearly / below), per fit of the baselines."""
    out = []
    for suffix, against in (("", "the baselines as reported (fit on train+val actors)"),
                            ("_train_only", "the same baselines fit on the models' training actors only")):
        if not all(f"diff{suffix}" in v for v in versus):
            continue
        groups: dict[str, list[str]] = {}
        for v in versus:
            groups.setdefault(verdict_of(v, suffix), []).append(
                f"{v['model']} vs {v['baseline']} ({v[f'diff{suffix}_text']})")
        parts = [f"{verdict}: {'; '.join(items)}" for verdict, items in groups.items()]
        out.append(f"Against {against}, paired by fold: " + ". ".join(parts) + ".")
    return out


def verdict_of(v: dict[str, Any], suffix: str = "") -> str:
    """"clearly above" when the paired margin exceeds its fold-to-fold std, else "above, not clearly" or "below"."""
    diff, std = v[f"diff{suffix}"], v.get(f"diff{suffix}_std")
    if diff > 0 and std is not None and diff > std:
        return "clearly above"
    return "above, not clearly" if diff > 0 else "below"


def command_line(argv: Sequence[str]) -> str:
    return "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference_table.py " + shlex.join(list(argv))


def render(rows, ablations, *, title: str, command: str, protocol_text: str, baselines, notes, spread: str,
           versus: Sequence[dict[str, Any]] | None = None) -> str:
    lines = [f"### {title}", "", "Made with:", "", "```", command, "```", "", protocol_text, ""]
    lines.append(markdown_table(rows, comparison_columns(ablations)))
    lines.append(f"Mean ± std over {spread}. `Acc w/o X`: the same trained model with modality X removed from "
                 "every test clip. Trainable parameters: what that row trained (a fusion's own parameters; the "
                 "branches are frozen and shared).")
    if baselines:
        lines += ["", markdown_table(baselines, BASELINE_COLUMNS)]
        lines.append("Baselines: standardised features, scikit-learn logistic regression, trained on train+val "
                     "actors and scored on the same test actors as the models above (and, in the train-only "
                     "column, trained on the models' training actors alone: the models use the validation actors "
                     "only to pick their epoch). eGeMAPS = the 88 openSMILE eGeMAPSv02 functionals of the speech "
                     "recording; Whisper = mean and std over time of the packaged Whisper tiny.en encoder's last "
                     "layer (768 values; its reported figures are for leave-one-actor-out, 11 training actors).")
    if versus:
        lines += ["", "**Each model against the baseline that reads the same inputs** (AUs: the AU baseline; "
                  "audio: eGeMAPS; both: the concatenated and the averaged baselines). Δ is the model's accuracy "
                  "minus the baseline's, fold by fold, then mean ± std over folds.", "",
                  markdown_table(versus, VERSUS_COLUMNS)]
    if notes:
        lines += ["", "**What the numbers say:**", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def baselines_only(args, argv, config: RunConfig, samples, num_classes: int, out: Path) -> int:
    """The four logistic-regression baselines alone, on the folds (or split) the models would use."""
    if args.protocol == "actor-cv":
        splits = actor_folds(samples, args.folds)
        spread = f"{args.folds} actor folds"
    else:
        from emofuse.core.data.splits import make_split

        splits = [make_split(samples, "speaker", val_fraction=config.data.val_fraction,
                             test_fraction=config.data.test_fraction, seed=config.data.split_seed)]
        spread = "one speaker-independent split"
    audio = audio_baseline_features(samples, args.audio_baselines, out.parent)
    runs = baseline_runs(samples, splits, audio, num_classes)
    rows = baseline_rows(runs["train+val"], runs["train"])
    text = "\n".join([f"### RAVDESS logistic-regression baselines ({spread})", "", "Made with:", "", "```",
                      command_line(argv), "```", "", markdown_table(rows, BASELINE_COLUMNS)])
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.markdown, text)
    write_json(args.markdown.with_suffix(".json"), {"command": command_line(argv), "baselines": rows})
    print(text)
    return 0


# --- main ------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="folder holding the corpora (default ../shared/data)")
    p.add_argument("--protocol", choices=("split", "actor-cv"), default="split")
    p.add_argument("--folds", type=int, default=4, help="actor-cv: number of folds over the 12 actors")
    p.add_argument("--only-fold", dest="only_folds", type=int, action="append", default=[],
                   help="actor-cv: run only fold K (0-based, repeatable), e.g. for a quick timing run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--fusions", default=None, help="comma-separated fusions (default: every registered one)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--baselines", action="store_true", help="also score the logistic-regression baselines")
    p.add_argument("--baselines-only", action="store_true",
                   help="only the logistic-regression baselines on the protocol's folds/split (minutes, no training)")
    p.add_argument("--audio-baselines", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                   default=["egemaps"], help=f"comma-separated audio features for the baselines: {', '.join(AUDIO_BASELINES)}")
    p.add_argument("--no-robustness", action="store_true", help="skip the modality-removed columns")
    p.add_argument("--threads", type=int, default=int(os.environ.get("EMOFUSE_THREADS", 0)) or None,
                   help="CPU threads for PyTorch (default: $EMOFUSE_THREADS, else PyTorch's choice)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reference-table")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "results" / "reference_table.md")
    args = p.parse_args(argv)
    if unknown := set(args.audio_baselines) - set(AUDIO_BASELINES):
        p.error(f"--audio-baselines: unknown {', '.join(sorted(unknown))} (choose from {', '.join(AUDIO_BASELINES)})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    fusions = [f.strip() for f in args.fusions.split(",")] if args.fusions else None
    out = args.out / args.protocol
    config = base_config(args.data, args.sets, out)
    samples = corpus_samples(config)
    num_classes = len(build_reader(config.data).label_names)
    started = time.time()

    def say(msg: str) -> None:
        log.info("%s", msg)

    if args.baselines_only:
        return baselines_only(args, argv, config, samples, num_classes, out)
    if args.protocol == "split":
        splits_for_baselines: list[dict[str, list[str]]] = []
        result = compare(config, fusions=fusions, seeds=seeds, robustness=not args.no_robustness, out_dir=out,
                         on_progress=say)
        rows, ablations = result.rows, result.ablations
        per_fold_rows = [result.rows]
        splits_for_baselines.append(json.loads((out / "split.json").read_text())["splits"])
        spread = f"{len(seeds)} seed(s)"
        sizes = result.split_sizes
        protocol_text = (f"RAVDESS speech, actors 1-12, 8 classes; one speaker-independent split "
                         f"({sizes.get('train', 0)} train / {sizes.get('val', 0)} val / {sizes.get('test', 0)} "
                         f"test clips, no actor in two splits); seeds {', '.join(map(str, seeds))}.")
        failures = result.failures
    else:
        split_dir = out / "splits"
        results = []
        all_folds = actor_folds(samples, args.folds)
        chosen = sorted(set(args.only_folds)) or list(range(args.folds))
        if any(not 0 <= k < args.folds for k in chosen):
            raise SystemExit(f"--only-fold must be between 0 and {args.folds - 1}")
        splits_for_baselines = [all_folds[k] for k in chosen]
        for k in chosen:
            split = all_folds[k]
            path = split_dir / f"fold-{k}.json"
            save_split(path, split, method="speaker", seed=0, dataset=config.data.dataset,
                       val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction)
            fold_config = config.model_copy(update={"data": config.data.model_copy(update={"split_file": path})})
            say(f"fold {k + 1}/{args.folds}: test actors "
                f"{sorted({s.speaker for s in samples if s.id in set(split['test'])})}")
            results.append(compare(fold_config, fusions=fusions, seeds=seeds, robustness=not args.no_robustness,
                                   out_dir=out / f"fold-{k}", on_progress=say))
        rows, ablations = over_folds(results), results[0].ablations
        per_fold_rows = [r.rows for r in results]
        failures = [f for r in results for f in r.failures]
        which = (f"{args.folds} actor folds" if len(chosen) == args.folds
                 else f"fold(s) {', '.join(map(str, chosen))} of {args.folds} actor folds")
        spread = f"{which} (each fold the mean of seeds {', '.join(map(str, seeds))})"
        protocol_text = (f"RAVDESS speech, actors 1-12, 8 classes; cross-validation over {args.folds} folds of "
                         f"actors (each fold: its actors test, the next two actors validate, the rest train), "
                         + ("so every clip is a test clip once." if len(chosen) == args.folds
                            else f"here only {which}, so not every clip is tested."))

    baselines = versus = None
    if args.baselines:
        audio = audio_baseline_features(samples, args.audio_baselines, out.parent)
        runs = baseline_runs(samples, splits_for_baselines, audio, num_classes)
        baselines = baseline_rows(runs["train+val"], runs["train"])
        versus = versus_baselines(per_fold_rows, runs)

    notes = findings(rows, ablations, baselines, spread, versus)
    if config.data.limit and baselines:
        notes.append(f"data.limit={config.data.limit}: the models saw a class-balanced subset of these actors' clips; "
                     "the baselines used all of them.")
    if failures:
        notes.append("Fusions that failed: " + "; ".join(f"`{f['fusion']}`: {f['error']}" for f in failures[:5]))
    minutes = (time.time() - started) / 60
    title = f"RAVDESS reference comparison ({'speaker-independent split' if args.protocol == 'split' else 'actor CV'})"
    text = render(rows, ablations, title=title, command=command_line(argv), protocol_text=protocol_text,
                  baselines=baselines, notes=notes, spread=spread, versus=versus)
    text += f"\n_{minutes:.0f} minutes on {os.cpu_count()} CPU core(s); raw numbers in `{out}/`._\n"
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.markdown, text)
    write_json(args.markdown.with_suffix(".json"), {"command": command_line(argv), "rows": rows,
                                                    "baselines": baselines, "versus_baselines": versus,
                                                    "notes": notes})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
