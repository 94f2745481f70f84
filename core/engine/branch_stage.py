"""Stage 1: one branch (an encoder and its head) trained alone and saved as a complete model."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from emofuse.core.checkpoint import atomic_write_bytes
from emofuse.core.config import RunConfig, TrainConfig, to_toml
from emofuse.core.engine import refit
from emofuse.core.engine.compose import (
    ComposedModel,
    build_loss,
    build_model,
)
from emofuse.core.engine.distributed import (
    DistContext,
    ShardedBatchSampler,
)
from emofuse.core.engine.fit import (
    EVAL_BATCH_FACTOR,
    FitSettings,
    FitTask,
    evaluate_task,
    fit,
    seed_everything,
)
from emofuse.core.engine.encode import extracted_features
from emofuse.core.engine.loaders import (
    base_loader,
    ensure_extracted,
    light_modalities,
    feature_store,
    padding_lengths,
    split_batches,
)
from emofuse.core.engine.model_io import model_state, save_model
from emofuse.core.engine.precision import Precision, resolve_precision
from emofuse.core.engine.run_files import (
    BRANCHES_DIR,
    MODEL_FILE,
    SPLITS,
    RunResult,
    branch_fingerprint,
    components_code,
    reuse_or_explain,
    write_result,
)
from emofuse.core.errors import CheckpointError, PluginError
from emofuse.core.interfaces import Encoder, Loss
from emofuse.core.registry import Registry
from emofuse.core.types import AUDIO, VIDEO, Batch, EncoderOutput


class BranchTask:
    """Trains one encoder (a `ComposedModel` with a single branch) on decoded or cached inputs."""

    def __init__(self, model: ComposedModel, bundle: Any, cache: Any, cfg: TrainConfig, ctx: DistContext):
        self.module = model
        (self.branch, self.encoder), = model.branches.items()
        self.bundle, self.cache, self.cfg, self.ctx = bundle, cache, cfg, ctx
        self.modalities = light_modalities(self.encoder)
        self._num_batches: int | None = None
        #: Set by encoders that need a dialogue's turns together (`emofuse.plugins.encoders.context`).
        self.by_dialogue = bool(self.encoder.batches_by_dialogue)
        self.last_aux_loss: tuple[torch.Tensor, float] | None = None
        #: ``[3]`` float64 (summed cross-entropy, correct, labelled) of the auxiliary head on the latest batch.
        self.last_aux_counts: torch.Tensor | None = None
        #: Each split's padding lengths for `group_by_length` (file sizes or characters), measured once.
        self._lengths: dict[str, list[int]] = {}

    def _batches(self, split: str, *, shuffle: bool, epoch: int, training: bool, batch_size: int) -> Iterable[Batch]:
        if self.by_dialogue:  # context models see whole dialogues, batch_size utterances at most
            from emofuse.core.data.dialogue import dialogue_loader

            return dialogue_loader(self.bundle, split, max_utterances=batch_size, shuffle=shuffle, seed=self.cfg.seed,
                                   modalities=self.modalities, epoch=epoch, num_workers=self.cfg.num_workers,
                                   rank=self.ctx.rank, world_size=self.ctx.world_size)
        lengths = None
        if training and self.cfg.group_by_length:
            if split not in self._lengths:
                self._lengths[split] = padding_lengths(self.bundle.splits[split], set(self.encoder.modalities))
            lengths = self._lengths[split]
        return split_batches(self.bundle, split, modalities=self.modalities, batch_size=batch_size, shuffle=shuffle,
                             seed=self.cfg.seed, epoch=epoch, ctx=self.ctx, num_workers=self.cfg.num_workers,
                             training=training, lengths=lengths)

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        batches = self._batches("train", shuffle=True, epoch=epoch, training=True, batch_size=self.cfg.batch_size)
        return itertools.islice(batches, self.cfg.steps_per_epoch) if self.cfg.steps_per_epoch else batches

    def num_train_batches(self) -> int:
        whole = self._num_whole_epoch_batches()
        return min(whole, self.cfg.steps_per_epoch) if self.cfg.steps_per_epoch else whole

    def _num_whole_epoch_batches(self) -> int:
        if self._num_batches is None and self.by_dialogue:
            from emofuse.core.data.dialogue import DialogueBatchSampler

            self._num_batches = len(DialogueBatchSampler(self.bundle.splits["train"], self.cfg.batch_size,
                                                         shuffle=False, rank=self.ctx.rank,
                                                         world_size=self.ctx.world_size))
        if self._num_batches is None:
            n = len(base_loader(self.bundle, "train", self.modalities, self.cfg.batch_size, self.cfg.seed, 0).dataset)
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
        with torch.no_grad():  # the route every scorer takes (`encode`); the module is DDP-wrapped here
            return batch, {self.branch: extracted_features(self.encoder, batch, self.cache)}

    def forward(self, module: nn.Module, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        batch, extracted = prepared
        try:
            logits, outputs = module(batch, extracted)
        except (AttributeError, TypeError) as exc:
            stripped = [m for m in (VIDEO, AUDIO) if m in self.encoder.modalities and getattr(batch, m) is None]
            if extracted is None or not stripped:
                raise
            raise PluginError(
                f"encoder {self.encoder.name!r} reads media in forward, but its features come from the cache, so the "
                f"batch carries no {' or '.join(stripped)} (None); it raised {type(exc).__name__}: {exc}",
                hint="read media only through self.extracted_for(batch, extracted) (see docs/plugins.md, Encoders)",
            ) from exc
        self.last_aux_loss = auxiliary_loss(outputs[self.branch], self.encoder)
        self.last_aux_counts = auxiliary_counts(outputs[self.branch], self.encoder) if not module.training else None
        return logits, batch.labels

    def module_state(self) -> dict[str, torch.Tensor]:
        return model_state(self.module)

    def load_module_state(self, state: Mapping[str, torch.Tensor]) -> None:
        load_partial(self.module, state, where="branch state")


def auxiliary_loss(output: EncoderOutput, encoder: Encoder) -> tuple[torch.Tensor, float] | None:
    """(cross-entropy, weight) of an encoder's auxiliary head (``extras["aux_logits"]`` / ``["aux_labels"]``,
    see `emofuse.plugins.encoders.auxiliary`), or None when it has none or no sample has an auxiliary label."""
    weight = float(encoder.aux_weight)
    logits, labels = output.extras.get("aux_logits"), output.extras.get("aux_labels")
    if weight <= 0 or logits is None or labels is None or not bool((labels >= 0).any()):
        return None
    return torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-1), weight


def auxiliary_counts(output: EncoderOutput, encoder: Encoder) -> torch.Tensor | None:
    """``[3]`` float64 (summed cross-entropy, correct, labelled) of an encoder's auxiliary head over one
    batch, for exact split-level means (batches differ in how many samples carry the auxiliary label)."""
    if float(encoder.aux_weight) <= 0:
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


def load_partial(module: nn.Module, state: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Load `state` (a checkpoint's subset of `module`'s tensors: frozen pretrained parts may be left out)."""
    own = module.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{where}: tensors {unexpected[:3]} do not belong to this model",
                              hint="the run folder holds another model; pass --no-resume or another --name")
    module.load_state_dict(dict(state), strict=False)


