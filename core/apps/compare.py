"""Comparing fusions fairly: every registered fusion (or a chosen list) over the same frozen branches,
plus each branch alone, on one data set and one split, over one or several seeds, in one ranked table.

Per seed the branches train once (stage 1); then each fusion trains over those very branches, so
the rows differ only in how they combine the branches. Scoring decodes each split once and runs
each distinct branch once per batch; every model's logits then come from those shared outputs
(a fusion's forward over them, or a branch's own logits). Robustness columns score the same models
with one modality removed at test time (presence False, data zeroed).

A fusion installed by a third-party plugin appears here with no edit: the list comes from the
registry. A fusion that fails (cannot build for these branches, crashes while training) is reported
with its reason and the comparison goes on without it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import torch

from emofuse.core.apps.evaluation import (
    SPLITS,
    SplitOutputs,
    combine,
    resolve_device,
    scoring_batches,
)
from emofuse.core.apps.cross_corpus import CrossTarget, cross_baselines, cross_target, cross_values, target_store
from emofuse.core.apps.report import (
    Column,
    human_bytes,
    human_count,
    markdown_table,
    plot_comparison_bars,
    plot_confusion_matrix,
    write_csv,
    write_json,
    write_text,
)
from emofuse.core.config import ComponentRef, RunConfig
from emofuse.core.data.collate import drop_modalities
from emofuse.core.data.dialogue import needs_whole_dialogues
from emofuse.core.data.feature_store import FeatureStore, MemoryFeatureStore
from emofuse.core.engine import branch_stage, fusion_stage, training
from emofuse.core.engine.compose import required_modalities
from emofuse.core.engine.encode import extracted_features
from emofuse.core.engine.loaders import feature_store, open_cache
from emofuse.core.engine.metrics import HEADLINE_METRICS, MetricReport, metric_report
from emofuse.core.engine.model_io import LoadedModel, load_model
from emofuse.core.engine.progress import reporter
from emofuse.core.errors import ConfigError, EmofuseError
from emofuse.core.registry import Registry, get_registry
from emofuse.core.interfaces import Encoder
from emofuse.core.types import MODALITIES, Batch, EncoderOutput

log = logging.getLogger("emofuse.compare")

BRANCH = "branch"
FUSION = "fusion"


# --- training ------------------------------------------------------------------------------------------
class Trainer(Protocol):
    """How the comparison trains (`TrainRunTrainer` over `emofuse.core.engine.training` by default)."""

    def train_branch(self, config: RunConfig, branch: str, *, data: Any) -> Path:
        """Train `branch` of `config` alone (stage 1); return its checkpoint."""
        ...

    def train_fusion_inputs(self, config: RunConfig, *, data: Any) -> None:
        """Train what every fusion of `config` shares beyond the branches (out-of-fold branch copies),
        so that no single fusion is charged for it."""
        ...

    def train(self, config: RunConfig, *, data: Any, branch_checkpoints: Mapping[str, Path]) -> Any:
        """Train `config`'s fusion over the frozen branches in `branch_checkpoints`; the result has
        ``checkpoint`` (a model.safetensors holding branches and fusion)."""
        ...


class TrainRunTrainer:
    """The real trainer, `emofuse.core.engine.training.train_run`.

    Branches train as the single-branch runs that the staged pipeline itself would make
    (`branch_stage.branch_run_config`, under ``<output_dir>/branches``, shared with `emofuse train`
    and earlier comparisons); a fused run over the same config finds those finished runs by their
    fingerprint and reuses them, so every fusion of a seed fuses the very same frozen branches
    (checked after each fusion).
    """

    def __init__(self, registry: Registry, *, resume: bool = True, progress: bool = False, overwrite: bool = False):
        self.registry = registry
        self.resume = resume
        self.progress = progress
        #: Replace a run of another config found in a run folder (`emofuse.core.engine.run_guard`).
        self.overwrite = overwrite

    def _run(self, config: RunConfig, data: Any) -> Any:
        return training.train_run(config, registry=self.registry, resume=self.resume, progress=self.progress,
                                  data=data, overwrite=self.overwrite)

    def train_branch(self, config: RunConfig, branch: str, *, data: Any) -> Path:
        return Path(self._run(branch_stage.branch_run_config(config, branch), data).checkpoint)

    def train_fusion_inputs(self, config: RunConfig, *, data: Any) -> None:
        branches = {b: self._run(branch_stage.branch_run_config(config, b), data) for b in config.branches}
        for copy_config, copy_data in fusion_stage.shared_branch_runs(config, data, branches if config.train.refit
                                                                      else None):  # refit: for their epoch counts
            self._run(copy_config, copy_data)
        # The frozen branches' outputs over every split, cached now so the first fusion is not charged for them.
        from emofuse.core.engine.distributed import DistContext, resolve_device

        device = resolve_device(config.train.device)  # where the fused run computes them
        fusion_stage.frozen_outputs(config, {b: r.checkpoint for b, r in branches.items()}, data, fusion_stage.SPLITS,
                                    cache=feature_store(config, data), registry=self.registry, ctx=DistContext(device=device))

    def train(self, config: RunConfig, *, data: Any, branch_checkpoints: Mapping[str, Path]) -> Any:

        result = self._run(config, data)
        used = {b: Path(r.checkpoint).resolve() for b, r in (getattr(result, "branch_results", None) or {}).items()}
        wanted = {b: Path(p).resolve() for b, p in branch_checkpoints.items()}
        if used and used != wanted:
            raise ConfigError(f"fusion {config.fusion.name if config.fusion else '?'} was trained over other branch "
                              f"checkpoints ({used}) than the comparison's ({wanted})",
                              hint="the training settings of the branches must not change between fusions")
        return result


def load_comparison_data(config: RunConfig, *, registry: Registry, split_dir: Path) -> Any:
    """The data bundle every model of the comparison trains and is scored on (one split for all)."""
    from emofuse.core.data.pipeline import load_data

    return load_data(config.data, sorted(required_modalities(config, registry)), registry=registry, split_dir=split_dir)


# --- the models of one seed ----------------------------------------------------------------------------
@dataclass
class TrainedModel:
    """One row of the comparison for one seed: a branch alone or a fusion over the frozen branches."""

    key: str
    title: str
    kind: str
    component: str
    checkpoint: Path
    loaded: LoadedModel
    seconds: float = 0.0

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if m in self.loaded.model.modalities]

    @property
    def trainable_parameters(self) -> int:
        """What this row trained: the fusion's parameters (branches frozen), or the whole branch's."""
        model = self.loaded.model
        if model.fusion is not None:
            return sum(p.numel() for p in model.fusion.trainable_parameters())
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    @property
    def total_parameters(self) -> int:
        return sum(p.numel() for p in self.loaded.model.parameters())

    @property
    def checkpoint_bytes(self) -> int:
        from emofuse.core.checkpoint import sidecar_path, tensor_path

        return sum(p.stat().st_size for p in (tensor_path(self.checkpoint), sidecar_path(self.checkpoint)) if p.is_file())


def comparison_folder(name: str) -> str:
    """The comparison's folder name: ``compare-<name>``, not doubled when the name already says so."""
    return name if name.startswith("compare-") else f"compare-{name}"


