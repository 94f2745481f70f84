"""The trainer and the staged pipeline behind ``emofuse train``.

`fit` is one training loop for anything that trains: AdamW, warm-up then cosine decay, gradient
accumulation, mixed precision (`emofuse.core.engine.precision`), gradient clipping, early stopping on a
validation metric, the best weights kept, a resumable state saved after every epoch
(`emofuse.core.engine.train_state`), per-epoch rows in ``metrics.jsonl``, a rich progress bar, and
data parallelism under torchrun (`emofuse.core.engine.distributed`).

`train_run` is the staged pipeline of the reference design:

1. each branch trains alone (a frozen, cacheable backbone runs once per clip: its `extract`
   outputs come from the `FeatureCache`, and the loaders then skip decoding that media);
2. the branches are frozen, their outputs (logits, embedding, presence) over every split are
   computed once and cached, and the fusion trains over those tensors only: no backbone, no
   branch, no decoding runs while the fusion trains.

A config with one branch and no fusion is stage 1 alone. Branch runs live in
``<output_dir>/branches/<branch>-<hash>``, the hash covering everything that shapes the branch
(data, encoder options, loss, training settings), so a second fusion over the same branches (a
comparison, a search trial, a rerun after a crash) reuses them instead of training them again.

Folder of a run (``<output_dir>/<name>``): ``model.safetensors`` + ``model.json`` (the best
model, loadable with `emofuse.core.engine.model_io.load_model`), ``last.safetensors`` + ``last.json``
(the state a killed run resumes from), ``metrics.jsonl``, ``result.json``, ``config.toml``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, Sized

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from emofuse.core.checkpoint import atomic_write_bytes, checkpoint_sha256
from emofuse.core.engine.compose import (
    ComposedModel,
    branch_info,
    branch_modalities,
    build_fusion,
    build_loss,
    build_model,
    required_modalities,
)
from emofuse.core.config import RunConfig, TrainConfig, to_toml
from emofuse.core.engine.distributed import DistContext, ShardedBatchSampler, setup_distributed, teardown_distributed
from emofuse.core.errors import CheckpointError, ConfigError, DataError
from emofuse.core.interfaces import Encoder, Fusion, Loss
from emofuse.core.engine.metrics import classification_metrics
from emofuse.core.engine.model_io import load_model, model_state, save_model
from emofuse.core.engine.precision import Precision, resolve_precision
from emofuse.core.registry import Registry, get_registry
from emofuse.core.engine.schedule import warmup_cosine
from emofuse.core.engine.train_state import TrainingState, capture_rng, load_training_state, restore_rng, save_training_state
from emofuse.core.types import AUDIO, VIDEO, Batch, EncoderOutput

log = logging.getLogger("emofuse.training")

SPLITS = ("train", "val", "test")
MODEL_FILE = "model"
STATE_FILE = "last"
HISTORY_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
BRANCHES_DIR = "branches"
#: Metrics where lower is better.
LOWER_IS_BETTER = {"loss"}
#: Batch size for passes that only score (no gradients, so memory allows more).
EVAL_BATCH_FACTOR = 2


@dataclass
class RunResult:
    """What a run produced: where, its best checkpoint, final metrics per split and its history."""

    run_dir: Path
    checkpoint: Path
    metrics: dict[str, dict[str, float]]
    history: list[dict]
    fusion_report: dict | None = None
    branch_results: dict[str, "RunResult"] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "metrics": self.metrics,
            "fusion_report": self.fusion_report,
            "branches": {b: str(r.run_dir) for b, r in self.branch_results.items()},
        }


# =================================================================================================
# Small pieces
# =================================================================================================
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device); ask cuDNN for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def config_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings that shape the result (device and loader workers do not)."""
    return cfg.model_dump(mode="json", exclude={"device", "num_workers"})


def name_report(report: Mapping[str, Any] | None, label_names: Sequence[str]) -> dict[str, Any] | None:
    """A fusion report with per-class lists (``class_bias``) keyed by class name."""
    if report is None:
        return None
    out = dict(report)
    for key, value in report.items():
        if isinstance(value, list) and len(value) == len(label_names) and all(isinstance(v, (int, float)) for v in value):
            out[key] = {name: float(v) for name, v in zip(label_names, value)}
    return out


class EarlyStopping:
    """Stop after `patience` epochs without improvement of the monitored validation metric."""

    def __init__(self, monitor: str, patience: int):
        self.monitor = monitor
        self.patience = patience
        self.mode = "min" if monitor in LOWER_IS_BETTER else "max"
        self.best: float | None = None
        self.best_epoch = -1
        self.bad_epochs = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record this epoch's value; True when it is the best so far."""
        if math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        else:
            improved = value < self.best if self.mode == "min" else value > self.best
        if improved:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


class EpochProgress:
    """A rich progress bar over the epoch's batches (on a terminal) and one line of metrics per epoch
    (always), on the main rank only."""

    def __init__(self, stage: str, epochs: int, enabled: bool):
        self.stage, self.epochs, self.enabled = stage, epochs, enabled
        self._console = None
        self._progress = None
        self._task = None

    def __enter__(self) -> "EpochProgress":
        if not self.enabled:
            return self
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._console = Console()
        if self._console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), transient=True, console=self._console,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_epoch(self, epoch: int, batches: int) -> None:
        if self._progress is None:
            return
        desc = f"{self.stage} epoch {epoch + 1}/{self.epochs}"
        if self._task is None:
            self._task = self._progress.add_task(desc, total=batches, loss="-")
        else:
            self._progress.reset(self._task, total=batches, description=desc, loss="-")

    def advance(self, loss: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, **({"loss": f"{loss:.4f}"} if loss is not None else {}))

    def epoch_line(self, row: Mapping[str, Any], monitor: str) -> None:
        if self._console is None:
            return
        val = row.get(f"val_{monitor}")
        mark = " [green]*best*[/]" if row.get("improved") else ""
        self._console.print(
            f"{self.stage} epoch {row['epoch'] + 1}/{self.epochs}: train loss {row['train_loss']:.4f}, "
            f"val loss {row['val_loss']:.4f}, val {monitor} {val:.4f}, lr {row['lr']:.2e}{mark}",
            highlight=False, soft_wrap=True,
        )

    @property
    def live(self) -> bool:
        """True when a bar is drawn (then per-batch loss values are worth fetching)."""
        return self._progress is not None


