"""MELD dev: every row is a preset or an experiment config (plus `--set`s), trained side by side over seeds in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_meld.py [--rows baseline text causal ...] [--seeds 0 1 2] [--threads 1]

Each trained row is exactly what ``emofuse train --preset NAME [--set ...]`` (or, for an experiment that is
not a preset, ``emofuse train --config benchmarks/configs/NAME.toml``) trains (the command is in the table):
the preset's data (MELD's train partition to fit, dev to choose the epoch and report:
``test_fraction = 0``), encoder, loss and train settings, through the trainer's own `fit` over a
`BranchTask`. The benchmark adds only the seed, the thread count and, for a quick run, ``--limit``.
The baseline is MiniLM sentence embeddings (mean of its token vectors) + logistic regression
(scikit-learn, standardised inputs, C chosen on dev), deterministic, so one run.

Per row: dev weighted and macro F1 averaged over the seeds with a 95% t interval over seeds, and the
difference from its reference row (the no-context row) with a 95% paired bootstrap interval over dev
dialogues (each resample scores both rows' seeds on the same dialogues and averages the differences),
so a gain inside the dev set's sampling noise reads as such. Training seconds per run beside.

A finished (row, seed) is stored under ``--store`` keyed by its config, so a rerun, or a run with more
rows, reuses it instead of training again. The baseline is fit again in every run (seconds once the
MiniLM tokens are cached), so it is always measured beside the rows it is compared with.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emofuse.core.config import RunConfig
from emofuse.core.data.cache import FeatureCache
from emofuse.core.data.pipeline import DataBundle, load_data
from emofuse.core.engine.branch_stage import BranchTask
from emofuse.core.engine.class_balance import log_prior_offsets
from emofuse.core.engine.compose import ComposedModel, build_encoder, build_loss
from emofuse.core.engine.distributed import DistContext
from emofuse.core.engine.fit import FitSettings, fit, seed_everything
from emofuse.core.engine.loaders import ensure_extracted
from emofuse.core.interfaces import Encoder
from emofuse.core.presets import compose_config
from emofuse.core.types import TEXT
from emofuse.plugins.encoders.text_backbone import masked_mean

BRANCH = "text"
#: Strength of the post-hoc logit adjustment reported beside the plain argmax (1: the balanced-error choice).
POSTHOC_TAU = 1.0
SENTIMENT_HEAD = 'branches.text.aux_task={field="sentiment", classes=["negative","neutral","positive"], weight=0.5}'
BASELINE = "baseline"
TRANSFORMER = ("branches.text.inner.sequence_model=transformer", "branches.text.sequence_model=transformer")
MPNET = "branches.text.inner.text_backbone=mpnet"


#: Experiment configurations (``--config`` files on top of a preset) for rows that are not presets a user picks.
CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Row:
    """A table row: a preset, or an experiment config (a file in `CONFIGS`), and the `--set`s on top of it."""

    label: str
    preset: str | None = None
    sets: tuple[str, ...] = ()
    #: Key of the row it is compared with (the no-context row).
    reference: str | None = "text"
    notes: str = ""
    #: Name of the experiment config in `CONFIGS` (without ``.toml``), instead of `preset`.
    config: str | None = None

    def compose_args(self) -> dict[str, Any]:
        """``compose_config``'s preset or config file for this row (as `emofuse train` reads them)."""
        return {"config_file": CONFIGS / f"{self.config}.toml"} if self.config else {"preset": self.preset}

    def command_words(self) -> list[str]:
        if self.config:
            return ["emofuse", "train", "--config", f"benchmarks/configs/{self.config}.toml"]
        return ["emofuse", "train", "--preset", str(self.preset)]


