"""Stage 2: the branches frozen, their outputs cached, and the fusion trained over those tensors
alone (no backbone, no branch, no decoding runs while it trains); optionally over out-of-fold outputs
(`emofuse.core.engine.cross_fitting`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from emofuse.core.checkpoint import atomic_write_bytes, checkpoint_sha256
from emofuse.core.config import RunConfig, TrainConfig, to_toml
from emofuse.core.engine.branch_outputs import BranchOutputs, compute_branch_outputs
from emofuse.core.engine.branch_stage import (
    branch_run_config,
    class_counts,
    final_metrics,
    load_partial,
    normalizer_state,
    train_branch,
)
from emofuse.core.engine.compose import (
    ComposedModel,
    branch_info,
    build_fusion,
    build_loss,
)
from emofuse.core.engine import refit
from emofuse.core.engine.cross_fitting import fold_copies, out_of_fold_outputs
from emofuse.core.engine.distributed import (
    DistContext,
    ShardedBatchSampler,
)
from emofuse.core.engine.fit import EVAL_BATCH_FACTOR, FitSettings, fit, seed_everything
from emofuse.core.engine.loaders import ensure_extracted, feature_store
from emofuse.core.engine.model_io import load_model, save_model
from emofuse.core.engine.precision import resolve_precision
from emofuse.core.engine.run_guard import branch_dir_lock
from emofuse.core.engine.run_files import (
    MODEL_FILE,
    SPLITS,
    RunResult,
    components_code,
    fusion_fingerprint,
    recorded_fingerprint,
    reuse_or_explain,
    write_result,
)
from emofuse.core.interfaces import Encoder, Fusion
from emofuse.core.registry import Registry
from emofuse.core.types import EncoderOutput


def name_report(report: Mapping[str, Any] | None, label_names: Sequence[str]) -> dict[str, Any] | None:
    """A fusion report with per-class lists (``class_bias``) keyed by class name."""
    if report is None:
        return None
    out = dict(report)
    for key, value in report.items():
        if isinstance(value, list) and len(value) == len(label_names) and all(isinstance(v, (int, float)) for v in value):
            out[key] = {name: float(v) for name, v in zip(label_names, value)}
    return out


class FusionTask:
    """Trains a fusion over cached branch outputs: batches are index sets into in-memory tensors."""

    def __init__(self, fusion: Fusion, outputs: Mapping[str, BranchOutputs], branches: Sequence[str],
                 cfg: TrainConfig, ctx: DistContext):
        self.module = fusion
        self.outputs, self.branches, self.cfg, self.ctx = outputs, list(branches), cfg, ctx
        self.last_aux_loss = self.last_aux_counts = None  # a fusion has no auxiliary head

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

    def prepare(self, batch: tuple[str, list[int]]) -> tuple[dict[str, EncoderOutput], torch.Tensor]:
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
        load_partial(self.module, state, where="fusion state")


def checkpoint_sha(checkpoint: Path) -> str:
    return checkpoint_sha256(checkpoint)


def copy_config(copy: RunConfig, plan: refit.FusionRefit | None) -> RunConfig:
    """An out-of-fold branch copy's run config (refit per `plan` when the run refits)."""
    return plan.copy_config(copy) if plan is not None else copy


def shared_branch_runs(config: RunConfig, bundle: Any,
                       branch_results: Mapping[str, RunResult] | None = None) -> list[tuple[RunConfig, Any]]:
    """The branch runs that every fusion over `config`'s branches needs besides the branches
    themselves: the out-of-fold copies (run config, bundle), so a comparison can train them once,
    before any fusion. With refit, also the copies refit on folds of train + validation, given the
    refit branches' `branch_results` (their epoch counts)."""
    if config.fusion_inputs != "out-of-fold":
        return []
    runs = [(bcfg, fold.bundle) for fold in fold_copies(refit.selection_config(config), bundle)
            for bcfg in fold.configs.values()]
    if refit.wanted(config) and branch_results is not None:
        epochs = refit.branch_epochs(branch_results)
        runs += [(refit.refit_copy(bcfg, epochs), fold.bundle)
                 for fold in fold_copies(config, refit.train_and_validation(bundle)) for bcfg in fold.configs.values()]
    return runs