# =================================================================================================
# The training loop
# =================================================================================================
class FitTask(Protocol):
    """What `fit` trains: a module, batches, and how to turn a batch into (logits, labels)."""

    module: nn.Module

    def train_batches(self, epoch: int) -> Iterable[Any]:
        """This rank's share of each global batch of the epoch, in order."""

    def num_train_batches(self) -> int:
        """Global batches per epoch (the same on every rank)."""

    def eval_batches(self, split: str) -> Iterable[Any]:
        """This rank's share of `split`, for scoring."""

    def prepare(self, batch: Any) -> Any:
        """Device transfer and frozen-feature lookup (runs outside autocast and autograd)."""

    def forward(self, module: nn.Module, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], labels [B])`` with `module` (possibly wrapped for data parallelism)."""

    def module_state(self) -> dict[str, torch.Tensor]:
        """The tensors that define the trained module (what the resumable state keeps)."""

    def load_module_state(self, state: Mapping[str, torch.Tensor]) -> None: ...


@dataclass
class FitOutcome:
    history: list[dict[str, Any]]
    best_epoch: int
    best_val: dict[str, float]
    stopped_early: bool


@dataclass
class FitSettings:
    stage: str
    train: TrainConfig
    num_classes: int
    run_dir: Path
    fingerprint: str
    resume: bool = True
    progress: bool = True
    find_unused_parameters: bool = False


def evaluate_task(task: FitTask, split: str, loss_fn: Loss, num_classes: int, ctx: DistContext,
                  precision: Precision) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics (and loss) of `task.module` on `split`, with every rank's share gathered."""
    module = task.module
    was_training = module.training
    module.eval()
    logits_parts, label_parts = [], []
    aux_totals = torch.zeros(3, dtype=torch.float64)  # summed cross-entropy, correct, labelled
    has_aux = False
    with torch.no_grad():
        for batch in task.eval_batches(split):
            prepared = task.prepare(batch)
            with precision.autocast():
                logits, labels = task.forward(module, prepared)
            logits_parts.append(logits.detach().float().cpu())
            label_parts.append(labels.detach().cpu())
            counts = getattr(task, "last_aux_counts", None)  # set by tasks whose encoder has an auxiliary head
            if counts is not None:
                aux_totals += counts
                has_aux = True
    module.train(was_training)
    local = (torch.cat(logits_parts) if logits_parts else torch.zeros(0, num_classes),
             torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.long))
    gathered = ctx.gather_objects(local)
    logits = torch.cat([g[0] for g in gathered])
    labels = torch.cat([g[1] for g in gathered])
    if int((labels >= 0).sum()) == 0:
        raise DataError(split, f"the {split} split has no labelled sample to score",
                        hint="use more data or larger data.val_fraction / data.test_fraction")
    metrics = classification_metrics(labels, logits, num_classes)
    metrics["loss"] = float(loss_fn(logits.to(ctx.device), labels.to(ctx.device)))
    if bool(ctx.all_reduce_sum(torch.tensor(float(has_aux), dtype=torch.float64, device=ctx.device)) > 0):
        ce_sum, correct, labelled = (float(v) for v in ctx.all_reduce_sum(aux_totals.to(ctx.device)))
        if labelled > 0:  # reported beside the emotion metrics, never mixed into them
            metrics["aux_loss"] = ce_sum / labelled
            metrics["aux_accuracy"] = correct / labelled
    return metrics, logits, labels


def _materialize_lazy(task: FitTask) -> None:
    """Run one forward pass when the module has lazy parameters, so they get their shapes before the
    optimizer and DistributedDataParallel see them."""
    from torch.nn.parameter import is_lazy

    if not any(is_lazy(p) for p in task.module.parameters()):
        return
    first_batch = next(iter(task.train_batches(0)))
    was_training = task.module.training
    task.module.eval()
    with torch.no_grad():
        task.forward(task.module, task.prepare(first_batch))
    task.module.train(was_training)


def _append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")


