"""Trainer benchmark on real RAVDESS data, in one run:

    HF_HUB_OFFLINE=1 python benchmarks/bench_trainer.py [--epochs 5] [--repeats 5] [--threads 1] [--fused-run runs/NAME]

1. Per-step overhead of `emofuse.core.engine.fit.fit` against a bare PyTorch loop over the same model
   (the `features` branch over the AU + MFCC table, a small MLP: the harshest case, each step is
   cheap) and the same batches (loaded once through the `DataBundle`, same order): AdamW + warm-up /
   cosine schedule in both, no gradient clipping in either. Reported: the training part of the
   trainer's epochs (`train_seconds`: forward, backward, steps and its bookkeeping) against the bare
   loop, and the whole `fit` call (which also validates on one batch and writes the resumable state
   every epoch), in wall-clock and in CPU time (less sensitive to a shared machine). Runs alternate
   trainer / bare loop `--repeats` times and the medians are compared.
2. Fusion training time over cached branch outputs (what `train_run` does) against recomputing the
   frozen branches each epoch (every batch decoded and run through both branches, backbone features
   from the feature cache). Both use `fit`, the same fusion (enhanced-late), loss and schedule.
   The branches come from `--fused-run` (a finished fused run) or are trained here on AU + MFCC
   features.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from emofuse.core.engine.compose import branch_info, build_fusion, build_loss, build_model
from emofuse.core.config import RunConfig, TrainConfig, validate
from emofuse.core.data.pipeline import load_data
from emofuse.core.engine.distributed import DistContext
from emofuse.core.engine.model_io import load_model
from emofuse.core.registry import get_registry
from emofuse.core.engine.schedule import warmup_decay
from emofuse.core.engine.run_files import SPLITS
from emofuse.core.engine.branch_stage import BranchTask
from emofuse.core.engine.fit import FitSettings, fit, fused_supported, seed_everything
from emofuse.core.engine.fusion_stage import FusionTask, checkpoint_sha
from emofuse.core.engine.loaders import open_cache, ensure_extracted, light_modalities, split_batches
from emofuse.core.engine.branch_outputs import compute_branch_outputs
from emofuse.core.engine.training import train_run


# -- 1. trainer overhead ---------------------------------------------------------------------------
def overhead_config(out: Path, epochs: int, batch_size: int) -> RunConfig:
    return validate({
        "name": "overhead", "output_dir": str(out), "data": {"dataset": "ravdess"},
        "branches": {"video": {"name": "features", "features": ["au", "mfcc"], "hidden_dims": [256, 128]}},
        "train": {"epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "max_grad_norm": None, "seed": 0,
                  "device": "cpu", "patience": 1000},
    })


def bare_loop(config: RunConfig, bundle: Any, batches: list) -> tuple[float, float]:
    """(wall, CPU) seconds of `epochs` epochs of the plainest loop: forward, loss, backward, AdamW, scheduler."""
    registry = get_registry()
    seed_everything(config.train.seed)
    model = build_model(config, bundle.num_classes, registry=registry)
    loss_fn = build_loss(config.loss, bundle.num_classes, bundle.class_counts("train"), registry=registry)
    model.eval()
    with torch.no_grad():
        model(batches[0][0])  # lazy layers take their shapes, as the trainer does before its optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay,
                            fused=fused_supported(params))  # the trainer's optimizer, so only its overhead differs
    sched = warmup_decay(opt, len(batches[0]) * config.train.epochs, config.train.warmup_fraction,
                         config.train.lr_decay)
    model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    for epoch in range(config.train.epochs):
        for batch in batches[epoch]:
            logits, _ = model(batch)
            loss = loss_fn(logits, batch.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - wall, time.process_time() - cpu


class PreloadedTask(BranchTask):
    """The trainer's branch task over batches loaded once, so both loops time the same work; its
    per-epoch validation scores one preloaded batch (the trainer still runs it, and checkpoints)."""

    def __init__(self, *args: Any, batches: list, val_batch: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.batches, self.val_batch = batches, val_batch

    def train_batches(self, epoch: int) -> list:
        return self.batches[epoch]

    def num_train_batches(self) -> int:
        return len(self.batches[0])

    def eval_batches(self, split: str) -> list:
        return [self.val_batch]


def trainer_loop(config: RunConfig, bundle: Any, batches: list, val_batch: Any, run_dir: Path) -> dict[str, float]:
    """Seconds of `fit` over `epochs` epochs: its training part (wall), and the whole call (wall and CPU,
    including the per-epoch one-batch validation and the resumable-state checkpoint)."""
    registry = get_registry()
    seed_everything(config.train.seed)
    model = build_model(config, bundle.num_classes, registry=registry)
    loss_fn = build_loss(config.loss, bundle.num_classes, bundle.class_counts("train"), registry=registry)
    ctx = DistContext()
    task = PreloadedTask(model, bundle, None, config.train, ctx, batches=batches, val_batch=val_batch)
    settings = FitSettings(stage="bench", train=config.train, num_classes=bundle.num_classes, run_dir=run_dir,
                           fingerprint=str(time.time()), resume=False, progress=False)
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = fit(task, loss_fn, settings, ctx)
    return {"train_wall": sum(r["train_seconds"] for r in outcome.history),
            "whole_wall": time.perf_counter() - wall, "whole_cpu": time.process_time() - cpu}


def bench_overhead(bundle: Any, out: Path, *, epochs: int, repeats: int, batch_size: int) -> dict[str, Any]:
    config = overhead_config(out, epochs, batch_size)
    ctx = DistContext()
    mods = {"features", "metadata", "text"}
    batches = [list(split_batches(bundle, "train", modalities=mods, batch_size=batch_size, shuffle=True, seed=0,
                                  epoch=e, ctx=ctx, training=True)) for e in range(epochs)]
    val_batch = next(iter(split_batches(bundle, "val", modalities=mods, batch_size=batch_size, shuffle=False, seed=0,
                                        epoch=0, ctx=ctx)))
    steps = sum(len(b) for b in batches)
    runs: dict[str, list[float]] = {"bare_wall": [], "bare_cpu": [], "train_wall": [], "whole_wall": [], "whole_cpu": []}
    for r in range(repeats):  # alternate, so a busy spell on a shared machine hits both
        t = trainer_loop(config, bundle, batches, val_batch, out / f"trainer-{r}")
        for k, v in t.items():
            runs[k].append(v)
        bare_wall, bare_cpu = bare_loop(config, bundle, batches)
        runs["bare_wall"].append(bare_wall)
        runs["bare_cpu"].append(bare_cpu)
    med = {k: statistics.median(v) for k, v in runs.items()}
    per_step = {k: 1e3 * v / steps for k, v in med.items()}
    return {
        "model": "features (AU + MFCC, MLP 256-128, batch norm, dropout)", "steps": steps, "batch_size": batch_size,
        "epochs": epochs, "repeats": repeats,
        "ms_per_step": per_step,
        "ratio_training_wall": med["train_wall"] / med["bare_wall"],
        "ratio_whole_fit_wall": med["whole_wall"] / med["bare_wall"],
        "ratio_whole_fit_cpu": med["whole_cpu"] / med["bare_cpu"],
        "runs_s": runs,
    }


# -- 2. fusion over cached outputs vs recomputed branches -----------------------------------------
class RecomputeTask(FusionTask):
    """The fusion trained over branch outputs recomputed from the data for every batch of every epoch."""

    def __init__(self, fusion: Any, encoders: dict, bundle: Any, cache: Any, cfg: TrainConfig, ctx: DistContext,
                 outputs: dict):
        super().__init__(fusion, outputs, list(encoders), cfg, ctx)
        self.encoders, self.bundle, self.cache = encoders, bundle, cache
        self.modalities = set().union(*(light_modalities(e) for e in encoders.values()))

    def train_batches(self, epoch: int):
        return split_batches(self.bundle, "train", modalities=self.modalities, batch_size=self.cfg.batch_size,
                             shuffle=True, seed=self.cfg.seed, epoch=epoch, ctx=self.ctx, training=True)

    def prepare(self, batch: Any):
        if isinstance(batch, tuple):  # evaluation batches: the cached outputs (same for both variants)
            return super().prepare(batch)
        batch = batch.to(self.ctx.device)
        with torch.no_grad():
            outs = []
            for enc in self.encoders.values():
                extracted = self.cache.extract(enc, batch) if enc.cacheable else None
                outs.append(enc(batch, extracted))
        return outs, batch.labels


def fused_branches(bundle: Any, out: Path, fused_run: Path | None) -> tuple[RunConfig, dict[str, Path]]:
    if fused_run is not None:
        result = json.loads((fused_run / "result.json").read_text())
        config = load_model(fused_run / "model.safetensors").config
        return config, {b: Path(d) / "model.safetensors" for b, (d, _) in result["branch_runs"].items()}
    config = validate({
        "name": "fused", "output_dir": str(out), "data": {"dataset": "ravdess"},
        "branches": {"video": {"name": "features", "features": ["au"]},
                     "audio": {"name": "features", "features": ["mfcc"]}},
        "fusion": {"name": "enhanced-late"}, "loss": {"name": "focal", "gamma": 2.0},
        "train": {"epochs": 5, "batch_size": 32, "seed": 0, "device": "cpu"},
    })
    result = train_run(config, data=bundle, progress=False)
    return config, {b: r.checkpoint for b, r in result.branch_results.items()}


def bench_fusion(bundle: Any, out: Path, *, epochs: int, fused_run: Path | None) -> dict[str, Any]:
    registry = get_registry()
    config, checkpoints = fused_branches(bundle, out, fused_run)
    config = config.model_copy(update={"output_dir": out, "cache_dir": config.cache_dir or (
        fused_run.parent / ".cache" if fused_run else out / ".cache")})
    ctx = DistContext()
    encoders = {}
    for name, ckpt in checkpoints.items():
        enc = load_model(ckpt, registry=registry).model.branches[name].eval()
        enc.requires_grad_(False)
        encoders[name] = enc
    shas = {b: checkpoint_sha(p) for b, p in checkpoints.items()}
    cache = open_cache(config)
    for enc in encoders.values():
        ensure_extracted(enc, cache, bundle, splits=SPLITS, batch_size=32, seed=0, num_workers=0, ctx=ctx,
                         progress=False)
    start = time.perf_counter()
    outputs = {s: compute_branch_outputs(encoders, shas, bundle, cache, split=s, batch_size=32, seed=0, num_workers=0,
                                         ctx=ctx, progress=False) for s in SPLITS}
    outputs_load_s = time.perf_counter() - start
    fusion_cfg = (config.fusion_train or config.train).model_copy(update={"epochs": epochs, "patience": 10_000,
                                                                         "device": "cpu"})
    timings = {}
    for variant in ("cached", "recomputed"):
        seed_everything(fusion_cfg.seed)
        fusion = build_fusion(config.fusion, bundle.num_classes, [branch_info(n, e) for n, e in encoders.items()],
                              registry=registry)
        loss_fn = build_loss(config.loss, bundle.num_classes, bundle.class_counts("train"), registry=registry)
        task = FusionTask(fusion, outputs, list(encoders), fusion_cfg, ctx) if variant == "cached" else \
            RecomputeTask(fusion, encoders, bundle, cache, fusion_cfg, ctx, outputs)
        settings = FitSettings(stage=variant, train=fusion_cfg, num_classes=bundle.num_classes,
                               run_dir=out / f"fusion-{variant}", fingerprint=variant, resume=False, progress=False)
        outcome = fit(task, loss_fn, settings, ctx)
        timings[variant] = {
            "train_s_per_epoch": statistics.mean(r["train_seconds"] for r in outcome.history),
            "epoch_s": statistics.mean(r["seconds"] for r in outcome.history),
            "final_weights": fusion.report()["weights"],
        }
    return {
        "branches": {b: enc.name for b, enc in encoders.items()},
        "fusion": config.fusion.name, "batch_size": fusion_cfg.batch_size, "epochs": epochs,
        "branch_outputs_from_cache_s": outputs_load_s,
        **timings,
        "speedup_per_epoch": timings["recomputed"]["train_s_per_epoch"] / timings["cached"]["train_s_per_epoch"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fusion-epochs", type=int, default=3)
    parser.add_argument("--fused-run", type=Path, default=None, help="a finished fused run whose branches to use")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers here as JSON")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steadiest on a shared machine, where idle-spinning "
                             "OpenMP threads make small steps many times slower)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = load_data(validate({"data": {"dataset": "ravdess"}}).data,
                           {"features", "metadata", "text", "audio"}, get_registry())
        report = {
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "overhead": bench_overhead(bundle, work / "overhead", epochs=args.epochs, repeats=args.repeats,
                                       batch_size=args.batch_size),
            "fusion": bench_fusion(bundle, work / "fusion", epochs=args.fusion_epochs, fused_run=args.fused_run),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    o, f = report["overhead"], report["fusion"]
    ms = o["ms_per_step"]
    print(f"\ntrainer {ms['train_wall']:.3f} ms/step (whole fit {ms['whole_wall']:.3f}) vs bare loop "
          f"{ms['bare_wall']:.3f} ms/step: ratio {o['ratio_training_wall']:.3f} (whole fit: wall "
          f"{o['ratio_whole_fit_wall']:.3f}, CPU {o['ratio_whole_fit_cpu']:.3f})")
    print(f"fusion epoch over cached outputs {1e3 * f['cached']['train_s_per_epoch']:.1f} ms vs recomputed branches "
          f"{1e3 * f['recomputed']['train_s_per_epoch']:.1f} ms: {f['speedup_per_epoch']:.0f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