def frozen_outputs(config: RunConfig, checkpoints: Mapping[str, Path], data: Any, splits: Sequence[str], *, cache: Any,
                   registry: Registry, ctx: DistContext, progress: bool = False) -> tuple[dict, dict]:
    """Frozen encoders from `checkpoints` and their outputs over `splits` of `data` (computed once, then read
    from `cache`)."""
    encoders: dict[str, Encoder] = {}
    checkpoint_shas: dict[str, str] = {}
    for name, checkpoint in checkpoints.items():
        loaded = load_model(checkpoint, registry=registry)  # verified against its sha256 on load
        encoder = loaded.model.branches[name].to(ctx.device).eval()
        encoder.requires_grad_(False)
        encoders[name] = encoder
        checkpoint_shas[name] = loaded.meta.get("sha256") or checkpoint_sha(checkpoint)
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
        with branch_dir_lock(bdir, ctx):  # shared by runs with the same branch: one trains it, the others reuse it
            branch_results[name] = train_branch(bcfg, bundle, bdir, registry=registry, ctx=ctx, resume=resume,
                                                progress=progress)
        branch_runs[name] = (str(branch_results[name].run_dir), recorded_fingerprint(branch_results[name].run_dir))

    shas = {b: checkpoint_sha(r.checkpoint) for b, r in branch_results.items()}
    plan = refit.plan_fusion(config, bundle, branch_results, train_selection=lambda cfg: train_fused(
        cfg, bundle, run_dir / refit.SELECTION_DIR, registry=registry, ctx=ctx, resume=resume, progress=progress,
        on_epoch=on_epoch)) if refit.wanted(config) else None
    fit_bundle = plan.bundle if plan is not None else bundle
    fusion_cfg = plan.fusion_train if plan is not None else (config.fusion_train or config.train)
    code = components_code(config, registry)
    fingerprint = fusion_fingerprint(config.model_copy(update={"fusion_train": fusion_cfg}), shas, fit_bundle, code)
    if resume:
        done = reuse_or_explain(run_dir, fingerprint, code, "fused run")
        if done is not None:
            return done
    cache = feature_store(config, bundle)

    def outputs_of(checkpoints: Mapping[str, Path], data: Any, splits: Sequence[str]) -> tuple[dict, dict]:
        return frozen_outputs(config, checkpoints, data, splits, cache=cache, registry=registry, ctx=ctx,
                              progress=progress)

    checkpoints = {b: r.checkpoint for b, r in branch_results.items()}
    encoders, outputs = outputs_of(checkpoints, bundle, SPLITS)
    if plan is not None and config.fusion_inputs == "in-sample":
        outputs["train"] = outputs_of(checkpoints, fit_bundle, ["train"])[1]["train"]
    if config.fusion_inputs == "out-of-fold" and outputs.get("train") is not None:
        outputs["train"] = out_of_fold_outputs(
            config, fit_bundle,
            train_branch_copy=lambda bcfg, data: train_branch(
                copy_config(bcfg, plan), data, Path(bcfg.output_dir) / copy_config(bcfg, plan).name,
                registry=registry, ctx=ctx, resume=resume, progress=progress).checkpoint,
            outputs_of=lambda checkpoints, data: outputs_of(checkpoints, data, ["train"])[1]["train"],
        )

    seed_everything(fusion_cfg.seed)
    infos = [branch_info(name, enc) for name, enc in encoders.items()]
    fusion = build_fusion(config.fusion, num_classes, infos, registry=registry)  # type: ignore[arg-type]
    loss_fn = build_loss(config.fusion_loss or config.loss, num_classes, class_counts(fit_bundle), registry=registry,
                         where="fusion_loss" if config.fusion_loss is not None else "loss")
    task = FusionTask(fusion, outputs, list(encoders), fusion_cfg, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.toml", to_toml(config).encode())
    settings = FitSettings(stage=f"fusion {config.fusion.name}", train=fusion_cfg, num_classes=num_classes,  # type: ignore[union-attr]
                           run_dir=run_dir, fingerprint=fingerprint, resume=resume, progress=progress)
    outcome = fit(task, loss_fn, settings, ctx, on_epoch=on_epoch)
    precision = resolve_precision(fusion_cfg.precision, ctx.device)
    metrics = final_metrics(task, loss_fn, num_classes, ctx, precision, bundle)
    report = name_report(fusion.report(), label_names)
    composed = ComposedModel({name: enc.cpu() for name, enc in encoders.items()}, fusion.cpu())
    result = RunResult(run_dir, run_dir / f"{MODEL_FILE}.safetensors", metrics, outcome.history, report, branch_results)
    if ctx.is_main:
        save_model(run_dir / MODEL_FILE, composed, config, label_names, normalizer_state=normalizer_state(bundle),
                   metrics={**metrics, "best_epoch": outcome.best_epoch,
                            "branches": {b: r.metrics for b, r in branch_results.items()}},
                   extra={"fusion_report": report}, registry=registry)
        write_result(run_dir, result, fingerprint, branch_runs, code=code)
    ctx.barrier()
    return result