def _write_history(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


def fit(
    task: FitTask,
    loss_fn: Loss,
    settings: FitSettings,
    ctx: DistContext,
    *,
    on_epoch: Callable[[int, dict], None] | None = None,
    on_improve: Callable[[int, dict], None] | None = None,
) -> FitOutcome:
    """Train `task.module` until the epochs run out or early stopping fires; leave the best weights in it.

    After every epoch the full state is written to ``<run_dir>/last.safetensors`` (rank 0), so a
    killed run continues from the last completed epoch, bit for bit, when `settings.resume` is set
    and the state's fingerprint matches.
    """
    cfg = settings.train
    run_dir = settings.run_dir
    device = ctx.device
    module = task.module.to(device)
    loss_fn = loss_fn.to(device)
    precision = resolve_precision(cfg.precision, device)
    num_batches = task.num_train_batches()
    if num_batches == 0:
        raise DataError("train", f"{settings.stage}: the training split yields no batch",
                        hint="use more data or a smaller train.batch_size")

    _materialize_lazy(task)
    params = [p for p in module.parameters() if p.requires_grad]
    groups = parameter_groups(module, cfg.lr)
    if not params:
        raise ConfigError(f"{settings.stage}: nothing to train (every parameter is frozen)")
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    accumulation = cfg.grad_accumulation
    steps_per_epoch = math.ceil(num_batches / accumulation)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_fraction)
    scaler = precision.scaler
    stopper = EarlyStopping(cfg.monitor, cfg.patience)
    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch = 0
    finished = False

    state_path = run_dir / STATE_FILE
    if settings.resume:
        state = load_training_state(state_path)
        if state is not None and state.fingerprint != settings.fingerprint:
            if ctx.is_main:
                log.warning("%s: %s was made with other settings; starting afresh", settings.stage, state_path)
            state = None
        if state is not None:
            task.load_module_state(state.module)
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
            if scaler is not None and state.scaler:
                scaler.load_state_dict(state.scaler)
            stopper.load_state_dict(state.early_stopping)
            history = list(state.history)
            best_state = state.best_module
            if ctx.rank < len(state.rng):
                restore_rng(*state.rng[ctx.rank])
            start_epoch = state.epoch + 1
            finished = state.finished
            if ctx.is_main:
                log.info("%s: resuming after epoch %d from %s", settings.stage, state.epoch + 1, state_path)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_history(run_dir / HISTORY_FILE, history)  # drop rows of epochs the state does not cover

    model: nn.Module = module
    if ctx.enabled:
        model = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=settings.find_unused_parameters,
        )

    show = settings.progress and ctx.is_main
    with EpochProgress(settings.stage, cfg.epochs, show) as bar:
        for epoch in range(start_epoch, cfg.epochs):
            if finished or stopper.should_stop:
                break
            started = time.perf_counter()
            module.train()
            bar.start_epoch(epoch, num_batches)
            step_losses: list[torch.Tensor] = []
            aux_losses: list[torch.Tensor] = []
            step_labels: list[torch.Tensor] = []
            optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(task.train_batches(epoch)):
                group_start = (i // accumulation) * accumulation
                group_len = min(accumulation, num_batches - group_start)
                steps_now = (i + 1 - group_start) == group_len
                prepared = task.prepare(batch)
                sync = contextlib.nullcontext() if (steps_now or not ctx.enabled) else model.no_sync()
                with sync:
                    with precision.autocast():
                        logits, labels = task.forward(model, prepared)
                    loss = loss_fn(logits.float(), labels)
                    aux = getattr(task, "last_aux_loss", None)  # (cross-entropy, weight) of a multi-task head
                    total = loss + aux[1] * aux[0] if aux is not None else loss
                    if aux is not None:
                        aux_losses.append(aux[0].detach())
                    objective = total / group_len if group_len > 1 else total
                    if ctx.enabled:
                        # The loss is a per-sample mean: weigh it by this rank's share of the global batch
                        # so the all-reduced (averaged) gradient is the gradient of the global batch's mean.
                        n_local = (labels >= 0).sum().to(torch.float64)
                        n_global = ctx.all_reduce_sum(n_local)
                        share = n_local * ctx.world_size / n_global.clamp_min(1)
                        objective = objective * share.float()
                    (scaler.scale(objective) if scaler is not None else objective).backward()
                step_losses.append(loss.detach())
                step_labels.append(labels.detach())
                if steps_now:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if cfg.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    stepped = True
                    if scaler is not None:
                        scale = scaler.get_scale()
                        scaler.step(optimizer)
                        scaler.update()
                        stepped = scaler.get_scale() >= scale  # a shrunk scale means inf/NaN: step skipped
                    else:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if stepped:
                        scheduler.step()
                bar.advance(float(loss.detach()) if bar.live else None)
            counts = torch.stack([(y >= 0).sum() for y in step_labels]).to(torch.float64) if step_labels else \
                torch.zeros(1, dtype=torch.float64, device=device)
            losses = torch.stack(step_losses).to(torch.float64) if step_losses else torch.zeros_like(counts)
            total_loss = ctx.all_reduce_sum((losses * counts).sum())
            total_count = ctx.all_reduce_sum(counts.sum())
            train_loss = float(total_loss / total_count) if float(total_count) > 0 else float("nan")
            train_seconds = time.perf_counter() - started

            val, _, _ = evaluate_task(task, "val", loss_fn, settings.num_classes, ctx, precision)
            improved = stopper.update(val[cfg.monitor], epoch)
            if improved:
                best_state = {k: v.detach().cpu().clone() for k, v in task.module_state().items()}
            row = {
                "stage": settings.stage,
                "epoch": epoch,
                "train_loss": train_loss,
                **({"train_aux_loss": float(torch.stack(aux_losses).mean())} if aux_losses else {}),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
                "train_seconds": train_seconds,
                "improved": improved,
                **{f"val_{k}": v for k, v in val.items()},
            }
            history.append(row)
            rng_states = ctx.gather_objects(capture_rng())
            if ctx.is_main:
                if improved and on_improve is not None:
                    on_improve(epoch, val)
                stop_now = stopper.should_stop or epoch + 1 == cfg.epochs
                save_training_state(state_path, TrainingState(
                    fingerprint=settings.fingerprint, epoch=epoch,
                    module={k: v.detach().cpu() for k, v in task.module_state().items()},
                    best_module=best_state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None,
                    early_stopping=stopper.state_dict(), history=history, rng=rng_states, finished=stop_now,
                ))
                _append_jsonl(run_dir / HISTORY_FILE, row)
            bar.epoch_line(row, cfg.monitor)
            ctx.barrier()
            if on_epoch is not None:
                on_epoch(epoch, val)

    if best_state is not None:
        task.load_module_state(best_state)
    best_row = next((r for r in history if r["epoch"] == stopper.best_epoch), {})
    best_val = {k[4:]: v for k, v in best_row.items() if k.startswith("val_")}
    return FitOutcome(history, stopper.best_epoch, best_val, stopped_early=stopper.should_stop)


# =================================================================================================
# Data access
# =================================================================================================
def _base_loader(bundle: Any, split: str, modalities: set[str], batch_size: int, seed: int, num_workers: int) -> Any:
    return bundle.loader(split, batch_size=batch_size, shuffle=False, seed=seed, modalities=set(modalities),
                         num_workers=num_workers)


def split_batches(
    bundle: Any, split: str, *, modalities: set[str], batch_size: int, shuffle: bool, seed: int, epoch: int,
    ctx: DistContext, num_workers: int = 0, training: bool = False,
) -> DataLoader:
    """This rank's batches of `split`: global batches drawn by `ShardedBatchSampler`, so one process and
    several cut the data identically; the bundle's dataset, collate function and bad-clip policy load them."""
    base = _base_loader(bundle, split, modalities, batch_size, seed, num_workers)
    if not isinstance(base, DataLoader) or not isinstance(base.dataset, Sized):
        raise TypeError("DataBundle.loader must return a torch DataLoader over a sized dataset")
    sampler = ShardedBatchSampler(len(base.dataset), batch_size, shuffle=shuffle, seed=seed, rank=ctx.rank,
                                  world_size=ctx.world_size, drop_small_last=training)
    sampler.set_epoch(epoch)
    options: dict[str, Any] = dict(
        batch_sampler=sampler, collate_fn=base.collate_fn, num_workers=base.num_workers,
        worker_init_fn=base.worker_init_fn, pin_memory=base.pin_memory,
        generator=torch.Generator().manual_seed(seed * 1_000 + epoch),
    )
    if base.num_workers:
        options["multiprocessing_context"] = base.multiprocessing_context
    from emofuse.core.data.pipeline import BundleLoader

    if isinstance(base, BundleLoader):
        return BundleLoader(base.dataset, on_bad_sample=bundle.on_bad_sample, skipped=bundle.skipped, **options)
    return DataLoader(base.dataset, **options)


def light_modalities(encoder: Encoder) -> set[str]:
    """What the loader must decode once `encoder`'s frozen features are cached: no frames, no waveforms."""
    mods = set(encoder.modalities)
    return mods - {VIDEO, AUDIO} if encoder.cacheable else mods


def ensure_extracted(encoder: Encoder, cache: Any, bundle: Any, *, splits: Sequence[str], batch_size: int, seed: int,
                     num_workers: int, ctx: DistContext, progress: bool) -> None:
    """Fill `cache` with `encoder.extract` outputs for every clip of `splits` (main rank; others wait).

    A first pass without decoding media collects the clips' keys; only when some are missing does a
    second pass decode them and run the backbone.
    """
    from emofuse.core.data.cache import batch_keys, encoder_namespace

    if not encoder.cacheable:
        return
    if ctx.is_main:
        namespace = encoder_namespace(encoder)
        light = light_modalities(encoder)
        for split in splits:
            if not bundle.splits.get(split):
                continue
            missing = 0
            for batch in split_batches(bundle, split, modalities=light, batch_size=batch_size, shuffle=False,
                                       seed=seed, epoch=0, ctx=DistContext(device=ctx.device), num_workers=num_workers):
                missing += len(cache.missing(namespace, batch_keys(batch, encoder.modalities)))
            if not missing:
                continue
            full = split_batches(bundle, split, modalities=set(encoder.modalities), batch_size=batch_size,
                                 shuffle=False, seed=seed, epoch=0, ctx=DistContext(device=ctx.device),
                                 num_workers=num_workers)
            with _simple_progress(f"{encoder.name}: frozen features ({split})", len(full), progress) as tick:
                for batch in full:
                    cache.extract(encoder, batch.to(ctx.device))
                    tick()
    ctx.barrier()


@contextlib.contextmanager
def _simple_progress(description: str, total: int | None, enabled: bool) -> Iterator[Callable[[], None]]:
    from rich.console import Console

    if not enabled or not Console().is_terminal:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _open_cache(config: RunConfig) -> Any:
    from emofuse.core.data.cache import FeatureCache

    root = config.cache_dir if config.cache_dir is not None else Path(config.output_dir) / ".cache"
    return FeatureCache(root)


# =================================================================================================
# Stage 1: one branch
# =================================================================================================
class BranchTask:
    """Trains one encoder (a `ComposedModel` with a single branch) on decoded or cached inputs."""

    def __init__(self, model: ComposedModel, bundle: Any, cache: Any, cfg: TrainConfig, ctx: DistContext):
        self.module = model
        (self.branch, self.encoder), = model.branches.items()
        self.bundle, self.cache, self.cfg, self.ctx = bundle, cache, cfg, ctx
        self.modalities = light_modalities(self.encoder)
        self._num_batches: int | None = None
        #: Set by encoders that need a dialogue's turns together (`emofuse.plugins.encoders.context`).
        self.by_dialogue = bool(getattr(self.encoder, "batches_by_dialogue", False))
        self.last_aux_loss: tuple[torch.Tensor, float] | None = None
        #: ``[3]`` float64 (summed cross-entropy, correct, labelled) of the auxiliary head on the latest batch.
        self.last_aux_counts: torch.Tensor | None = None

    def _batches(self, split: str, *, shuffle: bool, epoch: int, training: bool, batch_size: int) -> Iterable[Batch]:
        if self.by_dialogue:  # context models see whole dialogues, batch_size utterances at most
            from emofuse.core.data.dialogue import dialogue_loader

            return dialogue_loader(self.bundle, split, max_utterances=batch_size, shuffle=shuffle, seed=self.cfg.seed,
                                   modalities=self.modalities, epoch=epoch, num_workers=self.cfg.num_workers,
                                   rank=self.ctx.rank, world_size=self.ctx.world_size)
        return split_batches(self.bundle, split, modalities=self.modalities, batch_size=batch_size, shuffle=shuffle,
                             seed=self.cfg.seed, epoch=epoch, ctx=self.ctx, num_workers=self.cfg.num_workers,
                             training=training)

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        return self._batches("train", shuffle=True, epoch=epoch, training=True, batch_size=self.cfg.batch_size)

    def num_train_batches(self) -> int:
        if self._num_batches is None and self.by_dialogue:
            from emofuse.core.data.dialogue import DialogueBatchSampler

            self._num_batches = len(DialogueBatchSampler(self.bundle.splits["train"], self.cfg.batch_size,
                                                         shuffle=False, rank=self.ctx.rank,
                                                         world_size=self.ctx.world_size))
        if self._num_batches is None:
            n = len(_base_loader(self.bundle, "train", self.modalities, self.cfg.batch_size, self.cfg.seed, 0).dataset)
            sampler = ShardedBatchSampler(n, self.cfg.batch_size, shuffle=False, seed=0, world_size=self.ctx.world_size)
            self._num_batches = len(sampler.global_batches())
        return self._num_batches

    def eval_batches(self, split: str) -> Iterable[Batch]:
        return self._batches(split, shuffle=False, epoch=0, training=False,
                             batch_size=self.cfg.batch_size * EVAL_BATCH_FACTOR)

    def prepare(self, batch: Batch) -> tuple[Batch, dict[str, dict[str, torch.Tensor]] | None]:
        batch = batch.to(self.ctx.device)
        if not self.encoder.cacheable:
            return batch, None
        with torch.no_grad():
            return batch, {self.branch: self.cache.extract(self.encoder, batch)}

    def forward(self, module: nn.Module, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batch, extracted = prepared
        logits, outputs = module(batch, extracted)
        self.last_aux_loss = auxiliary_loss(outputs[self.branch], self.encoder)
        self.last_aux_counts = auxiliary_counts(outputs[self.branch], self.encoder) if not module.training else None
        return logits, batch.labels

    def module_state(self) -> dict[str, torch.Tensor]:
        return model_state(self.module)

    def load_module_state(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_partial(self.module, state, where="branch state")


def auxiliary_loss(output: EncoderOutput, encoder: Encoder) -> tuple[torch.Tensor, float] | None:
    """(cross-entropy, weight) of an encoder's auxiliary head (``extras["aux_logits"]`` / ``["aux_labels"]``,
    see `emofuse.plugins.encoders.auxiliary`), or None when it has none or no sample has an auxiliary label."""
    weight = float(getattr(encoder, "aux_weight", 0.0))
    logits, labels = output.extras.get("aux_logits"), output.extras.get("aux_labels")
    if weight <= 0 or logits is None or labels is None or not bool((labels >= 0).any()):
        return None
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-1), weight


def auxiliary_counts(output: EncoderOutput, encoder: Encoder) -> torch.Tensor | None:
    """``[3]`` float64 (summed cross-entropy, correct, labelled) of an encoder's auxiliary head over one
    batch, for exact split-level means (batches differ in how many samples carry the auxiliary label)."""
    if float(getattr(encoder, "aux_weight", 0.0)) <= 0:
        return None
    logits, labels = output.extras.get("aux_logits"), output.extras.get("aux_labels")
    if logits is None or labels is None:
        return None
    known = labels >= 0
    if not bool(known.any()):
        return torch.zeros(3, dtype=torch.float64)
    logits, labels = logits[known].float(), labels[known]
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(dim=-1) == labels).sum()
    return torch.stack([ce.detach().double(), correct.double(), known.sum().double()]).cpu()


def parameter_groups(module: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Trainable parameters as optimizer groups: unfrozen pretrained backbones of encoders that set
    `backbone_lr_scale` train at ``lr * scale`` (fine-tuning gently), everything else at `lr` (group 0)."""
    scale_of: dict[int, float] = {}
    for sub in module.modules():
        scale = float(getattr(sub, "backbone_lr_scale", 1.0)) if isinstance(sub, Encoder) else 1.0
        if scale == 1.0 or not sub.backbone_trainable:
            continue
        for name in sub.pretrained_modules:
            part = sub.get_submodule(name) if _has_submodule(sub, name) else None
            for p in part.parameters() if part is not None else ():
                scale_of[id(p)] = scale
    by_scale: dict[float, list[nn.Parameter]] = {1.0: []}
    for p in module.parameters():
        if p.requires_grad:
            by_scale.setdefault(scale_of.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in by_scale.items() if ps]


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        return module.get_submodule(name) is not None
    except AttributeError:
        return False


def _load_partial(module: nn.Module, state: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Load `state` (a checkpoint's subset of `module`'s tensors: frozen pretrained parts may be left out)."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{where}: tensors {unexpected[:3]} do not belong to this model",
                              hint="the run folder holds another model; pass --no-resume or another --name")
    module.load_state_dict(dict(state), strict=False)


def split_digest(bundle: Any) -> str:
    """Hash of which clips are in which split: a branch trained on another split must not be reused
    (its training clips could be test clips now)."""
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(f"[{split}]".encode())
        for sample in bundle.splits.get(split, []):
            h.update(sample.id.encode() + b"\0")
    return h.hexdigest()[:16]


def branch_fingerprint(config: RunConfig, bundle: Any = None) -> str:
    """Everything that shapes a branch run's result (not its name, folder or device); with `bundle`,
    also its split."""
    return config_hash({
        "stage": "branch",
        "data": config.data.model_dump(mode="json"),
        "split": split_digest(bundle) if bundle is not None else None,
        "branches": {k: v.model_dump(mode="json") for k, v in config.branches.items()},
        "loss": config.loss.model_dump(mode="json"),
        "train": train_settings(config.train),
    })


def fusion_fingerprint(config: RunConfig, branch_checkpoints: Mapping[str, str], bundle: Any) -> str:
    fusion_train = config.fusion_train or config.train
    return config_hash({
        "stage": "fusion",
        "data": config.data.model_dump(mode="json"),
        "split": split_digest(bundle),
        "branch_checkpoints": dict(branch_checkpoints),
        "fusion": config.fusion.model_dump(mode="json") if config.fusion else None,
        "inputs": [config.fusion_inputs, config.fusion_folds] if config.fusion_inputs != "in-sample" else None,
        "loss": (config.fusion_loss or config.loss).model_dump(mode="json"),
        "train": train_settings(fusion_train),
    })


def _finished_result(run_dir: Path, fingerprint: str) -> RunResult | None:
    """The result of a finished run with this fingerprint, if `run_dir` holds one."""
    path = run_dir / RESULT_FILE
    if not path.is_file() or not (run_dir / f"{MODEL_FILE}.safetensors").is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if data.get("fingerprint") != fingerprint or not data.get("finished"):
        return None
    history = [json.loads(line) for line in (run_dir / HISTORY_FILE).read_text(encoding="utf-8").splitlines() if line.strip()] \
        if (run_dir / HISTORY_FILE).is_file() else []
    branches = {b: _finished_result(Path(d), fp) for b, (d, fp) in data.get("branch_runs", {}).items()}
    if any(r is None for r in branches.values()):
        return None
    return RunResult(run_dir, run_dir / f"{MODEL_FILE}.safetensors", data["metrics"], history,
                     data.get("fusion_report"), branches)  # type: ignore[arg-type]


def _write_result(run_dir: Path, result: RunResult, fingerprint: str, branch_runs: Mapping[str, tuple[str, str]] | None = None) -> None:
    payload = {**result.to_json(), "fingerprint": fingerprint, "finished": True, "branch_runs": dict(branch_runs or {})}
    atomic_write_bytes(run_dir / RESULT_FILE, json.dumps(payload, indent=2, sort_keys=True).encode())


def _final_metrics(task: FitTask, loss_fn: Loss, num_classes: int, ctx: DistContext, precision: Precision,
                   bundle: Any) -> dict[str, dict[str, float]]:
    return {split: evaluate_task(task, split, loss_fn, num_classes, ctx, precision)[0]
            for split in SPLITS if bundle.splits.get(split)}


def train_branch(config: RunConfig, bundle: Any, run_dir: Path, *, registry: Registry, ctx: DistContext, resume: bool,
                 progress: bool, on_epoch: Callable[[int, dict], None] | None = None) -> RunResult:
    """Stage 1: train `config`'s single branch and save it as a complete model."""
    fingerprint = branch_fingerprint(config, bundle)
    if resume:
        done = _finished_result(run_dir, fingerprint)
        if done is not None:
            return done
    (branch, _), = config.branches.items()
    label_names = list(bundle.label_names)
    num_classes = len(label_names)
    seed_everything(config.train.seed)
    model = build_model(config.model_copy(update={"fusion": None}), num_classes, registry=registry).to(ctx.device)
    loss_fn = build_loss(config.loss, num_classes, _class_counts(bundle), registry=registry)
    cache = _open_cache(config)
    encoder = model.branches[branch]
    ensure_extracted(encoder, cache, bundle, splits=SPLITS, batch_size=config.train.batch_size * EVAL_BATCH_FACTOR,
                     seed=config.train.seed, num_workers=config.train.num_workers, ctx=ctx, progress=progress)
    task = BranchTask(model, bundle, cache, config.train, ctx)
    normalizer = _normalizer_state(bundle)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.toml", to_toml(config).encode())

    def save_best(epoch: int, val: dict) -> None:
        save_model(run_dir / MODEL_FILE, model, config, label_names, normalizer_state=normalizer,
                   metrics={"val": val, "epoch": epoch}, registry=registry)

    settings = FitSettings(stage=f"branch {branch}", train=config.train, num_classes=num_classes, run_dir=run_dir,
                           fingerprint=fingerprint, resume=resume, progress=progress, find_unused_parameters=True)
    outcome = fit(task, loss_fn, settings, ctx, on_epoch=on_epoch, on_improve=save_best)
    precision = resolve_precision(config.train.precision, ctx.device)
    metrics = _final_metrics(task, loss_fn, num_classes, ctx, precision, bundle)
    result = RunResult(run_dir, run_dir / f"{MODEL_FILE}.safetensors", metrics, outcome.history)
    if ctx.is_main:
        save_model(run_dir / MODEL_FILE, model, config, label_names, normalizer_state=normalizer,
                   metrics={**metrics, "best_epoch": outcome.best_epoch}, registry=registry)
        _write_result(run_dir, result, fingerprint)
    ctx.barrier()
    return result


def _class_counts(bundle: Any) -> torch.Tensor:
    return torch.as_tensor(bundle.class_counts("train"))


def _normalizer_state(bundle: Any) -> dict[str, torch.Tensor] | None:
    normalizer = getattr(bundle, "normalizer", None)
    return normalizer.state_dict() if normalizer is not None else None


# =================================================================================================
# Stage 2: the fusion over frozen branches' cached outputs
# =================================================================================================
@dataclass
class BranchOutputs:
    """One split's frozen branch outputs, aligned by sample: what the fusion trains on."""

    ids: list[str]
    labels: torch.Tensor
    logits: dict[str, torch.Tensor]
    embedding: dict[str, torch.Tensor | None]
    present: dict[str, torch.Tensor]

    def take(self, index: torch.Tensor) -> "BranchOutputs":
        """The rows at `index` (a 1-d long tensor), in that order."""
        return BranchOutputs(
            ids=[self.ids[i] for i in index.tolist()],
            labels=self.labels[index],
            logits={b: t[index] for b, t in self.logits.items()},
            embedding={b: (t[index] if t is not None else None) for b, t in self.embedding.items()},
            present={b: t[index] for b, t in self.present.items()},
        )

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: torch.Tensor, branches: Sequence[str], device: torch.device) -> list[EncoderOutput]:
        out = []
        for b in branches:
            emb = self.embedding[b]
            out.append(EncoderOutput(
                logits=self.logits[b][index].to(device),
                embedding=emb[index].to(device) if emb is not None else None,
                present=self.present[b][index].to(device),
            ))
        return out


def outputs_namespace(branch: str, encoder: Encoder, checkpoint_sha: str) -> str:
    from emofuse.core.data.cache import encoder_namespace

    return f"outputs-{branch}-{encoder_namespace(encoder)}-{checkpoint_sha[:12]}"


def compute_branch_outputs(
    encoders: Mapping[str, Encoder], checkpoint_sha: Mapping[str, str], bundle: Any, cache: Any, *, split: str,
    batch_size: int, seed: int, num_workers: int, ctx: DistContext, progress: bool,
) -> BranchOutputs:
    """Every frozen branch's outputs over `split`, from the cache where it has them, else computed
    once (backbone features from the feature cache) and stored."""
    from emofuse.core.data.cache import batch_keys

    order = [s.id for s in bundle.splits[split]]
    position = {sid: i for i, sid in enumerate(order)}
    n = len(order)
    labels = torch.full((n,), -1, dtype=torch.long)
    seen = torch.zeros(n, dtype=torch.bool)
    logits: dict[str, torch.Tensor] = {}
    embedding: dict[str, torch.Tensor | None] = {}
    present: dict[str, torch.Tensor] = {}
    alone = DistContext(device=ctx.device)
    for name, encoder in encoders.items():
        encoder.eval()
        namespace = outputs_namespace(name, encoder, checkpoint_sha[name])
        rows: dict[int, dict[str, torch.Tensor]] = {}
        loader = split_batches(bundle, split, modalities=light_modalities(encoder), batch_size=batch_size,
                               shuffle=False, seed=seed, epoch=0, ctx=alone, num_workers=num_workers)
        with _simple_progress(f"branch {name}: outputs on {split}", len(loader), progress) as tick, torch.no_grad():
            for batch in loader:
                keys = batch_keys(batch, encoder.modalities)
                for i, sid in enumerate(batch.ids):
                    labels[position[sid]] = int(batch.labels[i])
                    seen[position[sid]] = True
                values = cache.get_many(namespace, keys)
                if any(v is None for v in values):  # score the batch once and keep its outputs
                    batch = batch.to(ctx.device)
                    out = encoder(batch, cache.extract(encoder, batch) if encoder.cacheable else None)
                    present_b = out.presence()
                    values = []
                    for i in range(len(batch)):
                        v = {"logits": out.logits[i].float().cpu(), "present": present_b[i].cpu().to(torch.uint8)}
                        if out.embedding is not None:
                            v["embedding"] = out.embedding[i].float().cpu()
                        values.append(v)
                    cache.put_many(namespace, keys, values)
                rows.update({position[sid]: v for sid, v in zip(batch.ids, values)})
                tick()
        num_classes = encoder.num_classes
        logits[name] = torch.zeros(n, num_classes)
        present[name] = torch.zeros(n, dtype=torch.bool)
        has_emb = any("embedding" in v for v in rows.values())
        embedding[name] = torch.zeros(n, encoder.embedding_dim) if has_emb else None
        for i, v in rows.items():
            logits[name][i] = v["logits"]
            present[name][i] = bool(v["present"])
            if has_emb and "embedding" in v:
                embedding[name][i] = v["embedding"]  # type: ignore[index]
    keep = seen.nonzero().squeeze(1)  # clips no branch could load (skipped as bad) are left out
    return BranchOutputs(ids=order, labels=labels, logits=logits, embedding=embedding, present=present).take(keep)


class FusionTask:
    """Trains a fusion over cached branch outputs: batches are index sets into in-memory tensors."""

    def __init__(self, fusion: Fusion, outputs: Mapping[str, BranchOutputs], branches: Sequence[str],
                 cfg: TrainConfig, ctx: DistContext):
        self.module = fusion
        self.outputs, self.branches, self.cfg, self.ctx = outputs, list(branches), cfg, ctx

    def _sampler(self, split: str, *, shuffle: bool, training: bool, batch_size: int) -> ShardedBatchSampler:
        return ShardedBatchSampler(len(self.outputs[split]), batch_size, shuffle=shuffle, seed=self.cfg.seed,
                                   rank=self.ctx.rank, world_size=self.ctx.world_size, drop_small_last=training)

    def train_batches(self, epoch: int) -> Iterable[tuple[str, list[int]]]:
        sampler = self._sampler("train", shuffle=True, training=True, batch_size=self.cfg.batch_size)
        sampler.set_epoch(epoch)
        return [("train", idx) for idx in sampler]

    def num_train_batches(self) -> int:
        return len(self._sampler("train", shuffle=False, training=True, batch_size=self.cfg.batch_size).global_batches())

    def eval_batches(self, split: str) -> Iterable[tuple[str, list[int]]]:
        batch_size = max(256, self.cfg.batch_size)
        return [(split, idx) for idx in self._sampler(split, shuffle=False, training=False, batch_size=batch_size)]

    def prepare(self, batch: tuple[str, list[int]]) -> tuple[list[EncoderOutput], torch.Tensor]:
        split, idx = batch
        index = torch.tensor(idx, dtype=torch.long)
        data = self.outputs[split]
        return data.select(index, self.branches, self.ctx.device), data.labels[index].to(self.ctx.device)

    def forward(self, module: nn.Module, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, labels = prepared
        return module(outputs), labels

    def module_state(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def load_module_state(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_partial(self.module, state, where="fusion state")


def _checkpoint_sha(checkpoint: Path) -> str:
    return checkpoint_sha256(checkpoint)


def branch_run_config(config: RunConfig, branch: str) -> RunConfig:
    """The single-branch run that stage 1 trains for `branch` of a fused `config`."""
    single = config.model_copy(update={
        "branches": {branch: config.branches[branch]}, "fusion": None, "fusion_train": None, "fusion_loss": None,
        "fusion_inputs": "in-sample",
        "search": {}, "branch_train": {}, "train": config.train_for(branch),
    })
    fp = branch_fingerprint(single)
    return single.model_copy(update={"name": f"{branch}-{fp[:12]}", "output_dir": Path(config.output_dir) / BRANCHES_DIR,
                                     "cache_dir": config.cache_dir if config.cache_dir is not None
                                     else Path(config.output_dir) / ".cache"})


def train_fused(config: RunConfig, bundle: Any, run_dir: Path, *, registry: Registry, ctx: DistContext, resume: bool,
                progress: bool, on_epoch: Callable[[int, dict], None] | None = None) -> RunResult:
    """Stage 1 for every branch, then stage 2: the fusion over their frozen, cached outputs."""
    label_names = list(bundle.label_names)
    num_classes = len(label_names)
    branch_results: dict[str, RunResult] = {}
    branch_runs: dict[str, tuple[str, str]] = {}
    for name in config.branches:
        bcfg = branch_run_config(config, name)
        bdir = Path(bcfg.output_dir) / bcfg.name
        branch_results[name] = train_branch(bcfg, bundle, bdir, registry=registry, ctx=ctx, resume=resume,
                                            progress=progress)
        branch_runs[name] = (str(bdir), branch_fingerprint(bcfg, bundle))

    shas = {b: _checkpoint_sha(r.checkpoint) for b, r in branch_results.items()}
    fingerprint = fusion_fingerprint(config, shas, bundle)
    if resume:
        done = _finished_result(run_dir, fingerprint)
        if done is not None:
            return done
    fusion_cfg = config.fusion_train or config.train
    cache = _open_cache(config)

    def outputs_of(checkpoints: Mapping[str, Path], data: Any, splits: Sequence[str]) -> tuple[dict, dict]:
        """Frozen encoders from `checkpoints` and their outputs over `splits` of `data`."""
        encoders: dict[str, Encoder] = {}
        checkpoint_shas: dict[str, str] = {}
        for name, checkpoint in checkpoints.items():
            loaded = load_model(checkpoint, registry=registry)  # verified against its sha256 on load
            encoder = loaded.model.branches[name].to(ctx.device).eval()
            encoder.requires_grad_(False)
            encoders[name] = encoder
            checkpoint_shas[name] = loaded.meta.get("sha256") or _checkpoint_sha(checkpoint)
            ensure_extracted(encoder, cache, data, splits=splits, batch_size=config.train.batch_size * EVAL_BATCH_FACTOR,
                             seed=config.train.seed, num_workers=config.train.num_workers, ctx=ctx, progress=progress)
        outputs: dict[str, BranchOutputs] = {}
        for split in splits:
            if not data.splits.get(split):
                continue
            # Rank 0 computes (or reads) and caches; the other ranks then read the very same tensors.
            for turn in ("main", "others"):
                if ctx.is_main == (turn == "main"):
                    outputs[split] = compute_branch_outputs(
                        encoders, checkpoint_shas, data, cache, split=split,
                        batch_size=config.train.batch_size * EVAL_BATCH_FACTOR, seed=config.train.seed,
                        num_workers=config.train.num_workers, ctx=ctx, progress=progress and ctx.is_main)
                ctx.barrier()
        return encoders, outputs

    encoders, outputs = outputs_of({b: r.checkpoint for b, r in branch_results.items()}, bundle, SPLITS)
    if config.fusion_inputs == "out-of-fold" and outputs.get("train") is not None:
        from emofuse.core.engine.cross_fitting import out_of_fold_outputs

        outputs["train"] = out_of_fold_outputs(
            config, bundle,
            train_branch_copy=lambda bcfg, data: train_branch(
                bcfg, data, Path(bcfg.output_dir) / bcfg.name, registry=registry, ctx=ctx, resume=resume,
                progress=progress).checkpoint,
            outputs_of=lambda checkpoints, data: outputs_of(checkpoints, data, ["train"])[1]["train"],
        )

    seed_everything(fusion_cfg.seed)
    infos = [branch_info(name, enc) for name, enc in encoders.items()]
    fusion = build_fusion(config.fusion, num_classes, infos, registry=registry)  # type: ignore[arg-type]
    loss_fn = build_loss(config.fusion_loss or config.loss, num_classes, _class_counts(bundle), registry=registry)
    task = FusionTask(fusion, outputs, list(encoders), fusion_cfg, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.toml", to_toml(config).encode())
    settings = FitSettings(stage=f"fusion {config.fusion.name}", train=fusion_cfg, num_classes=num_classes,  # type: ignore[union-attr]
                           run_dir=run_dir, fingerprint=fingerprint, resume=resume, progress=progress)
    outcome = fit(task, loss_fn, settings, ctx, on_epoch=on_epoch)
    precision = resolve_precision(fusion_cfg.precision, ctx.device)
    metrics = _final_metrics(task, loss_fn, num_classes, ctx, precision, bundle)
    report = name_report(fusion.report(), label_names)
    composed = ComposedModel({name: enc.cpu() for name, enc in encoders.items()}, fusion.cpu())
    result = RunResult(run_dir, run_dir / f"{MODEL_FILE}.safetensors", metrics, outcome.history, report, branch_results)
    if ctx.is_main:
        save_model(run_dir / MODEL_FILE, composed, config, label_names, normalizer_state=_normalizer_state(bundle),
                   metrics={**metrics, "best_epoch": outcome.best_epoch,
                            "branches": {b: r.metrics for b, r in branch_results.items()}},
                   extra={"fusion_report": report}, registry=registry)
        _write_result(run_dir, result, fingerprint, branch_runs)
    ctx.barrier()
    return result


# =================================================================================================
# The entry point
# =================================================================================================
def load_bundle(config: RunConfig, registry: Registry, run_dir: Path) -> Any:
    from emofuse.core.data.pipeline import load_data

    return load_data(config.data, required_modalities(config, registry), registry, split_dir=run_dir)


def check_branch_inputs(config: RunConfig, bundle: Any, registry: Registry) -> None:
    """Refuse to train a branch whose primary modality (its first) no training clip has: it would
    learn from its side inputs alone and pretend to be, say, a video model."""
    train = bundle.splits.get("train", [])
    for branch, modalities in branch_modalities(config, registry).items():
        primary = modalities[0] if modalities else None
        if primary is not None and not any(s.has(primary) for s in train):
            name = config.branches[branch].name
            raise DataError(
                config.data.dataset,
                f"branch {branch!r} ({name}) reads {primary}, but no training clip of this corpus has {primary}",
                hint=f"use a corpus with {primary} (--data/--dataset), or another encoder, e.g. --encoder {branch}=features",
            )


def train_run(
    config: RunConfig,
    *,
    registry: Registry | None = None,
    resume: bool = True,
    progress: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None,
    data: Any = None,
) -> RunResult:
    """Train what `config` describes, staged when it fuses branches; see the module docstring.

    `on_epoch(epoch, val_metrics)` is called after each epoch of the last stage (the fusion, or the
    single branch); it may raise (e.g. ``optuna.TrialPruned``) to stop the run. `data` is a loaded
    `DataBundle` to reuse across calls. Under torchrun every process calls this; rank 0 writes.
    """
    registry = registry or get_registry()
    if not config.branches:
        raise ConfigError("branches: no branch configured", hint="use --preset NAME or --encoder NAME")
    if config.fusion is None and len(config.branches) > 1:
        raise ConfigError(f"{len(config.branches)} branches ({', '.join(config.branches)}) but no fusion",
                          hint="choose one with --fusion NAME (see `emofuse plugins`)")
    run_dir = Path(config.output_dir) / config.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{run_dir}: output folder cannot be created or written ({exc.strerror})",
                          hint="choose another --output folder") from None
    ctx = setup_distributed(config.train.device)
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(threads_beside_workers(config.train.num_workers, ctx.device))
        bundle = data if data is not None else load_bundle(config, registry, run_dir)
        check_branch_inputs(config, bundle, registry)
        if config.fusion is None:
            return train_branch(config, bundle, run_dir, registry=registry, ctx=ctx, resume=resume,
                                progress=progress, on_epoch=on_epoch)
        return train_fused(config, bundle, run_dir, registry=registry, ctx=ctx, resume=resume, progress=progress,
                           on_epoch=on_epoch)
    finally:
        stack.close()
        teardown_distributed(ctx)


@contextlib.contextmanager
def threads_beside_workers(num_workers: int, device: torch.device) -> Iterator[None]:
    """On CPU, leave a core to each DataLoader worker: torch's threads fighting the decoding workers
    for the same cores was measured as the slowest stage (benchmarks/run_all.py). A thread count the
    user chose (``--threads`` / ``EMOFUSE_THREADS``) is kept as it is."""
    if num_workers <= 0 or device.type != "cpu" or os.environ.get("EMOFUSE_THREADS"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - num_workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = [
    "RunResult",
    "train_run",
    "fit",
    "FitSettings",
    "FitOutcome",
    "EarlyStopping",
    "BranchTask",
    "FusionTask",
    "BranchOutputs",
    "compute_branch_outputs",
    "branch_run_config",
    "seed_everything",
    "name_report",
]
