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
    batches_of,
    combine,
    drop_modalities,
    normalizer_of,
    resolve_device,
)
from emofuse.core.apps.report import (
    Column,
    human_bytes,
    human_count,
    markdown_table,
    plot_comparison_bars,
    plot_confusion_matrix,
    rich_table,
    write_csv,
    write_json,
    write_text,
)
from emofuse.core.config import ComponentRef, RunConfig
from emofuse.core.data.dialogue import needs_whole_dialogues
from emofuse.core.data.preprocess import preprocess_spec
from emofuse.core.engine import branch_stage, training
from emofuse.core.engine.metrics import HEADLINE_METRICS, MetricReport, metric_report
from emofuse.core.engine.model_io import LoadedModel, load_model
from emofuse.core.errors import ConfigError, EmofuseError
from emofuse.core.registry import Registry, get_registry
from emofuse.core.types import MODALITIES, Batch, EncoderOutput

log = logging.getLogger("emofuse.compare")

BRANCH = "branch"
FUSION = "fusion"


# --- training ------------------------------------------------------------------------------------------
class Trainer(Protocol):
    """How the comparison trains (`TrainRunTrainer` over `emofuse.core.engine.training` by default)."""

    def train_branches(self, config: RunConfig, *, out_dir: Path, data: Any) -> dict[str, Path]:
        """Train each of `config`'s branches alone (stage 1); return branch -> checkpoint."""
        ...

    def train(self, config: RunConfig, *, data: Any, branch_checkpoints: Mapping[str, Path]) -> Any:
        """Train `config`'s fusion over the frozen branches in `branch_checkpoints`; the result has
        ``checkpoint`` (a model.safetensors holding branches and fusion)."""
        ...


class TrainRunTrainer:
    """The real trainer, `emofuse.core.engine.training.train_run`.

    Branches train as the single-branch runs that the staged pipeline itself would make
    (`branch_stage.branch_run_config`); a fused run over the same config finds those finished runs by
    their fingerprint and reuses them, so every fusion of a seed fuses the very same frozen
    branches (checked after each fusion).
    """

    def __init__(self, registry: Registry, *, resume: bool = True, progress: bool = False):
        self.registry = registry
        self.resume = resume
        self.progress = progress

    def train_branches(self, config: RunConfig, *, out_dir: Path, data: Any) -> dict[str, Path]:

        checkpoints = {}
        for branch in config.branches:
            single = branch_stage.branch_run_config(config, branch)
            result = training.train_run(single, registry=self.registry, resume=self.resume, progress=self.progress,
                                        data=data)
            checkpoints[branch] = Path(result.checkpoint)
        return checkpoints

    def train(self, config: RunConfig, *, data: Any, branch_checkpoints: Mapping[str, Path]) -> Any:

        result = training.train_run(config, registry=self.registry, resume=self.resume, progress=self.progress,
                                    data=data)
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
    from emofuse.core.engine.compose import required_modalities

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


def seeded(config: RunConfig, seed: int, output_dir: Path) -> RunConfig:
    update: dict[str, Any] = {"train": config.train.model_copy(update={"seed": seed}), "output_dir": output_dir}
    if config.cache_dir is None:  # frozen backbones' outputs do not depend on the seed: one cache for all
        update["cache_dir"] = Path(output_dir).parent / ".cache"
    if config.fusion_train is not None:
        update["fusion_train"] = config.fusion_train.model_copy(update={"seed": seed})
    return config.model_copy(update=update)


