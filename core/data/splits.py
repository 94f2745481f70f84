"""Train/validation/test splits: speaker-independent (the default for reported numbers), class-balanced
(stratified, the reference design's 70/15/15), or the corpus' own partition; seeded, deterministic,
and written to a JSON file that later runs reuse so every run scores the same clips.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np

from emofuse.core.errors import ConfigError, DataError
from emofuse.core.types import Sample

log = logging.getLogger("emofuse.data")

SPLITS = ("train", "val", "test")
Method = Literal["speaker", "balanced", "given"]
#: Corpus partition names -> our split names.
PARTITION_NAMES = {"train": "train", "dev": "val", "val": "val", "valid": "val", "validation": "val", "test": "test"}
FORMAT = 1


def make_split(
    samples: Sequence[Sample],
    method: Method,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Sample ids per split for `method`."""
    if method == "speaker":
        return speaker_split(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if method == "balanced":
        return balanced_split(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if method == "given":
        return given_split(samples, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    raise ConfigError(f"data.split: unknown method {method!r}", hint="use speaker, balanced or given")


def speaker_split(
    samples: Sequence[Sample], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """No speaker in two splits; class counts as close to the target fractions as whole speakers allow.

    Clips without a speaker are each their own group (they cannot leak a known speaker); this is
    logged, since it weakens speaker independence if they are in fact the same people.
    """
    unknown = [s for s in samples if not s.speaker]
    if unknown:
        log.warning("%d clips have no speaker; each is treated as a speaker of its own in the split", len(unknown))
    groups = _groups(samples, lambda s: f"speaker:{s.speaker}" if s.speaker else f"clip:{s.id}")
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    if len(groups) < 3:
        raise DataError(
            "data", f"a speaker-independent split needs at least 3 speakers; this data has {len(groups)}",
            hint="set data.split = balanced (--set data.split=balanced), or add speakers",
        )
    return _assign_groups(groups, fractions, seed)


def balanced_split(
    samples: Sequence[Sample], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Stratified by class: each class contributes its share to every split (speakers may repeat)."""
    by_class: dict[int, list[str]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: s.id):
        by_class[_label(s)].append(s.id)
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {k: [] for k in SPLITS}
    for label in sorted(by_class):
        ids = list(by_class[label])
        rng.shuffle(ids)
        n_test = int(round(len(ids) * test_fraction))
        n_val = int(round(len(ids) * val_fraction))
        if n_test + n_val >= len(ids):  # tiny classes keep at least one training clip
            n_test, n_val = min(n_test, max(0, len(ids) - 1)), 0
        out["test"] += ids[:n_test]
        out["val"] += ids[n_test : n_test + n_val]
        out["train"] += ids[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


def given_split(
    samples: Sequence[Sample], *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """The corpus' own partition (``extra["partition"]``: train, dev/val, test).

    A split the corpus does not provide (MELD's test transcripts may be absent) is carved out of
    its training partition at the configured fraction of the whole corpus, by dialogue (else
    speaker) so no conversation is in two splits.
    """
    out: dict[str, list[str]] = {k: [] for k in SPLITS}
    for s in samples:
        part = str(s.extra.get("partition", "")).strip().lower()
        if part not in PARTITION_NAMES:
            raise DataError(s.source or s.id, f"partition {part!r} is not one of {', '.join(PARTITION_NAMES)}",
                            hint="fix the partition column, or --set data.split=balanced to ignore it")
        out[PARTITION_NAMES[part]].append(s.id)
    lacking = [k for k in ("val", "test") if not out[k]]
    if lacking:
        total = len(samples)
        train_ids = set(out["train"])
        pool = [s for s in samples if s.id in train_ids]
        fractions = {k: 0.0 for k in SPLITS}
        for k, f in (("val", val_fraction), ("test", test_fraction)):
            if k in lacking:
                fractions[k] = min(0.45, f * total / max(1, len(pool)))
        fractions["train"] = 1.0 - fractions["val"] - fractions["test"]
        groups = _groups(pool, lambda s: f"dialogue:{s.dialogue_id}" if s.dialogue_id
                         else (f"speaker:{s.speaker}" if s.speaker else f"clip:{s.id}"))
        carved = _assign_groups(groups, fractions, seed)
        out["train"] = carved["train"]
        for k in lacking:
            out[k] = carved[k]
        log.info("the corpus has no %s partition: carved from its training partition by dialogue",
                 " or ".join(lacking))
    return {k: sorted(v) for k, v in out.items()}


def _label(s: Sample) -> int:
    return -1 if s.label is None else int(s.label)


def _groups(samples: Iterable[Sample], key) -> dict[str, list[tuple[str, int]]]:
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for s in samples:
        groups[key(s)].append((s.id, _label(s)))
    return dict(groups)


def _assign_groups(
    groups: Mapping[str, list[tuple[str, int]]], fractions: Mapping[str, float], seed: int
) -> dict[str, list[str]]:
    """Greedy: biggest groups first (ties in seeded random order), each to the split where it most
    reduces the squared gap between per-class counts and their targets."""
    classes = sorted({label for members in groups.values() for _, label in members})
    col = {c: i for i, c in enumerate(classes)}
    totals = np.zeros(len(classes))
    vectors: dict[str, np.ndarray] = {}
    for name, members in groups.items():
        v = np.zeros(len(classes))
        for _, label in members:
            v[col[label]] += 1
        vectors[name] = v
        totals += v
    names = sorted(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(names)
    names.sort(key=lambda n: -len(groups[n]))  # stable: equal sizes keep the seeded order
    active = [k for k in SPLITS if fractions.get(k, 0) > 0]
    targets = {k: fractions[k] * totals for k in active}
    counts = {k: np.zeros(len(classes)) for k in active}
    weight = 1.0 / np.maximum(totals, 1.0)
    assigned: dict[str, list[str]] = {k: [] for k in SPLITS}
    for name in names:
        v = vectors[name]
        best = min(
            active,
            key=lambda k: float((((counts[k] + v - targets[k]) ** 2 - (counts[k] - targets[k]) ** 2) * weight).sum()),
        )
        counts[best] += v
        assigned[best].append(name)
    # Every split asked for gets at least one group, taken from the biggest split.
    for k in active:
        if not assigned[k]:
            donor = max(active, key=lambda d: len(assigned[d]))
            if len(assigned[donor]) > 1:
                smallest = min(assigned[donor], key=lambda n: (len(groups[n]), n))
                assigned[donor].remove(smallest)
                assigned[k].append(smallest)
    return {k: sorted(i for n in assigned[k] for i, _ in groups[n]) for k in SPLITS}


# -- the split file ------------------------------------------------------------------------
def speaker_folds(samples: Sequence[Sample], folds: int, *, val_speakers: int = 2) -> list[dict[str, list[str]]]:
    """Cross-validation by speaker: the sorted speakers cut into `folds` contiguous groups, each the test
    speakers once; the next `val_speakers` speakers after the group validate, the rest train. Every
    clip is a test clip exactly once, and no speaker is in two parts of a fold (RAVDESS: odd actors are
    male, even female, so contiguous groups mix both)."""
    speakers = sorted({s.speaker for s in samples if s.speaker})
    if any(not s.speaker for s in samples):
        raise DataError("data", "cross-validation by speaker needs a speaker for every clip",
                        hint="use a corpus with speaker ids, or compare without --folds")
    if not 2 <= folds <= len(speakers) or len(speakers) - -(-len(speakers) // folds) - val_speakers < 1:
        raise ConfigError(f"--folds {folds}: must be between 2 and {len(speakers)} for {len(speakers)} speakers, "
                          f"leaving {val_speakers} validation speaker(s) and at least one training speaker per fold",
                          hint="choose fewer folds")
    groups = [list(g) for g in np.array_split(np.array(speakers, dtype=object), folds)]
    out = []
    for test in groups:
        start = speakers.index(test[-1]) + 1
        rest = [a for a in speakers[start:] + speakers[:start] if a not in test]
        role = {a: "test" for a in test} | {a: "val" for a in rest[:val_speakers]}
        split: dict[str, list[str]] = {k: [] for k in SPLITS}
        for s in samples:
            split[role.get(s.speaker, "train")].append(s.id)
        out.append(split)
    return out


def save_split(path: Path, splits: Mapping[str, list[str]], *, method: str, seed: int, dataset: str,
               val_fraction: float, test_fraction: float) -> None:
    """Write the split as JSON (atomically: a crash never leaves half a split file)."""
    payload = {
        "format": FORMAT,
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "counts": {k: len(splits.get(k, [])) for k in SPLITS},
        "splits": {k: list(splits.get(k, [])) for k in SPLITS},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_split(path: Path, known_ids: Iterable[str]) -> tuple[dict[str, list[str]], dict]:
    """Read a split file; every id it names must be in the data, and no id may be in two splits."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        splits = {k: [str(i) for i in payload["splits"][k]] for k in SPLITS}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(path, f"not a valid split file ({type(exc).__name__}: {exc})",
                        hint="delete it to make a new split") from None
    known = set(known_ids)
    unknown = [i for k in SPLITS for i in splits[k] if i not in known]
    if unknown:
        raise DataError(
            path,
            f"names {len(unknown)} clip id(s) that are not in the data (e.g. {', '.join(unknown[:3])})",
            hint="the data changed since the split was made: delete the file to make a new split, "
                 "or point data.split_file at the right one",
        )
    seen = Counter(i for k in SPLITS for i in splits[k])
    twice = [i for i, n in seen.items() if n > 1]
    if twice:
        raise DataError(path, f"puts {len(twice)} clip(s) in two splits (e.g. {', '.join(twice[:3])})",
                        hint="delete the file to make a new split")
    meta = {k: v for k, v in payload.items() if k != "splits"}
    return splits, meta


def check_speaker_independent(splits: Mapping[str, list[str]], samples: Sequence[Sample], where: str | Path) -> None:
    speaker = {s.id: s.speaker for s in samples}
    owner: dict[str, str] = {}
    for k in SPLITS:
        for i in splits.get(k, []):
            spk = speaker.get(i)
            if spk is None:
                continue
            if owner.setdefault(spk, k) != k:
                raise DataError(where, f"speaker {spk!r} is in both {owner[spk]} and {k}",
                                hint="delete the split file to make a new speaker-independent split")