ROWS: dict[str, Row] = {
    "text": Row("text branch, no context", "meld-text", reference=None,
                notes="MiniLM frozen, BiLSTM over its tokens"),
    "causal": Row("+ causal dialogue context", "meld-context", ("branches.text.direction=causal",),
                  notes="past turns and their speakers"),
    "bidirectional": Row("+ bidirectional dialogue context", "meld-context", notes="the whole dialogue"),
    "sentiment": Row("+ causal context + sentiment head", "meld-context",
                     ("branches.text.direction=causal", SENTIMENT_HEAD),
                     notes="MELD sentiment as auxiliary task, loss weight 0.5"),
    "bidirectional-balanced": Row("+ bidirectional context, class-weighted loss", "meld-context",
                                  ('loss={name="cross-entropy", class_weights="balanced"}',),
                                  notes="cross-entropy weighted N / (C n_c)"),
    "bidirectional-focal": Row("+ bidirectional context, focal loss with per-class alpha", "meld-context",
                               ('loss={name="focal", alpha="balanced", gamma=2.0}',),
                               notes="focal, gamma 2, alpha N / (C n_c)"),
    "transformer": Row("text branch, transformer layers, no context", "meld-text", TRANSFORMER, reference=None,
                       notes="transformer layers over the tokens"),
    "transformer-causal": Row("transformer + causal dialogue context", "meld-context",
                              (*TRANSFORMER, "branches.text.direction=causal"), reference="transformer",
                              notes="transformer layers over the tokens and over the past turns"),
    "transformer-bidirectional": Row("transformer + bidirectional dialogue context", "meld-context", TRANSFORMER,
                                     reference="transformer", notes="transformer layers over the tokens and the whole dialogue"),
    "mpnet": Row("no context, all-mpnet-base-v2 frozen instead of MiniLM", "meld-text", (MPNET,),
                 notes="the larger packaged text encoder (EMOFUSE_MPNET=1 at setup), BiLSTM over its tokens"),
    "mpnet-context": Row("all-mpnet-base-v2 frozen + bidirectional dialogue context", "meld-context", (MPNET,),
                         reference="mpnet", notes="the whole dialogue over mpnet's tokens"),
    "finetune": Row("no context, MiniLM fine-tuned", "meld-finetune",
                    notes="MiniLM unfrozen at 0.05 x the head's lr, 32 tokens per utterance"),
    "finetune-turns": Row("MiniLM fine-tuned reading the 3 previous turns with the utterance", config="meld-finetune-turns",
                          reference="finetune", notes="past turns as the second segment of MiniLM's input"),
    "finetune-mpnet": Row("no context, all-mpnet-base-v2 fine-tuned", "meld-finetune-mpnet",
                          notes="mpnet unfrozen at 0.03 x the head's lr, 16 utterances a batch"),
    "finetune-mpnet-pooled": Row("no context, all-mpnet-base-v2 fine-tuned, mean-pooled head", "meld-finetune-mpnet",
                                 ("branches.text.inner.sequence_model=none",), reference="finetune-mpnet",
                                 notes="no BiLSTM: the head reads the mean of mpnet's token vectors"),
    "finetune-mpnet-named-pooled": Row("all-mpnet-base-v2 fine-tuned, speaker named, mean-pooled head", "meld-finetune-mpnet",
                                       ("branches.text.inner.sequence_model=none", "branches.text.inner.name_speaker=true"),
                                       reference="finetune-mpnet",
                                       notes='each utterance read as "Speaker: words"; the head reads the mean token vector'),
    "finetune-adjusted": Row("no context, MiniLM fine-tuned, logit-adjusted loss", "meld-finetune",
                             ('loss={name="cross-entropy", logit_adjustment=1.0}',), reference="finetune",
                             notes="cross-entropy over logits + log prior (tau 1)"),
    "finetune-mpnet-adjusted": Row("all-mpnet-base-v2 fine-tuned, logit-adjusted loss", config="meld-finetune-mpnet-adjusted",
                                   reference="finetune-mpnet",
                                   notes="mpnet at 0.05 x the head's lr; cross-entropy over logits + log prior (tau 1)"),
    "finetune-mpnet-named": Row("all-mpnet-base-v2 fine-tuned, speaker named, mean-pooled head, logit-adjusted loss",
                                config="meld-finetune-mpnet-named", reference="finetune-mpnet-adjusted",
                                notes='"Speaker: words", 64 tokens; mpnet at 0.05 x the head\'s lr; logits + log prior (tau 1)'),
    "finetune-mpnet-sqrt": Row("all-mpnet-base-v2 fine-tuned, sqrt-balanced class weights", config="meld-finetune-mpnet-adjusted",
                               sets=('loss={name="cross-entropy", class_weights="sqrt-balanced"}',),
                               reference="finetune-mpnet",
                               notes="mpnet at 0.05 x the head's lr; cross-entropy weighted (N / (C n_c))^0.5"),
    "finetune-mpnet-turns": Row("all-mpnet-base-v2 fine-tuned reading the 3 previous turns, logit-adjusted loss",
                                config="meld-finetune-mpnet-turns", reference="finetune-mpnet-adjusted",
                                notes="past turns as the second segment of mpnet's input; mpnet at 0.05 x the head's lr; logits + log prior (tau 1)"),
    "finetune-mpnet-onelr": Row("all-mpnet-base-v2 fine-tuned at one lr, mean-pooled head", config="meld-finetune-mpnet-onelr",
                                reference="finetune-mpnet",
                                notes="mpnet and head both at 3e-5, as a plain fine-tuning script; the head reads the mean token vector"),
    "finetune-mpnet-linear": Row("all-mpnet-base-v2 fine-tuned as a plain sentence classifier", config="meld-finetune-mpnet-linear",
                                 reference="finetune-mpnet",
                                 notes="one linear layer on the mean token vector, no context wrapper; mpnet and head at 3e-5, "
                                       "weight decay 0.01, random batches, 2 whole passes"),
    "finetune-context": Row("MiniLM fine-tuned + dialogue context + class-balanced loss", config="meld-finetune-context",
                            notes="the combination"),
    "finetune-context-plain": Row("MiniLM fine-tuned + dialogue context, plain cross-entropy", config="meld-finetune-context",
                                  sets=('loss={name="cross-entropy"}',), reference="finetune",
                                  notes="the combination without the class weights"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", default=[BASELINE, *ROWS], choices=[BASELINE, *ROWS],
                   help="which rows, in table order")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of every trained row")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="one more --set on every trained row (stated in the table); repeatable")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="train.steps_per_epoch of the fine-tuned rows (0: the preset's)")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="train.epochs of the fine-tuned rows (0: the preset's)")
    p.add_argument("--data", type=Path, default=None, help="folder holding meld/ (default ../shared/data)")
    p.add_argument("--limit", type=int, default=None, help="use only this many utterances (a quick check)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"), help="the feature cache (MiniLM tokens)")
    p.add_argument("--store", type=Path, default=Path("runs/bench-meld"), help="finished (row, seed) results")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples of dev dialogues")
    p.add_argument("--threads", type=int, default=int(os.environ.get("EMOFUSE_THREADS", "0")) or None,
                   help="CPU threads for PyTorch (default: $EMOFUSE_THREADS, else PyTorch's choice)")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here (with the command)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