def fusion_config(config: RunConfig, fusion: str) -> RunConfig:
    """`config` with `fusion` (keeping the configured options when it is the configured fusion)."""
    ref = config.fusion if config.fusion is not None and config.fusion.name == fusion else ComponentRef(name=fusion)
    return config.model_copy(update={"fusion": ref, "name": f"fusion-{fusion}"})


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
) -> dict[str, dict[str, tuple[MetricReport, SplitOutputs]]]:
    """model key -> {"train"|"val"|"test"|"test-without-<m>": (report, outputs)}.

    Each split is decoded once; each distinct branch (same weights) runs once per batch and
    ablation, and every model combines those shared outputs.
    """
    device = resolve_device(device)
    results: dict[str, dict[str, tuple[MetricReport, SplitOutputs]]] = {m.key: {} for m in models}
    # models that decode alike (same normaliser) share one pass over the data
    groups: dict[str, list[TrainedModel]] = {}
    for m in models:
        groups.setdefault(_state_hash(m.loaded.normalizer_state), []).append(m)
    for group in groups.values():
        normalizer = normalizer_of(group[0].loaded)
        spec = preprocess_spec(group[0].loaded.config.data)
        modalities = sorted({x for m in group for x in m.loaded.model.modalities})
        encoders: dict[tuple[str, str], torch.nn.Module] = {}
        identity: dict[str, dict[str, tuple[str, str]]] = {}
        for m in group:
            identity[m.key] = {}
            for name, enc in m.loaded.model.branches.items():
                ident = _branch_identity(name, enc)
                encoders.setdefault(ident, enc.eval().to(device))
                identity[m.key][name] = ident
        for split, samples in splits.items():
            labelled = [s for s in samples if s.label is not None and s.label >= 0]
            if not labelled:
                continue
            variants: list[tuple[str, tuple[str, ...]]] = [(split, ())]
            if split == "test":
                variants += [(f"test-without-{m}", (m,)) for m in ablations]
            metas: list[Batch] = []
            outputs: dict[str, list[dict[tuple[str, str], EncoderOutput]]] = {v: [] for v, _ in variants}
            by_dialogue = any(needs_whole_dialogues(m.loaded.model) for m in group)
            for batch in batches_of(labelled, modalities, normalizer, batch_size=batch_size, by_dialogue=by_dialogue,
                                    spec=spec):
                metas.append(Batch(ids=batch.ids, labels=batch.labels.cpu(), present={}))
                for variant, drop in variants:
                    seen = (drop_modalities(batch, drop) if drop else batch).to(device)
                    outputs[variant].append({ident: enc(seen).detached_cpu() for ident, enc in encoders.items()})
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
    out_dir: Path
    rows: list[dict[str, Any]]
    per_seed: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    ablations: list[str]
    seeds: list[int]
    label_names: list[str]
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    #: Clips per split (after ``data.limit``).
    split_sizes: dict[str, int] = field(default_factory=dict)


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
    from emofuse.core.engine.compose import required_modalities

    used = required_modalities(config, registry)
    return [m for m in MODALITIES if m in used]