def final_metrics(task: FitTask, loss_fn: Loss, num_classes: int, ctx: DistContext, precision: Precision,
                   bundle: Any) -> dict[str, dict[str, float]]:
    return {split: evaluate_task(task, split, loss_fn, num_classes, ctx, precision)[0]
            for split in SPLITS if bundle.splits.get(split)}


def train_branch(config: RunConfig, bundle: Any, run_dir: Path, *, registry: Registry, ctx: DistContext, resume: bool,
                 progress: bool, on_epoch: Callable[[int, dict], None] | None = None) -> RunResult:
    """Stage 1: train `config`'s single branch and save it as a complete model (with ``train.refit``,
    then again on train + validation: `emofuse.core.engine.refit`)."""
    if refit.wanted(config):
        def stage_one(cfg: RunConfig, data: Any, where: Path) -> RunResult:
            return train_branch(cfg, data, where, registry=registry, ctx=ctx, resume=resume, progress=progress,
                                on_epoch=on_epoch if where == run_dir else None)

        return refit.refit_branch(config, bundle, run_dir, stage_one)
    code = components_code(config, registry)
    fingerprint = branch_fingerprint(config, bundle, code)
    if resume:
        done = reuse_or_explain(run_dir, fingerprint, code, "branch run" if run_dir.parent.name == BRANCHES_DIR else "run")
        if done is not None:
            return done
    (branch, _), = config.branches.items()
    label_names = list(bundle.label_names)
    num_classes = len(label_names)
    seed_everything(config.train.seed)
    model = build_model(config.model_copy(update={"fusion": None}), num_classes, registry=registry).to(ctx.device)
    loss_fn = build_loss(config.loss, num_classes, class_counts(bundle), registry=registry)
    cache = feature_store(config, bundle)
    encoder = model.branches[branch]
    ensure_extracted(encoder, cache, bundle, splits=SPLITS, batch_size=config.train.batch_size * EVAL_BATCH_FACTOR,
                     seed=config.train.seed, num_workers=config.train.num_workers, ctx=ctx, progress=progress)
    task = BranchTask(model, bundle, cache, config.train, ctx)
    normalizer = normalizer_state(bundle)
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
    metrics = final_metrics(task, loss_fn, num_classes, ctx, precision, bundle)
    result = RunResult(run_dir, run_dir / f"{MODEL_FILE}.safetensors", metrics, outcome.history)
    if ctx.is_main:
        save_model(run_dir / MODEL_FILE, model, config, label_names, normalizer_state=normalizer,
                   metrics={**metrics, "best_epoch": outcome.best_epoch}, registry=registry)
        write_result(run_dir, result, fingerprint, code=code)
    ctx.barrier()
    return result


def class_counts(bundle: Any) -> torch.Tensor:
    return torch.as_tensor(bundle.class_counts("train"))


def normalizer_state(bundle: Any) -> dict[str, torch.Tensor] | None:
    normalizer = getattr(bundle, "normalizer", None)
    return normalizer.state_dict() if normalizer is not None else None


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

