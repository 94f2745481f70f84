"""MELD dev: the plain fine-tuning loop, outside emofuse's engine, as a control for `bench_meld.py`.

    HF_HUB_OFFLINE=1 python benchmarks/bench_meld_plain.py [--seeds 0 1 2] [--epochs 2] [--threads 2]

A text encoder (all-mpnet-base-v2 by default), the mean of its token vectors, one linear layer; AdamW at
one learning rate for both, linear warm-up then linear decay, cross-entropy, dev scored after every
pass over train and the best pass reported. Beside it, the same pass scored after post-hoc logit
adjustment (the dev logits minus ``tau * log(train prior)``, tau fixed beforehand at 1, not tuned on
dev): what the rare classes gain without retraining. It is what a researcher would write in an afternoon, so a
gap between it and an emofuse row at the same budget points at the engine or the preset, not at the
encoder. The data are read by emofuse's MELD reader (the same train and dev utterances), the encoder by
its `TextBackbone` (the packaged weights, no pickle, and its mean of token vectors), the seeding by its
`seed_everything`, the schedule's formula by `warmup_decay` (with ``"linear"``); nothing else of emofuse is used.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emofuse.core.data.pipeline import load_data
from emofuse.core.engine.fit import seed_everything
from emofuse.core.engine.schedule import warmup_decay
from emofuse.core.presets import compose_config
from emofuse.core.types import TEXT
from emofuse.plugins.encoders.text_backbone import TextBackbone

from bench_meld import RowResult, dev_scores, posthoc_predictions  # bench_meld's cells, scores and adjustment


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--backbone", default="mpnet", help="a packaged text encoder (minilm, mpnet) or a local folder")
    p.add_argument("--epochs", type=int, default=2, help="passes over MELD train")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up")
    p.add_argument("--posthoc-tau", type=float, default=1.0,
                   help="post-hoc logit adjustment strength for the second set of scores (fixed, not tuned on dev)")
    p.add_argument("--data", type=Path, default=None, help="folder holding meld/ (default ../shared/data)")
    p.add_argument("--limit", type=int, default=None, help="use only this many utterances (a quick check)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("EMOFUSE_THREADS", "0")) or None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


class PooledClassifier(nn.Module):
    """The encoder's masked mean token vector through one linear layer."""

    def __init__(self, backbone: TextBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.linear = nn.Linear(backbone.dim, num_classes)

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.linear(self.backbone.sentence_embeddings(texts))


def dev_logits(model: PooledClassifier, texts: list[str], batch_size: int) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])


def scored_pass(labels: list[int], logits: torch.Tensor, train_counts: torch.Tensor, tau: float) -> dict[str, Any]:
    """Scores of the plain argmax, and under ``adjusted`` those after post-hoc logit adjustment."""
    return {**dev_scores(labels, logits.argmax(-1).tolist()),
            "adjusted": dev_scores(labels, posthoc_predictions(logits, train_counts, tau))}


def run_seed(seed: int, train: list[tuple[str, int]], dev: list[tuple[str, int]], num_classes: int,
             args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    seed_everything(seed)
    model = PooledClassifier(TextBackbone(args.backbone, max_length=args.max_tokens), num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = (len(train) + args.batch_size - 1) // args.batch_size
    total = steps_per_epoch * args.epochs
    schedule = warmup_decay(optimizer, total, args.warmup, "linear")
    rng = np.random.default_rng(seed)
    dev_texts, dev_labels = [t for t, _ in dev], [y for _, y in dev]
    counts = torch.bincount(torch.tensor([y for _, y in train]), minlength=num_classes).float()
    history = []
    for epoch in range(args.epochs):
        model.train()
        order = rng.permutation(len(train))
        for i in range(0, len(order), args.batch_size):
            chunk = [train[j] for j in order[i:i + args.batch_size]]
            logits = model([t for t, _ in chunk])
            loss = nn.functional.cross_entropy(logits, torch.tensor([y for _, y in chunk]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        history.append(scored_pass(dev_labels, dev_logits(model, dev_texts, 4 * args.batch_size), counts, args.posthoc_tau))
        print(f"   seed {seed} pass {epoch + 1}: dev weighted F1 {history[-1]['weighted_f1']:.4f}, "
              f"macro F1 {history[-1]['macro_f1']:.4f}; adjusted {history[-1]['adjusted']['weighted_f1']:.4f}, "
              f"{history[-1]['adjusted']['macro_f1']:.4f}", flush=True)
    best = max(range(len(history)), key=lambda e: history[e]["weighted_f1"])
    return {**history[best], "best_epoch": best + 1, "history": history,
            "seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads()}


def labelled_texts(samples) -> list[tuple[str, int]]:
    return [(s.text or "", int(s.label)) for s in samples if s.label is not None and s.label >= 0]


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    cell = RowResult(key="plain", label="plain", command="", notes="", runs=results).cell
    adjusted = RowResult(key="adjusted", label="adjusted", command="", notes="",
                         runs=[r["adjusted"] for r in results]).cell
    passes = f"{', '.join(str(r['best_epoch']) for r in results)} of {args.epochs}"
    seconds = f"{np.mean([r['seconds'] for r in results]):.0f}"
    lines = [f"# MELD dev: plain fine-tuning loop ({args.backbone}, outside the engine)", "",
             f"`python benchmarks/bench_meld_plain.py --backbone {args.backbone} --epochs {args.epochs} --lr {args.lr} "
             f"--batch-size {args.batch_size} --max-tokens {args.max_tokens} --seeds {' '.join(map(str, args.seeds))}`"
             f" on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads.", "",
             "| seeds | scored | dev weighted F1 % | dev macro F1 % | dev accuracy % | chosen pass | train s / run |",
             "|:---|:---|---:|---:|---:|---:|---:|",
             f"| {', '.join(map(str, args.seeds))} | argmax | {cell('weighted_f1')} | {cell('macro_f1')} | "
             f"{cell('accuracy')} | {passes} | {seconds} |",
             f"| {', '.join(map(str, args.seeds))} | logits − {args.posthoc_tau:g}·log prior | "
             f"{adjusted('weighted_f1')} | {adjusted('macro_f1')} | {adjusted('accuracy')} | {passes} | same run |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = [f"data.data_dir={json.dumps(str(args.data))}"] if args.data else []
    sets += [f"data.limit={args.limit}"] if args.limit else []
    bundle = load_data(compose_config(preset="meld-text", sets=sets).data, {TEXT})
    train, dev = labelled_texts(bundle.splits["train"]), labelled_texts(bundle.splits["val"])
    print(f"MELD: {len(train)} train, {len(dev)} dev utterances", flush=True)
    results = [run_seed(seed, train, dev, bundle.num_classes, args) for seed in args.seeds]
    table = markdown(results, args)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "seeds": results},
                                        indent=1))


if __name__ == "__main__":
    main()