def compare(
    config: RunConfig,
    *,
    fusions: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    robustness: bool = True,
    registry: Registry | None = None,
    data: Any = None,
    out_dir: Path | None = None,
    trainer: Trainer | None = None,
    bootstrap: int = 1000,
    device: str | torch.device = "auto",
    batch_size: int = 32,
    on_progress: Callable[[str], None] | None = None,
) -> ComparisonResult:
    """Train and score each branch alone and every fusion over them, per seed; write the report files.

    Files in `out_dir` (default ``<output_dir>/compare-<name>``): ``comparison.md``, ``.csv``,
    ``.json``, ``comparison.png`` (bar chart) and ``confusion/<model>.png`` (summed over seeds).
    """
    registry = registry or get_registry()
    if len(config.branches) < 2:
        raise ConfigError(f"compare needs at least two branches to fuse, the config has {len(config.branches)}",
                          hint="use a preset with two branches (e.g. --preset ravdess-reference) or --encoder twice")
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    fusion_names = fusions_to_compare(fusions, registry)
    if not fusion_names:
        raise ConfigError("no fusion is registered", hint="install a plugin that provides one")
    say = on_progress or (lambda msg: log.info(msg))
    out_dir = Path(out_dir) if out_dir else Path(config.output_dir) / f"compare-{config.name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = trainer or TrainRunTrainer(registry)
    if data is None:
        say("loading data")
        data = load_comparison_data(config, registry=registry, split_dir=out_dir)
    ablations = ablations_for(config, registry) if robustness else []
    splits = {s: list(data.splits[s]) for s in SPLITS if s in data.splits}
    if not splits.get("test"):
        raise ConfigError("the split has no test clips to compare on", hint="raise data.test_fraction")

    per_seed: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    confusion: dict[str, np.ndarray] = {}
    titles: dict[str, str] = {}
    label_names: list[str] = list(data.label_names)
    for seed in seeds:
        seed_dir = out_dir / f"seed-{seed}"
        cfg = seeded(config, seed, seed_dir)
        say(f"seed {seed}: training {len(cfg.branches)} branches")
        start = time.perf_counter()
        branch_ckpts = trainer.train_branches(cfg, out_dir=seed_dir / "branches", data=data)
        missing = [b for b in cfg.branches if b not in branch_ckpts]
        if missing:
            raise ConfigError(f"the trainer returned no checkpoint for branch(es) {', '.join(missing)}")
        branch_seconds = time.perf_counter() - start
        models: list[TrainedModel] = []
        for branch, ref in cfg.branches.items():
            ckpt = Path(branch_ckpts[branch])
            models.append(TrainedModel(f"{BRANCH}:{branch}", branch_title(branch, ref.name), BRANCH, ref.name, ckpt,
                                       load_model(ckpt, registry=registry), branch_seconds / len(cfg.branches)))
        for fusion in fusion_names:
            say(f"seed {seed}: training fusion {fusion}")
            start = time.perf_counter()
            try:
                result = trainer.train(fusion_config(cfg, fusion), data=data, branch_checkpoints=branch_ckpts)
                ckpt = Path(result.checkpoint)
                loaded = load_model(ckpt, registry=registry)
            except (EmofuseError, RuntimeError, ValueError, TypeError) as exc:
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
                failures.append({"seed": seed, "fusion": fusion, "error": reason,
                                 "provider": str(registry.get("fusion", fusion).provider)})
                say(f"seed {seed}: fusion {fusion} failed: {reason}")
                continue
            models.append(TrainedModel(f"{FUSION}:{fusion}", fusion_title(fusion), FUSION, fusion, ckpt, loaded,
                                       time.perf_counter() - start))
        # train/val accuracy as the trainer recorded it in each checkpoint; scored here only when missing
        to_score = {"test": splits["test"]}
        for split in ("train", "val"):
            if split in splits and any(recorded_accuracy(m.loaded, split) is None for m in models):
                to_score[split] = splits[split]
        say(f"seed {seed}: scoring {len(models)} models on {', '.join(to_score)}"
            + (f" (and without {', '.join(ablations)})" if ablations else ""))
        scores = score_models(models, to_score, ablations=ablations, batch_size=batch_size, device=device,
                              bootstrap=bootstrap, seed=seed)
        for m in models:
            titles[m.key] = m.title
            row = _seed_row(m, scores[m.key], ablations, seed)
            per_seed.append(row)
            cm = np.asarray(scores[m.key]["test"][0].confusion)
            confusion[m.key] = confusion.get(m.key, 0) + cm
            label_names = list(m.loaded.label_names)

    rows = aggregate(per_seed, ablations)
    result = ComparisonResult(out_dir, rows, per_seed, failures, ablations, list(seeds), label_names,
                              {k: v.tolist() for k, v in confusion.items()},
                              split_sizes={k: len(v) for k, v in splits.items()})
    result.files = write_comparison(result, titles, config=config)
    return result


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
    for split in ("train", "val"):
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