def seeded(config: RunConfig, seed: int, runs: str) -> RunConfig:
    """`config` for one seed; its fusion runs go to ``<output_dir>/<runs>/fusion-*``, its branches to the
    shared ``<output_dir>/branches`` (reused by fingerprint by any run that trains the same branch)."""
    update: dict[str, Any] = {"train": config.train.model_copy(update={"seed": seed}), "name": runs}
    if config.cache_dir is None:  # frozen backbones' outputs do not depend on the seed: one cache for all
        update["cache_dir"] = Path(config.output_dir) / ".cache"
    if config.fusion_train is not None:
        update["fusion_train"] = config.fusion_train.model_copy(update={"seed": seed})
    return config.model_copy(update=update)


def fusion_config(config: RunConfig, fusion: str) -> RunConfig:
    """`config` with `fusion` (keeping the configured options when it is the configured fusion)."""
    ref = config.fusion if config.fusion is not None and config.fusion.name == fusion else ComponentRef(name=fusion)
    return config.model_copy(update={"fusion": ref, "name": f"{config.name}/fusion-{fusion}"})


def branch_title(branch: str, encoder: str) -> str:
    return f"{branch} alone ({encoder})"


def fusion_title(fusion: str) -> str:
    return f"fusion: {fusion}"


# --- scoring -------------------------------------------------------------------------------------------
def _state_hash(state: Mapping[str, torch.Tensor], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _branch_identity(name: str, encoder: torch.nn.Module) -> tuple[str, str]:
    """(branch name, hash of its weights and options): equal for the same frozen branch in every model."""
    cfg = json.dumps(encoder.config.model_dump(mode="json"), sort_keys=True) + encoder.name
    return name, _state_hash(encoder.checkpoint_state(), cfg)


@torch.no_grad()
def score_models(
    models: Sequence[TrainedModel],
    splits: Mapping[str, Sequence[Any]],
    *,
    ablations: Sequence[str] = (),
    batch_size: int = 32,
    device: str | torch.device = "auto",
    bootstrap: int = 0,
    seed: int = 0,
    store: FeatureStore | None = None,
) -> dict[str, dict[str, tuple[MetricReport, SplitOutputs]]]:
    """model key -> {"train"|"val"|"test"|"test-without-<m>": (report, outputs)}.

    Frozen features come from `store` (the comparison's feature cache, filled by training: no backbone
    reruns, and no frame or waveform is decoded for a clip it holds); each split is read once; each
    distinct branch (same weights) runs its head once per batch and variant, the ablations over the same
    features with the modality marked absent; every model combines those shared outputs.
    """
    device = resolve_device(device)
    features_from = store if store is not None else MemoryFeatureStore()  # shared by the variants of a batch
    results: dict[str, dict[str, tuple[MetricReport, SplitOutputs]]] = {m.key: {} for m in models}
    # models that decode alike (same normaliser) share one pass over the data
    groups: dict[str, list[TrainedModel]] = {}
    for m in models:
        groups.setdefault(_state_hash(m.loaded.normalizer_state), []).append(m)
    for group in groups.values():
        modalities = {x for m in group for x in m.loaded.model.modalities}
        encoders: dict[tuple[str, str], Encoder] = {}
        identity: dict[str, dict[str, tuple[str, str]]] = {}
        for m in group:
            identity[m.key] = {}
            for name, enc in m.loaded.model.branches.items():
                ident = _branch_identity(name, enc)
                encoders.setdefault(ident, enc.eval().to(device))
                identity[m.key][name] = ident
        by_dialogue = any(needs_whole_dialogues(m.loaded.model) for m in group)
        for split, samples in splits.items():
            labelled = [s for s in samples if s.label is not None and s.label >= 0]
            if not labelled:
                continue
            variants: list[tuple[str, tuple[str, ...]]] = [(split, ())]
            if split == "test":
                variants += [(f"test-without-{m}", (m,)) for m in ablations]
            metas: list[Batch] = []
            outputs: dict[str, list[dict[tuple[str, str], EncoderOutput]]] = {v: [] for v, _ in variants}
            for batch in scoring_batches(group[0].loaded, labelled, store=store, encoders=encoders.values(),
                                         modalities=modalities, batch_size=batch_size, by_dialogue=by_dialogue,
                                         device=device):
                metas.append(Batch(ids=batch.ids, labels=batch.labels.cpu(), present={}))
                batch = batch.to(device)
                features = {ident: extracted_features(enc, batch, features_from) for ident, enc in encoders.items()}
                for variant, drop in variants:
                    seen = drop_modalities(batch, drop) if drop else batch
                    outputs[variant].append({ident: enc(seen, features[ident]).detached_cpu()
                                             for ident, enc in encoders.items()})
            for m in group:
                for variant, _ in variants:
                    per_batch = [{name: outs[ident] for name, ident in identity[m.key].items()} for outs in outputs[variant]]
                    out = combine(m.loaded.model, metas, per_batch)
                    report = metric_report(out.labels, out.logits, m.loaded.label_names,
                                           bootstrap=bootstrap if variant == "test" else 0, seed=seed)
                    results[m.key][variant] = (report, out)
    return results


# --- the whole comparison ------------------------------------------------------------------------------
@dataclass
class ComparisonResult:
    """What a comparison returns: `rows` ranked per model (mean ± std over seeds or folds, baselines
    included), the per-seed rows, failures, and the files written under `out_dir`."""

    out_dir: Path
    rows: list[dict[str, Any]]
    per_seed: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    ablations: list[str]
    seeds: list[int]
    label_names: list[str]
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    #: Clips per split (after ``data.limit``; summed over folds with ``folds``).
    split_sizes: dict[str, int] = field(default_factory=dict)
    #: Speaker folds (None: one split).
    folds: int | None = None
    #: The baseline row every model is paired with (the strongest on test: the hardest bar).
    baseline_key: str | None = None
    #: Wall-clock seconds per stage, per fold and seed: each branch, the shared fusion inputs.
    stage_seconds: list[dict[str, Any]] = field(default_factory=list)
    #: With a second corpus (`cross_dataset`): what it is (`CrossTarget.describe`); rows carry ``cross_<metric>``.
    cross: dict[str, Any] | None = None


def fusions_to_compare(fusions: Sequence[str] | None, registry: Registry) -> list[str]:
    """The chosen fusions (checked against the registry), or every registered one."""
    known = registry.names("fusion")
    if not fusions:
        return known
    unknown = [f for f in fusions if f not in known]
    if unknown:
        raise ConfigError(f"--fusions: no fusion named {unknown[0]!r} is registered (known: {', '.join(known)})",
                          hint="run `emofuse plugins --kind fusion`")
    return list(dict.fromkeys(fusions))


def ablations_for(config: RunConfig, registry: Registry) -> list[str]:
    """Modalities worth removing at test time: those the branches read (in canonical order)."""

    used = required_modalities(config, registry)
    return [m for m in MODALITIES if m in used]


def fold_parts(config: RunConfig, data: Any, folds: int, *, registry: Registry) -> list[tuple[RunConfig, Any]]:
    """Per speaker fold: the config reading that fold's split file and its data (normaliser fit on the
    fold's own training clips). Split files live in ``<output_dir>/splits``, named by their content, so
    every comparison over the same clips reuses the same branch runs."""
    from emofuse.core.data.splits import save_split, speaker_folds

    samples = sorted((s for part in data.splits.values() for s in part), key=lambda s: s.id)
    speakers = len({s.speaker for s in samples})
    cfg = config.data
    splits = speaker_folds(samples, folds, val_speakers=max(1, round(speakers * cfg.val_fraction)))
    digest = hashlib.sha256("\0".join(s.id for s in samples).encode()).hexdigest()[:10]
    parts = []
    for k, split in enumerate(splits):
        path = Path(config.output_dir) / "splits" / f"{cfg.dataset}-speaker-fold{k + 1}of{folds}-{digest}.json"
        if not path.is_file():
            save_split(path, split, method="speaker", seed=cfg.split_seed, dataset=cfg.dataset,
                       val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
        fold_config = config.model_copy(update={"data": cfg.model_copy(update={"split_file": path})})
        parts.append((fold_config, load_comparison_data(fold_config, registry=registry, split_dir=path.parent)))
    return parts


@dataclass
class _Collected:
    """What the folds and seeds of one comparison gather before aggregation."""

    per_run: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    confusion: dict[str, np.ndarray] = field(default_factory=dict)
    titles: dict[str, str] = field(default_factory=dict)
    #: model key -> fold -> seed -> clip id -> 1.0 (right) / 0.0 (wrong) on the test clips.
    correct: dict[str, dict[Any, dict[Any, dict[str, float]]]] = field(default_factory=dict)
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    stage_seconds: list[dict[str, Any]] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, row: dict[str, Any], title: str, report: MetricReport, ids: Sequence[str], preds: np.ndarray,
            labels: np.ndarray) -> None:
        key = row["key"]
        self.per_run.append(row)
        self.titles[key] = title
        self.confusion[key] = self.confusion.get(key, 0) + np.asarray(report.confusion)
        right = (np.asarray(preds) == np.asarray(labels)).astype(np.float64)
        self.correct.setdefault(key, {}).setdefault(row.get("fold"), {})[row.get("seed")] = dict(zip(ids, right))


def compare(
    config: RunConfig,
    *,
    fusions: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    folds: int | None = None,
    baselines: bool = True,
    robustness: bool = True,
    registry: Registry | None = None,
    data: Any = None,
    out_dir: Path | None = None,
    trainer: Trainer | None = None,
    bootstrap: int = 1000,
    device: str | torch.device = "auto",
    batch_size: int = 32,
    on_progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
    cross_dataset: str | None = None,
    cross_data_dir: Path | None = None,
    cross_options: Mapping[str, Any] | None = None,
) -> ComparisonResult:
    """Train and score each branch alone and every fusion over them, per seed (and per speaker fold
    with `folds`), beside the baselines of `emofuse.core.apps.baselines`; write the report files.

    Files in `out_dir` (default ``<output_dir>/compare-<name>``): ``comparison.md``, ``.csv``,
    ``.json``, ``comparison.png`` (bar chart) and ``confusion/<model>.png`` (summed over runs).

    With `cross_dataset` (read from `cross_data_dir` with reader `cross_options`), every row, baselines
    included, is also scored on every clip of that second corpus over the classes both share (as
    `emofuse evaluate MODEL --dataset` does: `emofuse.core.apps.cross_corpus`).
    """
    registry = registry or get_registry()
    if not config.branches:
        raise ConfigError("compare needs at least one branch, the config has none", hint="use a preset or --encoder")
    if len(config.branches) == 1 and fusions:
        raise ConfigError(f"--fusions {','.join(fusions)}: a fusion needs two branches, the config has one",
                          hint="leave --fusions out to compare the branch with the baselines, or add a branch")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if folds is not None and folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds", hint="omit --folds for one split")
    # One branch (a corpus with one modality, such as EmoDB's speech): the branch beside the baselines.
    fusion_names = fusions_to_compare(fusions, registry) if len(config.branches) > 1 else []
    if len(config.branches) > 1 and not fusion_names:
        raise ConfigError("no fusion is registered", hint="install a plugin that provides one")
    say = on_progress or reporter().status
    folder = comparison_folder(config.name)
    out_dir = Path(out_dir) if out_dir else Path(config.output_dir) / folder
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = trainer or TrainRunTrainer(registry, overwrite=overwrite)
    if data is None:
        say("loading data")
        data = load_comparison_data(config, registry=registry, split_dir=out_dir)
    ablations = ablations_for(config, registry) if robustness else []
    parts = fold_parts(config, data, folds, registry=registry) if folds else [(config, data)]
    collected = _Collected()
    label_names: list[str] = list(data.label_names)
    target = None
    if cross_dataset:
        say(f"reading the second corpus {cross_dataset}")
        target = cross_target(cross_dataset, label_names, sorted(required_modalities(config, registry)),
                              data_dir=cross_data_dir, options=cross_options, registry=registry,
                              on_bad_sample=config.data.on_bad_sample,
                              speaker_normalization=config.data.speaker_normalization)
    for k, (part_config, part_data) in enumerate(parts):
        fold = k if folds else None
        where = f"fold {k + 1}/{folds}, " if folds else ""
        splits = {s: list(part_data.splits[s]) for s in SPLITS if s in part_data.splits}
        if not splits.get("test"):
            raise ConfigError("the split has no test clips to compare on", hint="raise data.test_fraction")
        for split, samples in splits.items():
            collected.sizes[split] = collected.sizes.get(split, 0) + len(samples)
        branch_models: dict[str, TrainedModel] = {}
        for seed in seeds:
            runs = f"{folder}/seed-{seed}" + (f"/fold-{k + 1}of{folds}" if folds else "")
            cfg = seeded(part_config, seed, runs)
            models = _train_models(cfg, fusion_names, trainer, part_data, registry, collected, say,
                                   where=f"{where}seed {seed}", fold=fold, seed=seed)
            branch_models = branch_models or {m.key: m for m in models if m.kind == BRANCH}
            to_score = {"test": splits["test"]}
            for split in ("train", "val"):
                if split in splits and any(recorded_accuracy(m.loaded, split) is None for m in models):
                    to_score[split] = splits[split]
            say(f"{where}seed {seed}: scoring {len(models)} models on {', '.join(to_score)}"
                + (f" (and without {', '.join(ablations)})" if ablations else ""))
            scores = score_models(models, to_score, ablations=ablations, batch_size=batch_size, device=device,
                                  bootstrap=bootstrap, seed=seed, store=feature_store(cfg, part_data))
            # On a second corpus, only the models it has inputs for (RAVDESS's AU branch reads nothing on EmoDB).
            scorable = [m for m in models if target is not None and target.can_score(m.loaded.model.branches.values())]
            elsewhere = {}
            if scorable:
                say(f"{where}seed {seed}: scoring {len(scorable)} models on {target.dataset}")
                elsewhere = score_models(scorable, {"test": target.clips}, batch_size=batch_size, device=device,
                                         store=target_store(cfg, target.clips, part_data.normalizer))
            for m in models:
                row = _seed_row(m, scores[m.key], ablations, seed)
                row["fold"] = fold
                if m.key in elsewhere:
                    cross_out = elsewhere[m.key]["test"][1]
                    row.update(cross_values(cross_out.labels, cross_out.logits, target))
                report, out = scores[m.key]["test"]
                collected.add(row, m.title, report, out.ids, out.logits.argmax(dim=1).numpy(), out.labels.numpy())
                if row.get("fusion_report") is not None:
                    collected.reports.setdefault(m.key, []).append(row["fusion_report"])
                label_names = list(m.loaded.label_names)
        if baselines:
            say(f"{where}fitting the baselines")
            _add_baselines(part_config, part_data, branch_models, collected, label_names, fold=fold,
                           bootstrap=bootstrap, seed=seeds[0], target=target)

    rows = aggregate(collected.per_run, ablations)
    baseline_key = _summarise(rows, collected, bootstrap=bootstrap, seed=seeds[0])
    result = ComparisonResult(out_dir, rows, collected.per_run, collected.failures, ablations, list(seeds),
                              label_names, {k: v.tolist() for k, v in collected.confusion.items()},
                              split_sizes=collected.sizes, folds=folds, baseline_key=baseline_key,
                              stage_seconds=collected.stage_seconds,
                              cross=target.describe() if target is not None else None)
    result.files = write_comparison(result, collected.titles, config=config)
    return result


def _train_models(cfg: RunConfig, fusion_names: Sequence[str], trainer: Trainer, data: Any, registry: Registry,
                  collected: _Collected, say: Callable[[str], None], *, where: str, fold: int | None,
                  seed: int) -> list[TrainedModel]:
    """Each branch alone (timed one by one), the fusions' shared inputs (timed apart), then each fusion."""
    models: list[TrainedModel] = []
    stages: dict[str, Any] = {"fold": fold, "seed": seed, "branches": {}}
    for branch, ref in cfg.branches.items():
        say(f"{where}: training branch {branch}")
        start = time.perf_counter()
        ckpt = Path(trainer.train_branch(cfg, branch, data=data))
        seconds = time.perf_counter() - start
        stages["branches"][branch] = round(seconds, 2)
        models.append(TrainedModel(f"{BRANCH}:{branch}", branch_title(branch, ref.name), BRANCH, ref.name, ckpt,
                                   load_model(ckpt, registry=registry), seconds))
    branch_ckpts = {m.key.split(":", 1)[1]: m.checkpoint for m in models}
    if fusion_names:
        start = time.perf_counter()
        trainer.train_fusion_inputs(cfg, data=data)
        stages["fusion_inputs"] = round(time.perf_counter() - start, 2)
    collected.stage_seconds.append(stages)
    for fusion in fusion_names:
        say(f"{where}: training fusion {fusion}")
        start = time.perf_counter()
        try:
            result = trainer.train(fusion_config(cfg, fusion), data=data, branch_checkpoints=branch_ckpts)
            ckpt = Path(result.checkpoint)
            loaded = load_model(ckpt, registry=registry)
        except (EmofuseError, RuntimeError, ValueError, TypeError) as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            collected.failures.append({"seed": seed, "fold": fold, "fusion": fusion, "error": reason,
                                       "provider": str(registry.get("fusion", fusion).provider)})
            say(f"{where}: fusion {fusion} failed: {reason}")
            continue
        models.append(TrainedModel(f"{FUSION}:{fusion}", fusion_title(fusion), FUSION, fusion, ckpt, loaded,
                                   time.perf_counter() - start))
    return models


def _add_baselines(config: RunConfig, data: Any, branch_models: Mapping[str, TrainedModel], collected: _Collected,
                   label_names: Sequence[str], *, fold: int | None, bootstrap: int, seed: int,
                   target: CrossTarget | None = None) -> None:
    """The baselines of one split, over the frozen inputs of the branches the models were built on,
    fit on the clips the models learn from (train, or train + validation with ``train.refit``); with a
    second corpus `target`, also scored there (`cross_baselines`)."""
    from emofuse.core.apps import baselines as bl

    cache = open_cache(config)
    start = time.perf_counter()
    encoders = {b: enc for m in branch_models.values() for b, enc in m.loaded.model.branches.items()}
    fit_on = bl.fit_splits(config.train.refit)
    fits = bl.baselines_over_branches(encoders, data, cache, fit_on=fit_on)
    # Each row's own fitting; the pooling of the frozen inputs that all of them share is counted apart.
    own = sum(f.seconds for f in fits if f.component != "averaged-regressions")
    stage = next((st for st in reversed(collected.stage_seconds) if st.get("fold") == fold), None)
    if stage is not None:  # with the fold's (last seed's) stages
        stage["baseline_inputs"] = round(max(0.0, time.perf_counter() - start - own), 2)
    elsewhere = cross_baselines(encoders, data, target, cache, fit_on=fit_on) if target is not None else {}
    labels_by_id = {s.id: s.label for s in data.splits["test"]}
    for f in fits:
        labels = torch.tensor([labels_by_id[i] for i in f.ids])
        probs = torch.from_numpy(f.probabilities)
        report = metric_report(labels, probs, label_names, bootstrap=bootstrap, seed=seed)
        row: dict[str, Any] = {
            "key": f.key, "model": f.title, "kind": bl.BASELINE, "component": f.component,
            "seed": None, "fold": fold, "modalities": f.modalities,
            **{k: report.metrics[k] for k in HEADLINE_METRICS},
            "accuracy_ci": list(report.intervals.get("accuracy", ())) or None,
            "train_seconds": round(f.seconds, 3), "test_clips": report.num_samples, "inputs": f.inputs,
            "C": f.C, "val_accuracy": f.val_accuracy, "fit_on": "+".join(fit_on),
            **elsewhere.get(f.key, {}),
        }
        collected.add(row, f.title, report, f.ids, probs.argmax(dim=1).numpy(), labels.numpy())


def recorded_accuracy(loaded: LoadedModel, split: str) -> float | None:
    """The accuracy on `split` that training stored in the checkpoint's sidecar, if any."""
    value = (loaded.meta.get("metrics") or {}).get(split, {})
    value = value.get("accuracy") if isinstance(value, Mapping) else None
    return float(value) if isinstance(value, (int, float)) else None


def _seed_row(m: TrainedModel, scores: Mapping[str, tuple[MetricReport, SplitOutputs]], ablations: Sequence[str],
              seed: int) -> dict[str, Any]:
    test = scores["test"][0]
    row: dict[str, Any] = {
        "key": m.key,
        "model": m.title,
        "kind": m.kind,
        "component": m.component,
        "seed": seed,
        "modalities": "+".join(m.modalities),
        **{k: test.metrics[k] for k in HEADLINE_METRICS},
        "accuracy_ci": list(test.intervals.get("accuracy", ())) or None,
        "trainable_parameters": m.trainable_parameters,
        "total_parameters": m.total_parameters,
        "checkpoint_bytes": m.checkpoint_bytes,
        "train_seconds": round(m.seconds, 2),
        "checkpoint": str(m.checkpoint),
        "test_clips": test.num_samples,
    }
    refit = m.loaded.config.train.refit or m.loaded.config.train.keep == "last"
    for split in ("train",) if refit else ("train", "val"):  # a refit model trained on its validation clips
        if split in scores:
            row[f"{split}_accuracy"] = scores[split][0].metrics["accuracy"]
        elif recorded_accuracy(m.loaded, split) is not None:
            row[f"{split}_accuracy"] = recorded_accuracy(m.loaded, split)
    for mod in ablations:
        variant = scores.get(f"test-without-{mod}")
        if variant is not None:
            row[f"accuracy_without_{mod}"] = variant[0].metrics["accuracy"]
            row[f"macro_f1_without_{mod}"] = variant[0].metrics["macro_f1"]
    if m.kind == FUSION and m.loaded.model.fusion is not None:
        row["fusion_report"] = m.loaded.model.fusion.report()
    return row


#: Per-run values that are not averaged (identifiers, settings).
_NOT_AVERAGED = {"seed", "fold", "C"}
#: Per-run values averaged but given no std (sizes).
_NO_STD = ("trainable_parameters", "total_parameters", "checkpoint_bytes", "test_clips", "inputs")


def _numeric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-run values to average (each gets a ``_std`` companion)."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in _NOT_AVERAGED and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    return keys


def aggregate(per_seed: Sequence[Mapping[str, Any]], ablations: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per model, ranked by test accuracy, then macro F1.

    On one split: mean over seeds and sample std (``<metric>_std``, None for one seed). Over speaker
    folds (rows with several ``fold`` values): each fold's seed mean first, then mean and std over folds.
    """
    by_key: dict[str, list[Mapping[str, Any]]] = {}
    for r in per_seed:
        by_key.setdefault(r["key"], []).append(r)
    numeric = _numeric_keys(per_seed)
    rows = []
    for key, runs in by_key.items():
        first = runs[0]
        row: dict[str, Any] = {k: first[k] for k in ("key", "model", "kind", "component", "modalities")}
        by_fold: dict[Any, list[Mapping[str, Any]]] = {}
        for r in runs:
            by_fold.setdefault(r.get("fold"), []).append(r)
        row["seeds"] = max(len(v) for v in by_fold.values())
        if len(by_fold) > 1:
            row["folds"] = len(by_fold)
        for k in numeric:
            if len(by_fold) > 1:
                values = [float(np.mean(vs)) for vs in ([float(r[k]) for r in f if r.get(k) is not None]
                                                        for f in by_fold.values()) if vs]
            else:
                values = [float(r[k]) for r in runs if r.get(k) is not None]
            if not values:
                continue
            row[k] = float(np.mean(values))
            if k not in _NO_STD:
                row[f"{k}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        for k in _NO_STD:
            if k in row:
                row[k] = int(round(row[k]))
        if "accuracy_ci" in first and len(runs) == 1:
            row["accuracy_ci"] = first["accuracy_ci"]
        if "C" in first:  # a baseline's regularisation, as chosen on each split's validation speakers
            row["C"] = [r.get("C") for r in runs]
        rows.append(row)
    rows.sort(key=lambda r: (-r.get("accuracy", -1.0), -r.get("macro_f1", -1.0), r["model"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def _clip_correctness(by_fold: Mapping[Any, Mapping[Any, Mapping[str, float]]]) -> dict[str, float]:
    """clip id -> correctness averaged over seeds, pooled over folds (each clip is in one fold's test)."""
    out: dict[str, float] = {}
    for per_seed in by_fold.values():
        ids = set.intersection(*(set(v) for v in per_seed.values()))
        out.update({i: float(np.mean([v[i] for v in per_seed.values()])) for i in ids})
    return out


def mean_report(reports: Sequence[Any]) -> Any:
    """The element-wise mean of several fusion reports (numbers, and dicts/lists of numbers, averaged;
    anything else taken from the first)."""
    first = reports[0]
    if isinstance(first, bool):
        return first
    if isinstance(first, (int, float)) and all(isinstance(r, (int, float)) for r in reports):
        return float(np.mean(reports))
    if isinstance(first, Mapping) and all(isinstance(r, Mapping) and r.keys() == first.keys() for r in reports):
        return {k: mean_report([r[k] for r in reports]) for k in first}
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first) for r in reports):
        return [mean_report([r[i] for r in reports]) for i in range(len(first))]
    return first


def _summarise(rows: list[dict[str, Any]], collected: _Collected, *, bootstrap: int, seed: int) -> str | None:
    """Add to each aggregated row its accuracy interval over the pooled test clips, its fusion report
    (averaged over runs), and its paired difference to the strongest baseline; return that baseline's key."""
    from emofuse.core.apps.baselines import BASELINE, accuracy_interval

    correct = {key: _clip_correctness(by_fold) for key, by_fold in collected.correct.items()}
    for row in rows:
        reports = collected.reports.get(row["key"])
        if reports:
            row["fusion_report"] = mean_report(reports)
            if len(reports) > 1:
                row["fusion_report_runs"] = len(reports)
        if bootstrap > 0 and (row.get("folds") or row.get("seeds", 1) > 1):
            values = np.array(list(correct[row["key"]].values()))
            row["accuracy_ci"] = list(accuracy_interval(values, resamples=bootstrap, seed=seed))
    base_rows = [r for r in rows if r["kind"] == BASELINE]
    if not base_rows:
        return None
    best = max(base_rows, key=lambda r: (r["accuracy"], r.get("macro_f1", 0.0)))
    for row in rows:
        if row is not best:
            paired = _paired(collected, correct, row["key"], best["key"], bootstrap=bootstrap, seed=seed)
            if paired:
                row.update(vs_baseline=paired["difference"], vs_baseline_ci=paired["ci"], vs_baseline_text=paired["text"])
                if "per_fold" in paired:
                    row.update(vs_baseline_per_fold=paired["per_fold"], folds_above=paired["folds_above"])
        if row["kind"] == BRANCH:  # each branch beside the regressions over its own inputs
            branch = row["key"].removeprefix(f"{BRANCH}:")
            own = [r for r in base_rows if r["key"] == f"{BASELINE}:{branch}" or r["key"].startswith(f"{BASELINE}:{branch}:")]
            row["vs_own_baselines"] = [
                {"baseline": r["model"], "accuracy": r["accuracy"],
                 **_paired(collected, correct, row["key"], r["key"], bootstrap=bootstrap, seed=seed)}
                for r in own]
    best["vs_baseline_text"] = "(the bar)"
    return best["key"]


def _paired(collected: _Collected, correct: Mapping[str, Mapping[str, float]], key: str, base_key: str, *,
            bootstrap: int, seed: int) -> dict[str, Any]:
    """Row `key`'s accuracy minus row `base_key`'s, paired clip by clip over their common test clips:
    the difference, its bootstrap interval, and with folds each fold's difference and how many are above 0."""
    from emofuse.core.apps.baselines import paired_difference

    mine, base = correct[key], correct[base_key]
    common = sorted(set(mine) & set(base))
    if not common:
        return {}
    diff, lo, hi = paired_difference(np.array([mine[i] for i in common]), np.array([base[i] for i in common]),
                                     resamples=max(bootstrap, 1), seed=seed)
    out: dict[str, Any] = {"difference": diff, "ci": [lo, hi],
                           "text": f"{100 * diff:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"}
    base_by_fold = collected.correct[base_key]
    if None not in base_by_fold:  # cross-validated: folds are keyed 0..K-1
        per_fold = []
        for fold, per_seed in collected.correct[key].items():
            if fold in base_by_fold:
                fold_mine = _clip_correctness({fold: per_seed})
                fold_base = _clip_correctness({fold: base_by_fold[fold]})
                shared = set(fold_mine) & set(fold_base)
                per_fold.append(float(np.mean([fold_mine[i] - fold_base[i] for i in shared])))
        out["per_fold"] = per_fold
        out["folds_above"] = f"{sum(d > 0 for d in per_fold)}/{len(per_fold)}"
    return out


# --- report --------------------------------------------------------------------------------------------
def comparison_columns(ablations: Sequence[str], *, robustness_f1: bool = False, folds: bool = False,
                       cross: str | None = None) -> list[Column]:
    pct = dict(fmt=".1f", pct=True)
    cols = [
        Column("rank", "#", "d"),
        Column("model", "Model", justify="left"),
        Column("test_clips", "Test n, per fold" if folds else "Test n", "d"),
        Column("accuracy", "Acc %", std_key="accuracy_std", **pct),
        Column("vs_baseline_text", "Δ acc vs best baseline, points (95% CI)"),
        *([Column("folds_above", "Folds above it")] if folds else []),
        Column("macro_f1", "Macro F1 %", std_key="macro_f1_std", **pct),
        Column("weighted_f1", "Weighted F1 %", std_key="weighted_f1_std", **pct),
        Column("uar", "UA %", std_key="uar_std", **pct),
        Column("modalities", "Modalities", justify="left"),
        Column("trainable_parameters", "Trainable params", human_count),
        Column("checkpoint_bytes", "Checkpoint", human_bytes),
        Column("train_accuracy", "Train acc %", std_key="train_accuracy_std", **pct),
        Column("val_accuracy", "Val acc %", std_key="val_accuracy_std", **pct),
        Column("train_seconds", "Train s", ".1f"),
    ]
    for mod in ablations:
        cols.append(Column(f"accuracy_without_{mod}", f"Acc w/o {mod} %", std_key=f"accuracy_without_{mod}_std", **pct))
        if robustness_f1:
            cols.append(Column(f"macro_f1_without_{mod}", f"F1 w/o {mod} %", std_key=f"macro_f1_without_{mod}_std", **pct))
    if cross:
        cols += [Column("cross_accuracy", f"{cross} WA %", std_key="cross_accuracy_std", **pct),
                 Column("cross_uar", f"{cross} UA %", std_key="cross_uar_std", **pct),
                 Column("cross_macro_f1", f"{cross} macro F1 %", std_key="cross_macro_f1_std", **pct)]
    return cols


CSV_SKIP = ("fusion_report", "accuracy_ci", "vs_baseline_ci", "vs_baseline_per_fold", "C", "vs_own_baselines")


def comparison_markdown(result: ComparisonResult, *, config: RunConfig | None = None) -> str:
    seeds = ", ".join(str(s) for s in result.seeds)
    sizes = result.split_sizes
    lines = []
    if config is not None:
        protocol = (f"cross-validation over {result.folds} speaker folds ({sizes.get('test', 0)} test clips in all, "
                    f"each tested once); mean ± std over folds of each fold's mean over seeds {seeds}"
                    if result.folds else
                    f"`{config.data.split}` split ({sizes.get('test', 0)} test clips); seeds {seeds} "
                    "(mean ± sample std over seeds where there are several)")
        lines.append(f"Data set `{config.data.dataset}`, {protocol}; branches "
                     f"{', '.join(f'`{b}` = `{r.name}`' for b, r in config.branches.items())}"
                     + ("; `train.refit`: models and baselines fit on train + validation" if config.train.refit else "")
                     + ".\n")
    cross = result.cross["dataset"] if result.cross else None
    lines.append(markdown_table(result.rows, comparison_columns(result.ablations, folds=bool(result.folds), cross=cross)))
    if result.baseline_key:
        best = next(r for r in result.rows if r["key"] == result.baseline_key)
        lines.append(f"\nBaselines: scikit-learn logistic regression (standardised inputs, C chosen on the validation "
                     f"speakers) over each branch's frozen inputs pooled per clip (cached backbone features: mean "
                     f"and std over time; feature vectors as they are), over the views of them a branch names "
                     f"(such as a speech backbone's last layer), over all of them concatenated; the branches' "
                     f"regressions with probabilities averaged; and the majority class. Δ: each row's accuracy minus that of the strongest baseline "
                     f"({best['model'].removeprefix('baseline: ')}), paired clip by clip over the same test clips "
                     "(95% bootstrap interval)" + (", and the folds where the row is above it." if result.folds else ".")
                     + "\n")
    own = [(r, b) for r in result.rows for b in r.get("vs_own_baselines", ()) if "text" in b]
    if own:
        lines.append("\nEach branch beside the regressions over its own inputs (Δ paired clip by clip, 95% bootstrap "
                     "interval" + (", folds where the branch is above" if result.folds else "") + "):\n")
        lines.append("| Branch | Acc % | Baseline | Its acc % | Δ acc, points (95% CI) |" + (" Folds above |" if result.folds else ""))
        lines.append("|:---|---:|:---|---:|---:|" + ("---:|" if result.folds else ""))
        lines += [f"| {r['model']} | {100 * r['accuracy']:.1f} | {b['baseline'].removeprefix('baseline: ')} | "
                  f"{100 * b['accuracy']:.1f} | {b['text']} |" + (f" {b.get('folds_above', '–')} |" if result.folds else "")
                  for r, b in own]
        lines.append("")
    if result.ablations:
        lines.append("\n`Acc w/o X`: the same trained model scored with modality X removed from every test clip.\n")
    if result.cross:
        c = result.cross
        left = ", ".join(f"{name} ({n} clips)" for name, n in c["corpus_only_clips"].items()) or "none"
        lines.append(f"\n`{cross} WA/UA/macro F1`: every row (each fold's models, baselines fit the same way) also scored "
                     f"on all {c['clips']} clips of `{cross}` over the {len(c['shared_classes'])} classes both name "
                     f"({', '.join(c['shared_classes'])}); left out: its classes the models lack: {left}; the models' "
                     f"classes it lacks: {', '.join(c['model_only_classes']) or 'none'} (a prediction is the most "
                     "probable shared class). Baselines over a branch the corpus has no inputs for are not scored there.\n")
    if result.stage_seconds:
        branches: dict[str, float] = {}
        for stage in result.stage_seconds:
            for b, sec in stage["branches"].items():
                branches[b] = branches.get(b, 0.0) + sec
        shared = sum(stage.get("fusion_inputs", 0.0) for stage in result.stage_seconds)
        pooled = sum(stage.get("baseline_inputs", 0.0) for stage in result.stage_seconds)
        lines.append("\nTraining time, all runs together: "
                     + ", ".join(f"branch {b} {sec:.0f} s" for b, sec in branches.items())
                     + (f", the frozen branches' outputs and out-of-fold copies shared by the fusions {shared:.0f} s"
                        if shared >= 0.5 else "")
                     + (f", the baselines' pooled inputs {pooled:.0f} s" if pooled >= 0.5 else "")
                     + " (a reused finished run costs about nothing). `Train s`: each row's own training, "
                       "mean per run, without what rows share.\n")
    if result.failures:
        lines.append("\nFusions that could not be compared:\n")
        lines += [f"- `{f['fusion']}` (seed {f['seed']}" + (f", fold {f['fold'] + 1}" if f.get("fold") is not None else "")
                  + f", {f['provider']}): {f['error']}" for f in result.failures]
        lines.append("")
    return "\n".join(lines)


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


def runs_text(result: ComparisonResult) -> str:
    seeds = f"{len(result.seeds)} seed(s)"
    return f"{result.folds} speaker folds x {seeds}" if result.folds else seeds


def write_comparison(result: ComparisonResult, titles: Mapping[str, str], *,
                     config: RunConfig | None = None) -> dict[str, Path]:
    out = result.out_dir
    files = {
        "markdown": write_text(out / "comparison.md", comparison_markdown(result, config=config)),
        "csv": write_csv(out / "comparison.csv",
                         [{k: v for k, v in r.items() if k not in CSV_SKIP} for r in result.rows]),
        "json": write_json(out / "comparison.json", {
            "seeds": result.seeds,
            "folds": result.folds,
            "baseline_key": result.baseline_key,
            "stage_seconds": result.stage_seconds,
            "split_sizes": result.split_sizes,
            "ablations": result.ablations,
            "label_names": result.label_names,
            "cross_corpus": result.cross,
            "config": config.model_dump(mode="json") if config is not None else None,
            "rows": result.rows,
            "per_seed": result.per_seed,
            "failures": result.failures,
            "confusion_matrices": result.confusion,
        }),
    }
    if result.rows:
        files["bar_chart"] = plot_comparison_bars(result.rows, out / "comparison.png",
                                                  title=f"Test scores over {runs_text(result)}")
    for key, cm in result.confusion.items():
        files[f"confusion:{key}"] = plot_confusion_matrix(
            cm, result.label_names, out / "confusion" / f"{_safe_name(key)}.png",
            title=f"{titles.get(key, key)} (test, summed over {runs_text(result)})")
    return files


__all__ = [
    "ComparisonResult",
    "TrainRunTrainer",
    "TrainedModel",
    "Trainer",
    "aggregate",
    "compare",
    "comparison_columns",
    "comparison_folder",
    "comparison_markdown",
    "fusions_to_compare",
    "score_models",
    "write_comparison",
]
