"""Dialogue context on MELD, text branch, in one run: dev weighted F1 side by side.

    HF_HUB_OFFLINE=1 python benchmarks/bench_meld.py [--epochs 4] [--finetune-epochs 1] [--finetune-steps 40] [--cache-dir DIR]

MELD transcripts from ``../shared/data/meld`` with the corpus' own partition: train to fit, dev to
choose (the epoch with the best dev weighted F1 is kept and reported; there is no test partition
here). Rows:

1. baseline: mean-pooled MiniLM sentence embeddings + logistic regression (scikit-learn, C chosen on dev)
2. `dialogue-context` over the `mm-lstm` text branch (MiniLM frozen, its token vectors cached), with
   ``direction = "none"`` (no context), ``"causal"`` (past turns only) and ``"bidirectional"``;
   LSTM by default, ``--sequence-model transformer`` for the transformer
3. the same without context but the MiniLM text encoder fine-tuned (unfrozen), its learning rate
   ``--backbone-lr`` below the head's, for ``--finetune-epochs`` epochs

Every model trains on batches of whole dialogues (`DialogueBatchSampler`), with AdamW and plain
cross-entropy; with ``--aux-weight`` > 0 each also learns MELD sentiment as an auxiliary task, whose
loss and dev accuracy are reported on their own.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from emofuse.core.compose import build_encoder
from emofuse.core.config import ComponentRef, DataConfig
from emofuse.core.data.cache import FeatureCache
from emofuse.core.data.dialogue import dialogue_loader
from emofuse.core.data.pipeline import load_data
from emofuse.core.interfaces import Encoder
from emofuse.core.metrics import classification_metrics
from emofuse.core.schedule import warmup_cosine
from emofuse.core.types import TEXT

SENTIMENTS = ["negative", "neutral", "positive"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="folder holding meld/ (default ../shared/data)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of the frozen-encoder models")
    p.add_argument("--finetune-epochs", type=int, default=1, help="epochs of the fine-tuned model (0 skips it)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="cap on the fine-tuned model's optimizer steps per epoch (CPU budgets); default: all")
    p.add_argument("--max-utterances", type=int, default=64, help="utterances per batch (whole dialogues)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone-lr", type=float, default=3e-5, help="learning rate of the unfrozen MiniLM")
    p.add_argument("--sequence-model", choices=["lstm", "transformer"], default="lstm")
    p.add_argument("--aux-weight", type=float, default=0.0, help="weight of the auxiliary sentiment loss")
    p.add_argument("--limit", type=int, default=None, help="use only this many utterances (quick check)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"), help="frozen MiniLM features")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def context_encoder(direction: str, args: argparse.Namespace, *, finetune: bool = False) -> Encoder:
    aux = {"field": "sentiment", "classes": SENTIMENTS, "weight": args.aux_weight} if args.aux_weight > 0 else None
    ref = ComponentRef(name="dialogue-context", inner={"name": "mm-lstm", "freeze_backbone": not finetune},
                       direction=direction, sequence_model=args.sequence_model, aux_task=aux)
    return build_encoder(ref, 7, where="bench")


def parameter_groups(encoder: Encoder, lr: float, backbone_lr: float) -> list[dict[str, Any]]:
    """The head at `lr`, unfrozen pretrained modules at `backbone_lr`."""
    prefixes = tuple(m + "." for m in encoder.pretrained_modules)
    head, backbone = [], []
    for name, p in encoder.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith(prefixes) else head).append(p)
    groups = [{"params": head, "lr": lr}]
    if backbone:
        groups.append({"params": backbone, "lr": backbone_lr})
    return groups


def run_batches(encoder: Encoder, loader, cache: FeatureCache | None):
    for batch in loader:
        extracted = cache.extract(encoder, batch) if cache is not None and encoder.cacheable else None
        yield batch, extracted


def evaluate(encoder: Encoder, bundle, args, cache) -> dict[str, float]:
    encoder.eval()
    logits, labels, aux_logits, aux_labels = [], [], [], []
    loader = dialogue_loader(bundle, "val", max_utterances=args.max_utterances * 4, shuffle=False, seed=args.seed,
                             modalities=set(encoder.modalities))
    with torch.no_grad():
        for batch, extracted in run_batches(encoder, loader, cache):
            out = encoder(batch, extracted)
            logits.append(out.logits)
            labels.append(batch.labels)
            if "aux_logits" in out.extras:
                aux_logits.append(out.extras["aux_logits"])
                aux_labels.append(out.extras["aux_labels"])
    metrics = classification_metrics(torch.cat(labels), torch.cat(logits), 7)
    if aux_logits:
        al, ay = torch.cat(aux_logits), torch.cat(aux_labels)
        known = ay >= 0
        metrics["aux_accuracy"] = float((al.argmax(-1)[known] == ay[known]).float().mean())
    return metrics


def train(name: str, encoder: Encoder, bundle, args, cache, epochs: int, max_steps: int | None = None) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    groups = parameter_groups(encoder, args.lr, args.backbone_lr)
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    per_epoch = len(dialogue_loader(bundle, "train", max_utterances=args.max_utterances, shuffle=True,
                                    seed=args.seed, modalities={TEXT}).batch_sampler)
    per_epoch = min(per_epoch, max_steps) if max_steps else per_epoch
    steps = epochs * per_epoch
    scheduler = warmup_cosine(optimizer, steps, 0.1)
    weight = float(getattr(encoder, "aux_weight", 0.0))
    best: dict[str, Any] = {"weighted_f1": -1.0}
    started = time.perf_counter()
    for epoch in range(epochs):
        encoder.train()
        loader = dialogue_loader(bundle, "train", max_utterances=args.max_utterances, shuffle=True, seed=args.seed,
                                 epoch=epoch, modalities=set(encoder.modalities))
        sums = {"loss": 0.0, "aux_loss": 0.0, "n": 0}
        for step, (batch, extracted) in enumerate(run_batches(encoder, loader, cache)):
            if step >= per_epoch:
                break
            out = encoder(batch, extracted)
            loss = F.cross_entropy(out.logits, batch.labels)
            total = loss
            if weight > 0 and "aux_logits" in out.extras:
                aux = F.cross_entropy(out.extras["aux_logits"], out.extras["aux_labels"], ignore_index=-1)
                total = loss + weight * aux
                sums["aux_loss"] += float(aux.detach()) * len(batch)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            scheduler.step()
            sums["loss"] += float(loss.detach()) * len(batch)
            sums["n"] += len(batch)
        val = evaluate(encoder, bundle, args, cache)
        row = {"epoch": epoch + 1, "train_loss": sums["loss"] / sums["n"], "val_weighted_f1": val["weighted_f1"],
               "seconds": round(time.perf_counter() - started, 1)}
        if weight > 0:
            row["train_aux_loss"] = sums["aux_loss"] / sums["n"]
            row["val_aux_accuracy"] = val.get("aux_accuracy")
        print(f"  {name}: {json.dumps(row)}", flush=True)
        if val["weighted_f1"] > best["weighted_f1"]:
            best = {**val, "epoch": epoch + 1}
    best["seconds"] = round(time.perf_counter() - started, 1)
    best["epochs_run"] = epochs
    best["steps_per_epoch"] = per_epoch
    return best


def logistic_baseline(bundle, args) -> dict[str, Any]:
    """MiniLM sentence embeddings (mean of token vectors) + logistic regression, C chosen on dev."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    from emofuse.plugins.encoders.text_backbone import TextBackbone

    started = time.perf_counter()
    backbone = TextBackbone("minilm").eval()

    def embed(split: str) -> tuple[np.ndarray, np.ndarray]:
        samples = bundle.splits[split]
        out = []
        with torch.no_grad():
            for i in range(0, len(samples), 128):
                out.append(backbone.sentence_embeddings([s.text for s in samples[i:i + 128]]))
        return torch.cat(out).numpy(), np.array([s.label for s in samples])

    xtr, ytr = embed("train")
    xdv, ydv = embed("val")
    best = {"weighted_f1": -1.0}
    for c in (0.1, 1.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=3000).fit(xtr, ytr)
        f1 = float(f1_score(ydv, clf.predict(xdv), average="weighted"))
        print(f"  baseline: C={c} dev weighted F1 {f1:.4f}", flush=True)
        if f1 > best["weighted_f1"]:
            best = {"weighted_f1": f1, "C": c}
    best["seconds"] = round(time.perf_counter() - started, 1)
    return best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = DataConfig(dataset="meld", data_dir=args.data, limit=args.limit)
    bundle = load_data(data, {TEXT})
    print(f"MELD: {len(bundle.splits['train'])} train, {len(bundle.splits['val'])} dev utterances", flush=True)
    cache = FeatureCache(args.cache_dir)
    results: dict[str, dict[str, Any]] = {"MiniLM sentence embedding + logistic regression": logistic_baseline(bundle, args)}
    variants = [("no context", "none"), (f"causal context ({args.sequence_model})", "causal"),
                (f"bidirectional context ({args.sequence_model})", "bidirectional")]
    for label, direction in variants:
        results[label] = train(label, context_encoder(direction, args), bundle, args, cache, args.epochs)
    if args.finetune_epochs > 0:
        label = f"no context, MiniLM fine-tuned (lr {args.backbone_lr:g})"
        results[label] = train(label, context_encoder("none", args, finetune=True), bundle, args, None,
                               args.finetune_epochs, args.finetune_steps)
    print()
    print("| model | dev weighted F1 | dev macro F1 | dev accuracy | best epoch / run | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, r in results.items():
        macro = f"{r['macro_f1']:.3f}" if "macro_f1" in r else "-"
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
        epoch = f"{r['epoch']} / {r['epochs_run']}" if "epoch" in r else f"C={r['C']}"
        print(f"| {label} | {100 * r['weighted_f1']:.1f} | {macro} | {acc} | {epoch} | {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
