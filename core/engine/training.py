"""The entry point of ``emofuse train``: `train_run` trains what a run config describes.

A config with one branch and no fusion is stage 1 alone (`emofuse.core.engine.branch_stage`). A fused
config is staged as in the reference design: each branch trains alone, then the branches are frozen
and the fusion trains over their cached outputs (`emofuse.core.engine.fusion_stage`). Branch runs live
in ``<output_dir>/branches/<branch>-<hash>`` and are shared by every run with the same settings.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from emofuse.core.config import RunConfig
from emofuse.core.engine.branch_stage import train_branch
from emofuse.core.engine.compose import (
    check_components,
    branch_modalities,
    required_modalities,
)
from emofuse.core.engine.distributed import (
    setup_distributed,
    teardown_distributed,
)
from emofuse.core.engine.fusion_stage import train_fused
from emofuse.core.engine.run_files import RunResult
from emofuse.core.engine.run_guard import guarded_run_dir
from emofuse.core.errors import ConfigError, DataError
from emofuse.core.registry import Registry, get_registry


def load_bundle(config: RunConfig, registry: Registry, run_dir: Path) -> Any:
    from emofuse.core.data.pipeline import load_data

    return load_data(config.data, required_modalities(config, registry), registry, split_dir=run_dir)


def check_branch_inputs(config: RunConfig, bundle: Any, registry: Registry) -> None:
    """Refuse to train a branch whose primary modality (its first) no training clip has: it would
    learn from its side inputs alone and pretend to be, say, a video model. Clips with no branch's
    primary input are refused (or skipped) one by one too."""
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
    if hasattr(bundle, "require_input"):
        bundle.require_input([m[0] for m in branch_modalities(config, registry).values() if m])


def train_run(
    config: RunConfig,
    *,
    registry: Registry | None = None,
    resume: bool = True,
    progress: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None,
    data: Any = None,
    overwrite: bool = False,
) -> RunResult:
    """Train what `config` describes, staged when it fuses branches; see the module docstring.

    `on_epoch(epoch, val_metrics)` is called after each epoch of the last stage (the fusion, or the
    single branch); it may raise (e.g. ``optuna.TrialPruned``) to stop the run. `data` is a loaded
    `DataBundle` to reuse across calls. Under torchrun every process calls this; rank 0 writes.
    The run folder is locked while it trains; a folder holding a run of another config is refused
    unless `overwrite` (see `emofuse.core.engine.run_guard`).
    """
    registry = registry or get_registry()
    if not config.branches:
        raise ConfigError("branches: no branch configured", hint="use --preset NAME or --encoder NAME")
    if config.fusion is None and len(config.branches) > 1:
        raise ConfigError(f"{len(config.branches)} branches ({', '.join(config.branches)}) but no fusion",
                          hint="choose one with --fusion NAME (see `emofuse plugins`)")
    check_components(config, registry)
    run_dir = Path(config.output_dir) / config.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{run_dir}: output folder cannot be created or written ({exc.strerror})",
                          hint="choose another --output folder") from None
    ctx = setup_distributed(config.train.device)
    stack = contextlib.ExitStack()
    try:
        if ctx.is_main:
            stack.enter_context(guarded_run_dir(run_dir, config, overwrite=overwrite))
        stack.enter_context(threads_beside_workers(config.train.num_workers, ctx.device))
        bundle = data if data is not None else load_bundle(config, registry, run_dir)
        check_branch_inputs(config, bundle, registry)
        stage = train_branch if config.fusion is None else train_fused
        result = stage(config, bundle, run_dir, registry=registry, ctx=ctx, resume=resume, progress=progress,
                       on_epoch=on_epoch)
        result.skipped = list(getattr(bundle, "skipped", []))
        return result
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