# -- configs and data --------------------------------------------------------------------------------
def is_finetune(config: RunConfig) -> bool:
    """Whether the row's text encoder (inside `dialogue-context` or the branch itself) trains its backbone."""
    options = config.branches[BRANCH].options
    return not (options.get("inner") or options).get("freeze_backbone", True)


def row_sets(row: Row, args: argparse.Namespace) -> list[str]:
    """The `--set`s of the row's command: its own, the run's, and the fine-tuning budget on fine-tuned rows."""
    sets = [*row.sets, *args.sets]
    if is_finetune(compose_config(**row.compose_args(), sets=sets)):
        sets += [f"train.steps_per_epoch={args.finetune_steps}"] if args.finetune_steps else []
        sets += [f"train.epochs={args.finetune_epochs}"] if args.finetune_epochs else []
    return sets


def trains_adjusted(config: RunConfig) -> bool:
    """Whether the row's loss adds tau * log(prior) to the logits while training (`logit_adjustment`)."""
    return bool(config.loss.options.get("logit_adjustment", 0.0))


def row_command(row: Row, args: argparse.Namespace) -> str:
    words = row.command_words()
    for assignment in row_sets(row, args):
        words += ["--set", assignment]
    return shlex.join(words)


def row_config(row: Row, seed: int, args: argparse.Namespace) -> RunConfig:
    """The row's preset or config with the command's `--set`s, exactly as `emofuse train` composes it, at this
    seed on the CPU."""
    sets = [*row_sets(row, args), f"train.seed={seed}", "train.device=cpu"]
    if args.data is not None:
        sets.append(f"data.data_dir={json.dumps(str(args.data))}")
    if args.limit:
        sets.append(f"data.limit={args.limit}")
    return compose_config(**row.compose_args(), sets=sets)


