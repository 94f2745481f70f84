"""Files on disk to batches: read the corpus, split it, fit the normaliser on train, and serve loaders.

`load_data` is the one entry point for training; `make_batch` builds one batch for prediction.
Before the split, every clip's media header is read: "error" names every unreadable file in one error,
"skip" leaves those clips out before the split is made. Bad clips found later, while decoding (a file
cut short, damaged inside), follow ``on_bad_sample`` too: "error" raises `DataError` naming the file
(in the main process, whichever worker decoded it); "skip" leaves the clip out of its batch and
records it in `DataBundle.skipped`, which callers list at the end of the run.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from emofuse.core.config import DataConfig
from emofuse.core.data.collate import Collator
from emofuse.core.data.decode import header_problem
from emofuse.core.data.keys import modality_keys
from emofuse.core.data.normalize import Normalizer
from emofuse.core.data.preprocess import BadSample, PreparedSample, PreprocessSpec, prepare_sample, preprocess_spec
from emofuse.core.data.readers import build_reader
from emofuse.core.data.speaker_norm import PER_SPEAKER, standardize_tables
from emofuse.core.data.splits import SPLITS, check_speaker_independent, load_split, make_split, save_split
from emofuse.core.errors import ConfigError, DataError
from emofuse.core.types import AUDIO, MODALITIES, VIDEO, Batch, Sample

log = logging.getLogger("emofuse.data")

SPLIT_FILE = "split.json"
#: Unreadable clips named one by one in the error that lists them (the rest are counted).
LISTED_BAD_CLIPS = 200


class ClipDataset(Dataset):
    """Samples of one split; item i is the decoded clip, or a `BadSample` saying what failed."""

    def __init__(self, samples: Sequence[Sample], modalities: set[str], spec: PreprocessSpec,
                 normalizer_fingerprint: str = ""):
        unknown = set(modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected some of {MODALITIES}")
        self.samples = list(samples)
        self.modalities = frozenset(modalities)
        self.spec = spec
        self.normalizer_fingerprint = normalizer_fingerprint

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> PreparedSample | BadSample:
        sample = self.samples[index]
        try:
            item = prepare_sample(sample, self.modalities, self.spec)
        except DataError as exc:
            return BadSample(sample.id, exc.path, reason_of(exc))
        item.modality_keys = modality_keys(sample, spec=self.spec, normalizer_fingerprint=self.normalizer_fingerprint)
        return item


def reason_of(exc: DataError) -> str:
    """What is wrong, without the path the error's message starts with (reports name it once, beside)."""
    return exc.message.removeprefix(f"{exc.path}: ")


class BundleLoader(DataLoader):
    """A DataLoader whose batches are checked for bad clips in the main process (raise or record)."""

    def __init__(self, dataset: ClipDataset, *, on_bad_sample: str, skipped: list[tuple[str, str]], **kwargs):
        super().__init__(dataset, **kwargs)
        self._on_bad_sample = on_bad_sample
        self._skipped = skipped

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        for out in super().__iter__():
            bad = out if isinstance(out, list) else out.extra.pop("bad", [])
            if bad:
                _handle_bad(bad, self._on_bad_sample, self._skipped)
            if isinstance(out, Batch):
                yield out


def _handle_bad(bad: Sequence[BadSample], on_bad_sample: str, skipped: list[tuple[str, str]]) -> None:
    if on_bad_sample != "skip":
        first = bad[0]
        raise DataError(first.where, first.reason,
                        hint="fix or remove the file, or pass --on-bad-sample skip to leave such clips out")
    known = {w for w, _ in skipped}
    for b in bad:
        if b.where not in known:
            log.warning("skipping %s: %s", b.where, b.reason)
            skipped.append((b.where, b.reason))
            known.add(b.where)


