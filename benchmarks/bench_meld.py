"""Dialogue context on MELD, text branch: dev weighted F1 of every variant side by side, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_meld.py [--epochs 12] [--finetune-epochs 3] [--sequence-model lstm transformer] [--threads 1]

MELD transcripts from ``../shared/data/meld`` with the corpus' own partition: the whole train
partition to fit, dev to choose (the epoch with the best dev weighted F1 is kept and reported,
early stopping on it; there is no test partition in the shared data, so these are dev numbers).
Speakers and dialogues are as MELD gives them. Rows:

1. baseline: MiniLM sentence embeddings (mean of its token vectors) + logistic regression
   (scikit-learn, standardised inputs, C chosen on dev);
2. the text branch: `mm-lstm` text-only (``audio_backbone = "none"``; MiniLM frozen, its token
   vectors read by a BiLSTM, or transformer layers with ``--sequence-model transformer``; the same
   kind reads the dialogue's turns) inside `dialogue-context` with ``direction = "none"`` (no
   context), ``"causal"`` (past turns only) and ``"bidirectional"`` (the whole dialogue); three rows
   per ``--sequence-model`` given;
3. the same without context (first sequence model), the MiniLM text encoder fine-tuned (unfrozen) at
   ``--backbone-lr-scale`` times the head's learning rate, for fewer epochs and shorter token
   sequences (``--finetune-tokens``; optionally a cap on steps per epoch) to fit a CPU budget, all
   stated in the table.

Beside each row's dev weighted F1: its difference from the no-context row of the same sequence
model, with a 95% paired bootstrap interval over dev dialogues (both models scored on the same
resampled dialogues), so a difference within the dev set's sampling noise reads as such. One seed.

Every row trains with the trainer itself (`emofuse.core.engine.fit.fit` over a `BranchTask`: AdamW,
warm-up + cosine, its parameter groups, dialogue batches for the context models, plain
cross-entropy), the same seed and the same settings. MiniLM's token vectors are extracted once into
the feature cache (``--cache-dir``) and shared by the baseline and every frozen row (and by later runs).
With ``--aux-weight`` > 0 one more row adds MELD sentiment as an auxiliary task to the causal model;
its dev sentiment accuracy is reported beside.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from emofuse.core.engine.compose import ComposedModel, build_encoder, build_loss
from emofuse.core.config import ComponentRef, DataConfig, TrainConfig
from emofuse.core.data.cache import FeatureCache
from emofuse.core.data.normalize import Normalizer
from emofuse.core.data.pipeline import DataBundle, load_data
from emofuse.core.engine.distributed import DistContext
from emofuse.core.interfaces import Encoder
from emofuse.core.engine.branch_stage import BranchTask
from emofuse.core.engine.fit import FitSettings, fit, seed_everything
from emofuse.core.engine.loaders import ensure_extracted
from emofuse.core.types import TEXT
from emofuse.plugins.encoders.text_backbone import masked_mean

SENTIMENTS = ["negative", "neutral", "positive"]
BRANCH = "text"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=None, help="folder holding meld/ (default ../shared/data)")
    p.add_argument("--epochs", type=int, default=12, help="most epochs of the frozen-encoder rows")
    p.add_argument("--patience", type=int, default=3, help="early stopping on dev weighted F1")
    p.add_argument("--batch-size", type=int, default=32, help="utterances per batch (whole dialogues with context)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the heads")
    p.add_argument("--sequence-model", choices=["lstm", "transformer"], nargs="+", default=["lstm"],
                   help="what reads the tokens (mm-lstm) and the turns (dialogue-context); several: rows for each")
    p.add_argument("--finetune-epochs", type=int, default=3, help="most epochs of the fine-tuned row (0 leaves it out)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="cap on optimizer steps per epoch of the fine-tuned row, each epoch a fresh shuffled share "
                        "of train (0: whole epochs)")
    p.add_argument("--finetune-tokens", type=int, default=32, help="max MiniLM tokens per utterance when fine-tuning")
    p.add_argument("--backbone-lr-scale", type=float, default=0.05, help="MiniLM's learning rate / the head's")
    p.add_argument("--aux-weight", type=float, default=0.0,
                   help="> 0 adds a row: causal context + MELD sentiment as auxiliary task with this weight")
    p.add_argument("--limit", type=int, default=None, help="use only this many utterances (a quick check)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"), help="the feature cache (MiniLM tokens)")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples of dev dialogues")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=int(os.environ.get("EMOFUSE_THREADS", 0)) or None,
                   help="CPU threads for PyTorch (default: $EMOFUSE_THREADS, else PyTorch's choice)")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here (with the command)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


# -- data --------------------------------------------------------------------------------------------
def load_meld(args: argparse.Namespace) -> DataBundle:
    """MELD with its own partition: train to fit, dev ("val") to choose.

    The pipeline carves a test split out of train when the corpus has no test partition (the shared
    data has none); this benchmark reports dev only, so those dialogues go back to train.
    """
    bundle = load_data(DataConfig(dataset="meld", data_dir=args.data, limit=args.limit), {TEXT})
    train = sorted(bundle.splits["train"] + bundle.splits.get("test", []), key=lambda s: s.id)
    bundle.splits = {"train": train, "val": bundle.splits["val"], "test": []}
    bundle.normalizer = Normalizer().fit(train)
    return bundle


# -- models ------------------------------------------------------------------------------------------
def text_branch(args: argparse.Namespace, kind: str, *, finetune: bool = False) -> dict[str, Any]:
    """The text-only mm-lstm's options."""
    options: dict[str, Any] = {"name": "mm-lstm", "audio_backbone": "none", "sequence_model": kind,
                               "freeze_backbone": not finetune, "backbone_lr_scale": args.backbone_lr_scale}
    if finetune:
        options["max_text_tokens"] = args.finetune_tokens
    return options