def load_meld(config: RunConfig) -> DataBundle:
    return load_data(config.data, {TEXT})


#: Run-config keys added after the store began, left out of a run's key while they hold the value every earlier
#: run trained with, so stored runs keep their keys.
KEYS_ADDED_LATER = {("train", "lr_decay"): "cosine", ("data", "speaker_normalization"): "none"}


def config_key(config: RunConfig) -> str:
    dumped = config.model_dump(mode="json", exclude={"name", "preset", "output_dir"})
    for (table, key), earlier in KEYS_ADDED_LATER.items():
        if dumped.get(table, {}).get(key) == earlier:
            del dumped[table][key]
    payload = json.dumps(dumped, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# -- one training ------------------------------------------------------------------------------------
def train_row(config: RunConfig, bundle: DataBundle, cache: FeatureCache, work: Path) -> dict[str, Any]:
    """Train the preset's branch with the trainer's `fit`; its best dev metrics (chosen epoch), predictions, time."""
    started = time.perf_counter()
    cfg = config.train
    seed_everything(cfg.seed)
    num_classes = bundle.num_classes
    encoder = build_encoder(config.branches[BRANCH], num_classes, where=config.name)
    model = ComposedModel({BRANCH: encoder})
    loss_fn = build_loss(config.loss, num_classes, bundle.class_counts("train"))
    ctx = DistContext()
    ensure_extracted(encoder, cache, bundle, splits=("train", "val"), batch_size=64, seed=cfg.seed, num_workers=0,
                     ctx=ctx, progress=True)
    task = BranchTask(model, bundle, cache, cfg, ctx)
    settings = FitSettings(stage=config.name, train=cfg, num_classes=num_classes, run_dir=work / config_key(config),
                           fingerprint=config_key(config), resume=False, progress=True, find_unused_parameters=True)
    outcome = fit(task, loss_fn, settings, ctx)  # leaves the best epoch's weights in the model
    best = dict(outcome.best_val)
    result: dict[str, Any] = {
        "weighted_f1": best["weighted_f1"], "macro_f1": best["macro_f1"], "accuracy": best["accuracy"],
        "best_epoch": outcome.best_epoch + 1, "epochs_run": len(outcome.history),
        "steps_per_epoch": task.num_train_batches(),
        "trainable_parameters": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
    }
    result.update(dev_predictions(task))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["threads"] = torch.get_num_threads()  # stored with the seconds: a later run may use another count
    return result


def dev_predictions(task: BranchTask) -> dict[str, Any]:
    """The (best) model's dev predictions by utterance id (for the paired bootstrap) and, with an auxiliary
    head, its dev accuracy: the trainer logs only the training-side auxiliary loss."""
    module = task.module.eval()
    predictions: dict[str, int] = {}
    dev_logits: dict[str, list[float]] = {}
    aux_logits, aux_labels = [], []
    with torch.no_grad():
        for batch in task.eval_batches("val"):
            prepared, extracted = task.prepare(batch)
            logits, outputs = module(prepared, extracted)
            predictions.update(zip(prepared.ids, logits.argmax(dim=-1).tolist()))
            dev_logits.update(zip(prepared.ids, logits.float().round(decimals=4).tolist()))
            if "aux_logits" in outputs[BRANCH].extras:
                aux_logits.append(outputs[BRANCH].extras["aux_logits"])
                aux_labels.append(outputs[BRANCH].extras["aux_labels"])
    out: dict[str, Any] = {"predictions": predictions, "dev_logits": dev_logits}
    if aux_logits:
        y, z = torch.cat(aux_labels), torch.cat(aux_logits)
        known = y >= 0
        out["dev_aux_accuracy"] = float((z[known].argmax(-1) == y[known]).float().mean())
    return out


def stored_or_trained(row: Row, seed: int, bundle: DataBundle, cache: FeatureCache, args: argparse.Namespace,
                      work: Path) -> dict[str, Any]:
    config = row_config(row, seed, args)
    path = args.store / f"{config_key(config)}.json"
    if path.is_file():
        print(f"   seed {seed}: reusing {path}", flush=True)
        return json.loads(path.read_text())
    result = train_row(config, bundle, cache, work)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


# -- statistics --------------------------------------------------------------------------------------
def t_interval(values: list[float]) -> float:
    """Half-width of the 95% t interval of the mean (0 for one value)."""
    if len(values) < 2:
        return 0.0
    from scipy import stats

    return float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)))