@dataclass
class DataBundle:
    """A corpus split three ways, with the normaliser fitted on its training split."""

    label_names: list[str]
    splits: dict[str, list[Sample]]
    normalizer: Normalizer
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dataset: str = ""
    spec: PreprocessSpec = field(default_factory=PreprocessSpec)
    #: Feature set name -> vector width (zeros fill clips that lack a set).
    feature_dims: dict[str, int] = field(default_factory=dict)
    split_method: str = ""
    split_path: Path | None = None
    on_bad_sample: Literal["error", "skip"] = "error"
    #: Corpus label -> clips left out on purpose by ``label_map``.
    excluded: dict[str, int] = field(default_factory=dict)
    #: ``data.speaker_normalization``: "per-speaker" when inputs are standardised per speaker (transductive,
    #: `emofuse.core.data.speaker_norm`): the tables already are; baselines and the feature store follow it.
    speaker_normalization: str = "none"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def class_counts(self, split: str = "train") -> torch.Tensor:
        labels = [s.label for s in self.splits[split] if s.label is not None and s.label >= 0]
        return torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=self.num_classes)

    def loader(
        self,
        split: str,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        modalities: set[str],
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> DataLoader:
        """Normalised batches of `split`, decoding only `modalities` (presence masks cover all of them)."""
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; have {', '.join(self.splits)}")
        dataset = ClipDataset(self.splits[split], set(modalities), self.spec, self.normalizer.fingerprint())
        generator = torch.Generator().manual_seed(seed)
        return BundleLoader(
            dataset,
            on_bad_sample=self.on_bad_sample,
            skipped=self.skipped,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=num_workers,
            drop_last=drop_last,
            collate_fn=Collator(frozenset(modalities), self.spec, dict(self.feature_dims), self.normalizer),
            persistent_workers=False,
            worker_init_fn=_seed_worker,
        )

    def require_input(self, modalities: Sequence[str]) -> None:
        """Clips with none of `modalities` (the branches' primary inputs: say, no feature row for a
        features run) carry nothing to learn from or score: an error naming them, or skipped and listed."""
        wanted = [m for m in dict.fromkeys(modalities) if m]
        if not wanted:
            return
        lacking = {split: [s for s in samples if not any(s.has(m) for m in wanted)]
                   for split, samples in self.splits.items()}
        bad = [s for samples in lacking.values() for s in samples]
        if not bad:
            return
        what = " or ".join(wanted)
        if self.on_bad_sample != "skip":
            raise DataError(bad[0].source or bad[0].id,
                            f"{len(bad)} clip(s) have no {what}, the input this run reads "
                            f"(e.g. {', '.join(s.source or s.id for s in bad[:3])})",
                            hint=f"give them {what}, remove them, or pass --on-bad-sample skip to leave them out")
        for split, samples in lacking.items():
            if samples:
                gone = {id(s) for s in samples}
                self.splits[split] = [s for s in self.splits[split] if id(s) not in gone]
        for s in bad:
            self.skipped.append((str(s.source or s.id), f"no {what}"))
        log.warning("left out %d clip(s) with no %s", len(bad), what)

    def skipped_report(self) -> str:
        """The clips left out in skip mode, one per line (empty when none)."""
        return skipped_report(self.skipped)


def skipped_report(skipped: Sequence[tuple[str, str]]) -> str:
    """``N sample(s) skipped as bad input:`` and one ``where: reason`` line each (empty when none)."""
    if not skipped:
        return ""
    lines = [f"{len(skipped)} sample(s) skipped as bad input:"]
    lines += [f"  {where}: {reason}" for where, reason in skipped]
    return "\n".join(lines)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def load_data(
    config: DataConfig,
    modalities: set[str],
    registry=None,
    *,
    split_dir: Path | None = None,
    split_seed: int | None = None,
    spec: PreprocessSpec | None = None,
) -> DataBundle:
    """Read, split (reusing the split file when there is one), limit, standardise feature tables per speaker
    with ``speaker_normalization = "per-speaker"`` (transductive), and fit the normaliser on train.

    `modalities` are checked against the corpus (a warning when no clip has one); decoding waits
    for the loaders. The split file is `config.split_file`, else ``split_dir/split.json``.
    """
    spec = spec or preprocess_spec(config)
    split_seed = config.split_seed if split_seed is None else split_seed
    reader = build_reader(config, registry)
    if hasattr(reader, "on_bad_sample"):
        reader.on_bad_sample = config.on_bad_sample
    samples = list(reader.samples())
    skipped = list(getattr(reader, "skipped", []))
    excluded = dict(getattr(reader, "excluded", {}))
    if excluded:
        log.info("left out on purpose by label_map: %s",
                 ", ".join(f"{n} {k}" for k, n in sorted(excluded.items())))
    samples = _check_samples(samples, config, skipped, reader.label_names)
    samples, unreadable = _check_media(samples, set(modalities), config, skipped)
    if skipped:
        where, reason = skipped[0]
        log.warning("%d sample(s) of %s left out as bad input (first: %s: %s)", len(skipped), config.dataset,
                    where, reason)
    if not samples:
        raise DataError(config.dataset, "no usable samples",
                        hint="check the corpus folder and the label set")
    for m in sorted(set(modalities)):
        if m not in MODALITIES:
            raise ConfigError(f"unknown modality {m!r}; expected some of {', '.join(MODALITIES)}")
        if not any(s.has(m) for s in samples):
            log.warning("no clip of %s has the %s modality: branches reading it will see only absences",
                        config.dataset, m)

    method = config.split
    if method == "speaker" and any("partition" in s.extra for s in samples):
        method = "given"  # the corpus' own held-out partition (MELD); see splits.given_split
    path = Path(config.split_file) if config.split_file else (Path(split_dir) / SPLIT_FILE if split_dir else None)
    by_id = {s.id: s for s in samples}
    if path is not None and path.is_file():
        ids, meta = load_split(path, [*by_id, *unreadable])
        ids = {k: [i for i in v if i in by_id] for k, v in ids.items()}  # unreadable clips left out (skip mode)
        if meta.get("method") != method:
            raise ConfigError(
                f"{path}: the split file was made with method {meta.get('method')!r}, this run asks for {method!r}",
                hint="delete the file, point data.split_file elsewhere, or set data.split to match",
            )
        left_out = len(by_id) - sum(len(v) for v in ids.values())
        if left_out:
            log.warning("%s: %d clip(s) of the data are in no split (added since it was made); they are not used",
                        path, left_out)
        log.info("reusing split %s", path)
    else:
        ids = make_split(samples, method, val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                         seed=split_seed)
        _check_split_sizes({k: len(v) for k, v in ids.items()}, len(reader.label_names), len(skipped),
                           path or config.dataset)
        if path is not None:
            save_split(path, ids, method=method, seed=split_seed, dataset=config.dataset,
                       val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    if method == "speaker":
        check_speaker_independent(ids, samples, path or "split")
    splits = {k: [by_id[i] for i in ids[k]] for k in SPLITS}
    if config.limit is not None:
        splits = _limit(splits, config.limit, split_seed)
    if not splits["train"]:
        raise DataError(path or config.dataset, "the training split is empty", hint="check the split settings")
    if config.speaker_normalization == PER_SPEAKER:  # transductive: each speaker's clips of every split
        splits = standardize_tables(splits)
    normalizer = Normalizer().fit(splits["train"])
    return DataBundle(
        label_names=list(reader.label_names),
        splits=splits,
        normalizer=normalizer,
        skipped=skipped,
        dataset=config.dataset,
        spec=spec,
        feature_dims=_feature_dims(samples),
        split_method=method,
        split_path=path,
        on_bad_sample=config.on_bad_sample,
        excluded=excluded,
        speaker_normalization=config.speaker_normalization,
    )


def _check_samples(samples: list[Sample], config: DataConfig, skipped: list[tuple[str, str]],
                   label_names: Sequence[str]) -> list[Sample]:
    """Unique ids and a label in range on every clip (training needs labels)."""
    counts = Counter(s.id for s in samples)
    dupes = [i for i, n in counts.items() if n > 1]
    if dupes:
        raise DataError(config.dataset, f"{len(dupes)} sample id(s) occur more than once (e.g. {dupes[0]!r})",
                        hint="ids must be unique within a corpus")
    out = []
    for s in samples:
        if s.label is None or not 0 <= int(s.label) < len(label_names):
            where = s.source or s.id
            reason = "has no label" if s.label is None else f"label index {s.label} is outside the label set"
            if config.on_bad_sample == "skip":
                skipped.append((str(where), reason))
                continue
            raise DataError(where, reason, hint="training needs a label on every clip")
        out.append(s)
    return out


def _check_media(samples: list[Sample], modalities: set[str], config: DataConfig,
                 skipped: list[tuple[str, str]]) -> tuple[list[Sample], list[str]]:
    """Every clip's media files checked by their headers before the split, so that the split is made over
    clips that can be read (a speaker whose clips are unreadable must not end up alone in test): one error
    listing every bad file with its reason, or (skip mode) the clips left out and listed. Returns the
    readable clips and the ids of those left out."""
    kinds = [(m, attr) for m, attr in ((AUDIO, "audio_path"), (VIDEO, "video_path")) if m in modalities]
    if not kinds:
        return samples, []
    verdicts: dict[str, str | None] = {}
    readable, bad = [], []
    for s in samples:
        wanted: dict[str, set[str]] = {}
        for modality, attr in kinds:
            if getattr(s, attr):
                wanted.setdefault(str(getattr(s, attr)), set()).add(modality)
        problems = []
        for path, mods in wanted.items():
            key = f"{path}|{','.join(sorted(mods))}"
            if key not in verdicts:
                verdicts[key] = header_problem(path, audio=AUDIO in mods, video=VIDEO in mods)
            if verdicts[key]:
                problems.append((path, verdicts[key]))
        (bad if problems else readable).append((s, problems))
    if not bad:
        return samples, []
    if config.on_bad_sample != "skip":
        listed = [f"{path} ({reason})" for _, problems in bad[:LISTED_BAD_CLIPS] for path, reason in problems]
        more = (f"; and {len(bad) - LISTED_BAD_CLIPS} more (--on-bad-sample skip lists every one)"
                if len(bad) > LISTED_BAD_CLIPS else "")
        raise DataError(config.dataset, f"{len(bad)} of {len(samples)} clips cannot be read: {'; '.join(listed)}{more}",
                        hint="fix or remove these files, or pass --on-bad-sample skip to leave them out")
    for _, problems in bad:
        skipped += [(path, reason) for path, reason in problems[:1]]
    log.warning("left out %d of %d clips whose files cannot be read, before the split", len(bad), len(samples))
    return [s for s, _ in readable], [s.id for s, _ in bad]


def _check_split_sizes(counts: dict[str, int], num_classes: int, left_out: int, where: object) -> None:
    """A new split made after bad clips were left out must not hold a validation or test split that cannot
    score a model in earnest (fewer clips than classes: a clip or two decide its accuracy, early stopping and
    the reported numbers): refused with every split's count, before the split file is written. A corpus
    small by choice is the user's call (the tables show n), an empty split is a choice (``test_fraction = 0``),
    and a run's own split file, reused, is kept (its clips that turned bad are left out and listed)."""
    small = [k for k in ("val", "test") if 0 < counts[k] < num_classes]
    if small and left_out:
        which = "the val and test splits hold" if len(small) == 2 else f"the {small[0]} split holds"
        raise DataError(where, f"{which} fewer clips than the {num_classes} classes (train {counts['train']}, "
                               f"val {counts['val']}, test {counts['test']}, after {left_out} clip(s) were left out "
                               "as bad input)",
                        hint="fix or replace the bad clips, add clips, or change data.val_fraction / data.test_fraction")


def _feature_dims(samples: Sequence[Sample]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for s in samples:
        for name, vec in s.features.items():
            d = int(np.asarray(vec).reshape(-1).shape[0])
            if dims.setdefault(name, d) != d:
                raise DataError(s.source or s.id, f"feature set {name!r} has {d} values, other clips {dims[name]}",
                                hint="every clip's feature vector must have the same length")
    return dims


def _limit(splits: dict[str, list[Sample]], limit: int, seed: int) -> dict[str, list[Sample]]:
    """At most `limit` clips in all, each split keeping its share, classes taken in turn."""
    total = sum(len(v) for v in splits.values())
    if limit >= total:
        return splits
    rng = np.random.default_rng(seed)
    out = {}
    for k, items in splits.items():
        n = min(len(items), max(1 if items else 0, int(round(limit * len(items) / total))))
        by_class: dict[int, list[Sample]] = {}
        for s in items:
            by_class.setdefault(int(s.label), []).append(s)
        queues = []
        for label in sorted(by_class):
            q = list(by_class[label])
            rng.shuffle(q)
            queues.append(q)
        picked: list[Sample] = []
        while len(picked) < n:
            for q in queues:
                if q and len(picked) < n:
                    picked.append(q.pop())
        out[k] = sorted(picked, key=lambda s: s.id)
    log.info("data.limit=%d: using %s clips", limit, ", ".join(f"{len(v)} {k}" for k, v in out.items()))
    return out


def make_batch(
    samples: list[Sample],
    modalities: set[str],
    normalizer: Normalizer | None,
    *,
    on_bad_sample: Literal["error", "skip"] = "error",
    spec: PreprocessSpec | None = None,
    feature_dims: dict[str, int] | None = None,
    num_threads: int | None = None,
) -> Batch:
    """One normalised batch of `samples` for prediction, decoded on a thread pool.

    In skip mode the bad clips are left out and listed in ``batch.extra["skipped"]``.
    """
    spec = spec or PreprocessSpec()
    dims = dict(feature_dims) if feature_dims is not None else _feature_dims(samples)
    if normalizer is not None:
        for name, mean in normalizer.feature_mean.items():
            dims.setdefault(name, int(mean.shape[0]))
    dataset = ClipDataset(samples, set(modalities), spec, normalizer.fingerprint() if normalizer else "")
    workers = num_threads or min(len(samples), available_cores()) or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        items = list(pool.map(dataset.__getitem__, range(len(samples))))
    out = Collator(frozenset(modalities), spec, dims, normalizer)(items)
    bad = out if isinstance(out, list) else out.extra.pop("bad", [])
    skipped: list[tuple[str, str]] = []
    if bad:
        _handle_bad(bad, on_bad_sample, skipped)
    if isinstance(out, list):
        raise DataError(skipped[0][0] if skipped else "batch", f"none of the {len(samples)} clips could be decoded",
                        hint="see the skipped files listed above")
    out.extra["skipped"] = skipped
    return out