def context_model(direction: str, kind: str, args: argparse.Namespace, *, finetune: bool = False,
                  aux_weight: float = 0.0) -> ComponentRef:
    aux = {"field": "sentiment", "classes": SENTIMENTS, "weight": aux_weight} if aux_weight > 0 else None
    return ComponentRef(name="dialogue-context", inner=text_branch(args, kind, finetune=finetune), direction=direction,
                        sequence_model=kind, aux_task=aux)


@dataclass
class Row:
    label: str
    model: ComponentRef
    epochs: int
    max_steps: int | None = None
    notes: str = ""
    #: Label of the row it is compared with (the no-context row of the same sequence model).
    reference: str | None = None


class StepCappedTask(BranchTask):
    """A `BranchTask` whose training epochs stop after `max_steps` batches (each epoch a fresh shuffled
    share of train), with the schedule sized to match: fine-tuning within a CPU budget."""

    def __init__(self, *args: Any, max_steps: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_steps = max_steps

    def train_batches(self, epoch: int) -> Iterable[Any]:
        return itertools.islice(super().train_batches(epoch), self.max_steps)

    def num_train_batches(self) -> int:
        return min(super().num_train_batches(), self.max_steps)


def train_config(args: argparse.Namespace, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
                       monitor="weighted_f1", seed=args.seed, device="cpu", precision="fp32")


def train_row(row: Row, bundle: DataBundle, cache: FeatureCache, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train one row with the trainer's `fit`; its best dev metrics (chosen epoch) and timings."""
    started = time.perf_counter()
    seed_everything(args.seed)
    num_classes = bundle.num_classes
    encoder = build_encoder(row.model, num_classes, where=row.label)
    model = ComposedModel({BRANCH: encoder})
    loss_fn = build_loss(ComponentRef(name="cross-entropy"), num_classes, bundle.class_counts("train"))
    cfg = train_config(args, row.epochs)
    ctx = DistContext()
    ensure_extracted(encoder, cache, bundle, splits=("train", "val"), batch_size=64, seed=args.seed, num_workers=0,
                     ctx=ctx, progress=True)
    task = (StepCappedTask(model, bundle, cache, cfg, ctx, max_steps=row.max_steps) if row.max_steps
            else BranchTask(model, bundle, cache, cfg, ctx))
    run_dir = work / f"row{len(list(work.iterdir()))}"
    settings = FitSettings(stage=row.label, train=cfg, num_classes=num_classes, run_dir=run_dir,
                           fingerprint=row.label, resume=False, progress=True, find_unused_parameters=True)
    outcome = fit(task, loss_fn, settings, ctx)  # leaves the best epoch's weights in the model
    best = dict(outcome.best_val)
    result: dict[str, Any] = {
        "weighted_f1": best["weighted_f1"], "macro_f1": best["macro_f1"], "accuracy": best["accuracy"],
        "best_epoch": outcome.best_epoch + 1, "epochs_run": len(outcome.history),
        "steps_per_epoch": task.num_train_batches(),
        "utterances_per_epoch": min(len(bundle.splits["train"]), task.num_train_batches() * args.batch_size)
        if row.max_steps else len(bundle.splits["train"]),
        "trainable_parameters": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
        "history": outcome.history,
    }
    result.update(dev_predictions(task))
    if encoder.aux_weight > 0:
        result["train_aux_loss"] = outcome.history[outcome.best_epoch]["train_aux_loss"]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def dev_predictions(task: BranchTask) -> dict[str, Any]:
    """The (best) model's dev predictions by utterance id (for the paired bootstrap) and, with an auxiliary
    head, its dev accuracy and cross-entropy: the trainer logs only the training-side auxiliary loss."""
    module = task.module.eval()
    predictions: dict[str, int] = {}
    aux_logits, aux_labels = [], []
    with torch.no_grad():
        for batch in task.eval_batches("val"):
            prepared, extracted = task.prepare(batch)
            logits, outputs = module(prepared, extracted)
            predictions.update(zip(prepared.ids, logits.argmax(dim=-1).tolist()))
            if "aux_logits" in outputs[BRANCH].extras:
                aux_logits.append(outputs[BRANCH].extras["aux_logits"])
                aux_labels.append(outputs[BRANCH].extras["aux_labels"])
    out: dict[str, Any] = {"predictions": predictions}
    if aux_logits:
        y, z = torch.cat(aux_labels), torch.cat(aux_logits)
        known = y >= 0
        out["dev_aux_accuracy"] = float((z[known].argmax(-1) == y[known]).float().mean())
        out["dev_aux_loss"] = float(torch.nn.functional.cross_entropy(z[known], y[known]))
    return out


def paired_bootstrap(bundle: DataBundle, ours: dict[str, int], theirs: dict[str, int], *, resamples: int,
                     seed: int) -> tuple[float, float]:
    """95% interval of weighted F1 (ours) - weighted F1 (theirs) over dev, resampling whole dialogues
    (utterances of one dialogue are not independent), both scored on the same resamples."""
    from sklearn.metrics import f1_score

    samples = bundle.splits["val"]
    by_dialogue: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_dialogue.setdefault(s.dialogue_id or s.id, []).append(i)
    groups = list(by_dialogue.values())
    labels = np.array([s.label for s in samples])
    a = np.array([ours[s.id] for s in samples])
    b = np.array([theirs[s.id] for s in samples])
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(resamples):
        idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        deltas.append(f1_score(labels[idx], a[idx], average="weighted")
                      - f1_score(labels[idx], b[idx], average="weighted"))
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(low), float(high)


# -- baseline ----------------------------------------------------------------------------------------
def sentence_embeddings(encoder: Encoder, bundle: DataBundle, cache: FeatureCache,
                        split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean of MiniLM's token vectors per utterance (the pooling MiniLM was trained with), read from
    the feature cache that the frozen text branch fills."""
    xs, ys, ids = [], [], []
    for batch in bundle.loader(split, batch_size=256, shuffle=False, seed=0, modalities=set(encoder.modalities)):
        ex = cache.extract(encoder, batch)
        xs.append(masked_mean(ex["text_tokens"].float(), ex.get("text_tokens_lengths")))
        ys.append(batch.labels)
        ids += batch.ids
    return torch.cat(xs).numpy(), torch.cat(ys).numpy(), ids


def logistic_baseline(encoder: Encoder, bundle: DataBundle, cache: FeatureCache) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    xtr, ytr, _ = sentence_embeddings(encoder, bundle, cache, "train")
    xdv, ydv, dev_ids = sentence_embeddings(encoder, bundle, cache, "val")
    best: dict[str, Any] = {"weighted_f1": -1.0}
    for c in (0.01, 0.1, 1.0):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(xtr, ytr)
        pred = clf.predict(xdv)
        scores = {"weighted_f1": float(f1_score(ydv, pred, average="weighted")),
                  "macro_f1": float(f1_score(ydv, pred, average="macro")), "accuracy": float(accuracy_score(ydv, pred))}
        print(f"  baseline: C={c}: dev weighted F1 {scores['weighted_f1']:.4f}", flush=True)
        if scores["weighted_f1"] > best["weighted_f1"]:
            best = {**scores, "C": c, "predictions": dict(zip(dev_ids, pred.tolist()))}
    best["seconds"] = round(time.perf_counter() - started, 1)
    return best


# -- report ------------------------------------------------------------------------------------------
def table(results: list[tuple[str, str, dict[str, Any]]], with_aux: bool) -> str:
    head = ["model", "dev weighted F1 %", "vs no context (95% CI)", "dev macro F1 %", "dev accuracy %",
            "chosen on dev", "seconds", "notes"]
    if with_aux:
        head.insert(7, "dev sentiment acc %")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 2) + [":---"]) + "|"]
    for label, notes, r in results:
        chosen = f"C = {r['C']}" if "C" in r else f"epoch {r['best_epoch']} of {r['epochs_run']}"
        delta = "-"
        if "delta" in r:
            low, high = r["delta_ci"]
            delta = f"{100 * r['delta']:+.1f} ({100 * low:+.1f} to {100 * high:+.1f})"
        cells = [label, f"{100 * r['weighted_f1']:.1f}", delta, f"{100 * r['macro_f1']:.1f}",
                 f"{100 * r['accuracy']:.1f}", chosen, f"{r['seconds']:.0f}", notes]
        if with_aux:
            cells.insert(7, f"{100 * r['dev_aux_accuracy']:.1f}" if "dev_aux_accuracy" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def token_coverage(bundle: DataBundle, max_tokens: int) -> float:
    """Share of train utterances whose MiniLM tokens fit in `max_tokens` (the rest are cut)."""
    from emofuse.plugins.encoders.pretrained import load_pretrained
    from transformers import AutoTokenizer

    tokenizer = load_pretrained("minilm", AutoTokenizer.from_pretrained, what="text backbone",
                                option="text_backbone", alternative="minilm")
    lengths = [len(ids) for ids in tokenizer([s.text or "" for s in bundle.splits["train"]])["input_ids"]]
    return float(np.mean(np.array(lengths) <= max_tokens))


def command_line(argv: list[str] | None) -> str:
    words = sys.argv[1:] if argv is None else argv
    threads = f"EMOFUSE_THREADS={os.environ['EMOFUSE_THREADS']} " if os.environ.get("EMOFUSE_THREADS") else ""
    return f"HF_HUB_OFFLINE=1 {threads}.venv/bin/python benchmarks/bench_meld.py {shlex.join(words)}".rstrip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bundle = load_meld(args)
    n_train, n_dev = len(bundle.splits["train"]), len(bundle.splits["val"])
    print(f"MELD: {n_train} train, {n_dev} dev utterances", flush=True)
    cache = FeatureCache(args.cache_dir)

    rows: list[Row] = []
    for kind in args.sequence_model:
        plain = f"text branch ({kind}), no context"
        rows += [
            Row(plain, context_model("none", kind, args), args.epochs, notes=f"MiniLM frozen, {kind} over its tokens"),
            Row(f"text branch ({kind}) + causal context", context_model("causal", kind, args), args.epochs,
                notes="past turns and their speakers", reference=plain),
            Row(f"text branch ({kind}) + bidirectional context", context_model("bidirectional", kind, args),
                args.epochs, notes="the whole dialogue", reference=plain),
        ]
        if args.aux_weight > 0:
            rows.append(Row(f"text branch ({kind}) + causal context + sentiment head",
                            context_model("causal", kind, args, aux_weight=args.aux_weight), args.epochs,
                            notes=f"MELD sentiment as auxiliary task, loss weight {args.aux_weight:g}", reference=plain))
    if args.finetune_epochs > 0:
        kind = args.sequence_model[0]
        steps = args.finetune_steps or None
        budget = (f"at most {args.finetune_epochs} x {steps} steps of {args.batch_size} utterances" if steps
                  else f"at most {args.finetune_epochs} epochs")
        coverage = token_coverage(bundle, args.finetune_tokens)
        rows.append(Row(f"text branch ({kind}), no context, MiniLM fine-tuned",
                        context_model("none", kind, args, finetune=True), args.finetune_epochs, max_steps=steps,
                        notes=f"MiniLM unfrozen at {args.backbone_lr_scale:g} x the head's lr; {budget}; at most "
                              f"{args.finetune_tokens} tokens per utterance ({100 * coverage:.0f}% of train "
                              f"utterances fit whole)", reference=f"text branch ({kind}), no context"))

    # The no-context row's encoder fills the cache that the baseline and every frozen row read.
    first = build_encoder(rows[0].model, bundle.num_classes, where="baseline")
    extract_started = time.perf_counter()
    ensure_extracted(first, cache, bundle, splits=("train", "val"), batch_size=64, seed=args.seed, num_workers=0,
                     ctx=DistContext(), progress=True)
    extract_seconds = time.perf_counter() - extract_started
    print(f"MiniLM token vectors cached in {extract_seconds:.0f} s", flush=True)
    baseline_label = "MiniLM sentence embedding + logistic regression"
    results: list[tuple[str, str, dict[str, Any]]] = [
        (baseline_label, "mean of token vectors, standardised", logistic_baseline(first, bundle, cache))]
    references = {baseline_label: rows[0].label}
    del first
    with tempfile.TemporaryDirectory(prefix="bench-meld-") as tmp:
        work = Path(tmp)
        for row in rows:
            print(f"== {row.label}", flush=True)
            r = train_row(row, bundle, cache, args, work)
            print(f"   dev weighted F1 {r['weighted_f1']:.4f} (epoch {r['best_epoch']} of {r['epochs_run']}, "
                  f"{r['seconds']:.0f} s)", flush=True)
            results.append((row.label, row.notes, r))
            if row.reference:
                references[row.label] = row.reference
    by_label = {label: r for label, _, r in results}
    for label, reference in references.items():
        r, ref = by_label[label], by_label[reference]
        r["delta"] = r["weighted_f1"] - ref["weighted_f1"]
        r["delta_ci"] = paired_bootstrap(bundle, r["predictions"], ref["predictions"], resamples=args.bootstrap,
                                         seed=args.seed)

    total = time.perf_counter() - started
    with_aux = any("dev_aux_accuracy" in r for _, _, r in results)
    text = table(results, with_aux)
    print()
    print(text)
    print(f"\ntotal {total / 60:.1f} min (MiniLM extraction {extract_seconds:.0f} s of it)")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        args.markdown.write_text(
            "### MELD dev: dialogue context and fine-tuning of the text branch\n\n"
            f"Made with:\n\n```\n{command_line(argv)}\n```\n\n"
            f"MELD transcripts (`../shared/data/meld`): {n_train} train utterances (the whole train partition) to "
            f"fit, {n_dev} dev utterances to choose (best dev weighted F1 over the epochs, early stopping with "
            f"patience {args.patience}); no test partition here, so these are dev numbers. 7 emotions; speakers "
            f"and dialogues as MELD gives them. Every trained row: AdamW lr {args.lr:g}, warm-up + cosine, "
            f"batches of {args.batch_size} utterances (whole dialogues with context), cross-entropy, seed "
            f"{args.seed}, one run each. \"vs no context\": the difference in dev weighted F1 from the "
            f"no-context row of the same sequence model (for the baseline: from the first no-context row), with "
            f"a 95% paired bootstrap interval over {args.bootstrap} resamples of dev dialogues. "
            f"CPU, {threads} PyTorch threads ({platform.machine()}, "
            f"{os.cpu_count()} cores, shared with other jobs); total {total / 60:.1f} min, of which "
            f"{extract_seconds:.0f} s extracting MiniLM token vectors into the feature cache (0 s on a rerun).\n\n"
            f"{text}\n",
            encoding="utf-8")
        print(f"wrote {args.markdown}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command_line(argv), "results": [
            {"model": label, "notes": notes, **{k: v for k, v in r.items() if k != "predictions"}}
            for label, notes, r in results]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