def _numeric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-seed values to average over seeds (each gets a ``_std`` companion)."""
    skip = {"seed"}
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in skip and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    return keys


def aggregate(per_seed: Sequence[Mapping[str, Any]], ablations: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per model: mean over seeds and sample std (``<metric>_std``, None for one seed),
    ranked by test accuracy, then macro F1."""
    by_key: dict[str, list[Mapping[str, Any]]] = {}
    for r in per_seed:
        by_key.setdefault(r["key"], []).append(r)
    numeric = _numeric_keys(per_seed)
    rows = []
    for key, runs in by_key.items():
        first = runs[0]
        row: dict[str, Any] = {k: first[k] for k in ("key", "model", "kind", "component", "modalities")}
        row["seeds"] = len(runs)
        for k in numeric:
            values = [float(r[k]) for r in runs if r.get(k) is not None]
            if not values:
                continue
            row[k] = float(np.mean(values))
            if k not in ("trainable_parameters", "total_parameters", "checkpoint_bytes", "test_clips"):
                row[f"{k}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        for k in ("trainable_parameters", "total_parameters", "checkpoint_bytes", "test_clips"):
            if k in row:
                row[k] = int(round(row[k]))
        rows.append(row)
    rows.sort(key=lambda r: (-r.get("accuracy", -1.0), -r.get("macro_f1", -1.0), r["model"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


# --- report --------------------------------------------------------------------------------------------
def comparison_columns(ablations: Sequence[str], *, robustness_f1: bool = False) -> list[Column]:
    pct = dict(fmt=".1f", pct=True)
    cols = [
        Column("rank", "#", "d"),
        Column("model", "Model", justify="left"),
        Column("accuracy", "Acc %", std_key="accuracy_std", **pct),
        Column("macro_f1", "Macro F1 %", std_key="macro_f1_std", **pct),
        Column("weighted_f1", "Weighted F1 %", std_key="weighted_f1_std", **pct),
        Column("uar", "UA %", std_key="uar_std", **pct),
        Column("modalities", "Modalities", justify="left"),
        Column("trainable_parameters", "Trainable params", human_count),
        Column("checkpoint_bytes", "Checkpoint", human_bytes),
        Column("train_accuracy", "Train acc %", std_key="train_accuracy_std", **pct),
        Column("val_accuracy", "Val acc %", std_key="val_accuracy_std", **pct),
    ]
    for mod in ablations:
        cols.append(Column(f"accuracy_without_{mod}", f"Acc w/o {mod} %", std_key=f"accuracy_without_{mod}_std", **pct))
        if robustness_f1:
            cols.append(Column(f"macro_f1_without_{mod}", f"F1 w/o {mod} %", std_key=f"macro_f1_without_{mod}_std", **pct))
    return cols


CSV_SKIP = ("fusion_report", "accuracy_ci")


def comparison_markdown(result: ComparisonResult, *, config: RunConfig | None = None) -> str:
    seeds = ", ".join(str(s) for s in result.seeds)
    test_clips = result.rows[0].get("test_clips") if result.rows else 0
    lines = []
    if config is not None:
        lines.append(f"Data set `{config.data.dataset}`, `{config.data.split}` split ({test_clips} test clips); "
                     f"branches {', '.join(f'`{b}` = `{r.name}`' for b, r in config.branches.items())}; "
                     f"seeds {seeds} (mean ± sample std over seeds where there are several).\n")
    lines.append(markdown_table(result.rows, comparison_columns(result.ablations)))
    if result.ablations:
        lines.append("\n`Acc w/o X`: the same trained model scored with modality X removed from every test clip.\n")
    if result.failures:
        lines.append("\nFusions that could not be compared:\n")
        lines += [f"- `{f['fusion']}` (seed {f['seed']}, {f['provider']}): {f['error']}" for f in result.failures]
        lines.append("")
    return "\n".join(lines)


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)


def write_comparison(result: ComparisonResult, titles: Mapping[str, str], *,
                     config: RunConfig | None = None) -> dict[str, Path]:
    out = result.out_dir
    files = {
        "markdown": write_text(out / "comparison.md", comparison_markdown(result, config=config)),
        "csv": write_csv(out / "comparison.csv",
                         [{k: v for k, v in r.items() if k not in CSV_SKIP} for r in result.rows]),
        "json": write_json(out / "comparison.json", {
            "seeds": result.seeds,
            "split_sizes": result.split_sizes,
            "ablations": result.ablations,
            "label_names": result.label_names,
            "config": config.model_dump(mode="json") if config is not None else None,
            "rows": result.rows,
            "per_seed": result.per_seed,
            "failures": result.failures,
            "confusion_matrices": result.confusion,
        }),
    }
    if result.rows:
        files["bar_chart"] = plot_comparison_bars(result.rows, out / "comparison.png",
                                                  title=f"Test scores over {len(result.seeds)} seed(s)")
    for key, cm in result.confusion.items():
        files[f"confusion:{key}"] = plot_confusion_matrix(
            cm, result.label_names, out / "confusion" / f"{_safe_name(key)}.png",
            title=f"{titles.get(key, key)} (test, summed over {len(result.seeds)} seed(s))")
    return files


def compare_cli(
    config: RunConfig,
    *,
    fusions: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    robustness: bool = True,
    console: Any = None,
    out_dir: Path | None = None,
) -> ComparisonResult:
    """`emofuse compare`: run the comparison, print the ranked table and where the files went."""
    def say(msg: str) -> None:
        if console is not None:
            console.print(f"[dim]{msg}[/]")

    result = compare(config, fusions=fusions, seeds=seeds, robustness=robustness, out_dir=out_dir, on_progress=say)
    if console is not None:
        console.print(rich_table(result.rows, comparison_columns(result.ablations),
                                 title=f"{config.data.dataset}: test split, seeds {', '.join(map(str, result.seeds))}"))
        for f in result.failures:
            console.print(f"[yellow]fusion {f['fusion']} (seed {f['seed']}) failed:[/] {f['error']}", highlight=False)
        console.print(f"written to {result.out_dir}: comparison.md, comparison.csv, comparison.json, comparison.png, confusion/")
    return result


__all__ = [
    "ComparisonResult",
    "TrainRunTrainer",
    "TrainedModel",
    "Trainer",
    "aggregate",
    "compare",
    "compare_cli",
    "comparison_columns",
    "comparison_markdown",
    "fusions_to_compare",
    "score_models",
    "write_comparison",
]