def paired_bootstrap(bundle: DataBundle, ours: list[dict[str, int]], theirs: list[dict[str, int]], *,
                     resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean weighted F1 (ours) - mean weighted F1 (theirs) over dev, resampling whole
    dialogues (utterances of one dialogue are not independent); every run of both rows is scored on the
    same resamples, the seeds paired where both rows have them."""
    samples = bundle.splits["val"]
    by_dialogue: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_dialogue.setdefault(s.dialogue_id or s.id, []).append(i)
    groups = list(by_dialogue.values())
    labels = np.array([s.label for s in samples])
    a = [np.array([run[s.id] for s in samples]) for run in ours]
    b = [np.array([run[s.id] for s in samples]) for run in theirs]
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(resamples):
        idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        deltas.append(mean_weighted_f1(labels[idx], [r[idx] for r in a])
                      - mean_weighted_f1(labels[idx], [r[idx] for r in b]))
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(low), float(high)


def dev_scores(labels: Any, predicted: Any) -> dict[str, float]:
    """Weighted F1, macro F1 and accuracy of predicted class indices (scikit-learn's)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"weighted_f1": float(f1_score(labels, predicted, average="weighted")),
            "macro_f1": float(f1_score(labels, predicted, average="macro")),
            "accuracy": float(accuracy_score(labels, predicted))}


def posthoc_predictions(logits: torch.Tensor, train_counts: torch.Tensor, tau: float) -> list[int]:
    """The classes of ``logits - tau * log(train prior)``: post-hoc logit adjustment (Menon et al., 2021)."""
    offsets = log_prior_offsets(tau, logits.shape[-1], train_counts, where="post-hoc adjustment")
    return (logits if offsets is None else logits - offsets).argmax(dim=-1).tolist()


def posthoc_adjusted(bundle: DataBundle, run: dict[str, Any], tau: float = POSTHOC_TAU) -> dict[str, float]:
    """A run's dev scores after post-hoc logit adjustment of its stored dev logits, tau fixed beforehand, never
    tuned on dev: what the rare classes gain without retraining."""
    samples = bundle.splits["val"]
    logits = torch.tensor([run["dev_logits"][s.id] for s in samples])
    return dev_scores([s.label for s in samples], posthoc_predictions(logits, bundle.class_counts("train"), tau))


def posthoc_lines(bundle: DataBundle, results: list["RowResult"]) -> list[str]:
    """One line per trained row whose runs all stored their dev logits (runs stored before that have none),
    except rows trained with a logit-adjusted loss: their logits are adjusted already."""
    lines = []
    for res in results:
        if res.runs and not res.trained_adjusted and all("dev_logits" in r for r in res.runs):
            adjusted = RowResult(res.key, res.label, "", "", [posthoc_adjusted(bundle, r) for r in res.runs])
            lines.append(f"- {res.label}: weighted F1 {adjusted.cell('weighted_f1')}, macro F1 "
                         f"{adjusted.cell('macro_f1')}, accuracy {adjusted.cell('accuracy')}")
    return lines


def mean_weighted_f1(labels: np.ndarray, runs: list[np.ndarray]) -> float:
    from sklearn.metrics import f1_score

    return float(np.mean([f1_score(labels, r, average="weighted") for r in runs]))


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


def logistic_baseline(bundle: DataBundle, cache: FeatureCache, args: argparse.Namespace) -> dict[str, Any]:
    """MiniLM sentence embedding + logistic regression, C in {0.01, 0.1, 1} chosen on dev."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    config = row_config(ROWS["text"], 0, args)  # its frozen MiniLM fills the cache every frozen row reads
    encoder = build_encoder(config.branches[BRANCH], bundle.num_classes, where=BASELINE)
    ensure_extracted(encoder, cache, bundle, splits=("train", "val"), batch_size=64, seed=0, num_workers=0,
                     ctx=DistContext(), progress=True)
    xtr, ytr, _ = sentence_embeddings(encoder, bundle, cache, "train")
    xdv, ydv, dev_ids = sentence_embeddings(encoder, bundle, cache, "val")
    best: dict[str, Any] = {"weighted_f1": -1.0}
    for c in (0.01, 0.1, 1.0):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)).fit(xtr, ytr)
        pred = clf.predict(xdv)
        scores = dev_scores(ydv, pred)
        print(f"  baseline: C={c}: dev weighted F1 {scores['weighted_f1']:.4f}", flush=True)
        if scores["weighted_f1"] > best["weighted_f1"]:
            best = {**scores, "C": c, "predictions": dict(zip(dev_ids, pred.tolist()))}
    best["seconds"] = round(time.perf_counter() - started, 1)
    best["threads"] = torch.get_num_threads()
    return best


# -- report ------------------------------------------------------------------------------------------
@dataclass
class RowResult:
    key: str
    label: str
    command: str
    notes: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    delta: tuple[float, float, float] | None = None
    #: Key of the row `delta` is taken against.
    reference: str | None = None
    #: Whether the row's loss already adjusts its logits by the prior (post-hoc adjustment would do it twice).
    trained_adjusted: bool = False

    def mean(self, metric: str) -> float:
        return float(np.mean([r[metric] for r in self.runs]))

    def cell(self, metric: str) -> str:
        values = [100 * r[metric] for r in self.runs]
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{np.mean(values):.1f} ± {t_interval(values):.1f}"


def threads_used(results: list[RowResult]) -> str:
    """The PyTorch thread counts the runs were timed with (stored runs keep their own count)."""
    runs = [r for res in results for r in res.runs]
    counts = sorted({r["threads"] for r in runs if "threads" in r})
    text = "/".join(map(str, counts)) + " PyTorch thread(s)" if counts else ""
    if any("threads" not in r for r in runs):
        text += ("; " if text else "") + "thread count not recorded for runs stored before it was kept"
    return text


def table(results: list[RowResult]) -> str:
    with_aux = any("dev_aux_accuracy" in r for res in results for r in res.runs)
    head = ["model", "dev weighted F1 %", "vs its reference row (95% CI)", "dev macro F1 %", "dev accuracy %",
            "chosen on dev", "train s / run", "command", "notes"]
    if with_aux:
        head.insert(8, "dev sentiment acc %")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * 6 + [":---"] * (len(head) - 7)) + "|"]
    for res in results:
        first = res.runs[0]
        chosen = (f"C = {first['C']}" if "C" in first
                  else ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in res.runs) + " epochs")
        delta = "-"
        if res.delta is not None:
            d, low, high = res.delta
            delta = f"{100 * d:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}) vs {res.reference}"
        cells = [res.label, res.cell("weighted_f1"), delta, res.cell("macro_f1"), res.cell("accuracy"), chosen,
                 f"{np.mean([r['seconds'] for r in res.runs]):.0f}", f"`{res.command}`" if res.command else "-",
                 res.notes]
        if with_aux:
            cells.insert(8, f"{100 * np.mean([r['dev_aux_accuracy'] for r in res.runs]):.1f}"
                         if "dev_aux_accuracy" in first else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def command_line(argv: list[str] | None) -> str:
    words = sys.argv[1:] if argv is None else argv
    threads = f"EMOFUSE_THREADS={os.environ['EMOFUSE_THREADS']} " if os.environ.get("EMOFUSE_THREADS") else ""
    return f"HF_HUB_OFFLINE=1 {threads}.venv/bin/python benchmarks/bench_meld.py {shlex.join(words)}".rstrip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bundle = load_meld(row_config(ROWS["text"], 0, args))
    n_train, n_dev = len(bundle.splits["train"]), len(bundle.splits["val"])
    print(f"MELD: {n_train} train, {n_dev} dev utterances", flush=True)
    cache = FeatureCache(args.cache_dir)

    results: list[RowResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-meld-") as tmp:
        for key in args.rows:
            if key == BASELINE:
                res = RowResult(key, "MiniLM sentence embedding + logistic regression (the baseline)", "",
                                "mean of token vectors, standardised", [logistic_baseline(bundle, cache, args)])  # fit in every run, never reused
            else:
                row = ROWS[key]
                res = RowResult(key, row.label, row_command(row, args), row.notes,
                                trained_adjusted=trains_adjusted(row_config(row, 0, args)))
                print(f"== {row.label}: {res.command}", flush=True)
                for seed in args.seeds:
                    r = stored_or_trained(row, seed, bundle, cache, args, Path(tmp))
                    print(f"   seed {seed}: dev weighted F1 {r['weighted_f1']:.4f}, macro F1 {r['macro_f1']:.4f} "
                          f"(epoch {r['best_epoch']} of {r['epochs_run']}, {r['seconds']:.0f} s)", flush=True)
                    res.runs.append(r)
            results.append(res)
    by_key = {res.key: res for res in results}
    for res in results:
        reference = by_key.get(ROWS[res.key].reference if res.key in ROWS else "text")
        if reference is None or reference is res:
            continue
        low, high = paired_bootstrap(bundle, [r["predictions"] for r in res.runs],
                                     [r["predictions"] for r in reference.runs], resamples=args.bootstrap)
        res.delta = (res.mean("weighted_f1") - reference.mean("weighted_f1"), low, high)
        res.reference = reference.key

    total = time.perf_counter() - started
    text = table(results)
    adjusted = posthoc_lines(bundle, results)
    if adjusted:
        text += (f"\n\nThe same runs after post-hoc logit adjustment (dev logits − {POSTHOC_TAU:g} · log train prior, "
                 "fixed beforehand, not tuned on dev):\n\n" + "\n".join(adjusted))
    print()
    print(text)
    print(f"\ntotal {total / 60:.1f} min")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        seeds = ", ".join(map(str, args.seeds))
        args.markdown.write_text(
            "### MELD dev: the presets side by side\n\n"
            f"Made with:\n\n```\n{command_line(argv)}\n```\n\n"
            f"MELD transcripts (`../shared/data/meld`): {n_train} train utterances (the whole train partition) to "
            f"fit, {n_dev} dev utterances to choose the epoch (best dev weighted F1, early stopping) and to report; "
            f"no test partition here, so these are dev numbers. Each trained row is its command (the preset's "
            f"settings), seeds {seeds}: mean ± the 95% t interval over seeds (one seed: no interval). "
            "\"vs its reference row\": the difference in mean dev weighted F1 from the row named (`text`, the "
            f"no-context row, unless the row says otherwise; for the baseline too), with a 95% paired bootstrap interval over {args.bootstrap} resamples of dev dialogues. "
            f"\"train s / run\": wall seconds of one training (CPU, {threads_used(results)}, "
            f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs; MiniLM's token vectors already "
            f"in the feature cache). Total {total / 60:.1f} min (stored rows reused, not retrained).\n\n"
            f"{text}\n",
            encoding="utf-8")
        print(f"wrote {args.markdown}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command_line(argv), "results": [
            {"key": res.key, "model": res.label, "command": res.command, "notes": res.notes, "delta": res.delta,
             "runs": [{k: v for k, v in r.items() if k not in ("predictions", "dev_logits")} for r in res.runs]}
            for res in results]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
