"""Fine-tuning a text encoder on MELD: seconds per training step, side by side in one run.

    HF_HUB_OFFLINE=1 python benchmarks/bench_finetune.py [--preset meld-finetune-mpnet] [--steps 12] [--repeats 3]

What makes a fine-tuning step slow on a CPU: padding (a shuffled batch pads to its longest utterance,
about twice the mean on MELD) and AdamW's per-tensor update loop over a 110M-parameter backbone. Four
variants of the preset's branch, each timed over the same first `--steps` training batches of its
sampler: random batches or `train.group_by_length` batches, AdamW's default loop or its fused kernel
(what `fit` uses where it can). Forward, loss, backward, clipping and the optimizer step are timed;
variants alternate `--repeats` times and the medians are compared. Also reported: the tokens each
batch pads to, per utterance, which is what grouping changes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from emofuse.core.data.cache import FeatureCache
from emofuse.core.data.pipeline import load_data
from emofuse.core.engine.branch_stage import BranchTask
from emofuse.core.engine.compose import ComposedModel, build_encoder, required_modalities
from emofuse.core.engine.distributed import DistContext
from emofuse.core.engine.fit import parameter_groups, seed_everything
from emofuse.core.presets import compose_config

BRANCH = "text"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="meld-finetune", help="a MELD fine-tuning preset (meld-finetune-mpnet: mpnet)")
    p.add_argument("--steps", type=int, default=12, help="training steps timed per variant and repeat")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats; medians are compared")
    p.add_argument("--threads", type=int, default=int(os.environ.get("EMOFUSE_THREADS", "0")) or None)
    p.add_argument("--data", type=Path, default=None, help="folder holding meld/ (default ../shared/data)")
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def batches_of(config: Any, bundle: Any, encoder: Any, grouped: bool, steps: int) -> list:
    train = config.train.model_copy(update={"group_by_length": grouped, "steps_per_epoch": steps})
    with tempfile.TemporaryDirectory() as tmp:
        task = BranchTask(ComposedModel({BRANCH: encoder}), bundle, FeatureCache(Path(tmp)), train, DistContext())
        return list(task.train_batches(0))


def padded_tokens(encoder: Any, batches: list) -> float:
    """Tokens per utterance the backbone computes over: each batch padded to its longest utterance."""
    tokenizer, cap = encoder.inner.text_backbone.tokenizer, encoder.inner.text_backbone.max_length
    total = sum(len(b) * max(min(cap, len(tokenizer(t or "")["input_ids"])) for t in b.text) for b in batches)
    return total / sum(len(b) for b in batches)


def time_steps(model: ComposedModel, batches: list, lr: float, fused: bool) -> float:
    """Median seconds of one training step (forward, loss, backward, clip, AdamW step) over `batches`."""
    optimizer = torch.optim.AdamW(parameter_groups(model, lr), lr=lr, weight_decay=1e-4, fused=fused)
    model.train()
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        logits, _ = model(batch, None)
        torch.nn.functional.cross_entropy(logits, batch.labels).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:] or seconds)  # the first step allocates the optimizer's moments


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = [f"data.data_dir={json.dumps(str(args.data))}"] if args.data else []
    config = compose_config(preset=args.preset, sets=sets)
    bundle = load_data(config.data, required_modalities(config))
    seed_everything(0)
    encoder = build_encoder(config.branches[BRANCH], bundle.num_classes, where=args.preset)
    if encoder.batches_by_dialogue:
        sys.exit(f"{args.preset}: batches whole dialogues, which length grouping leaves alone; pick a preset without")
    model = ComposedModel({BRANCH: encoder})
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    plans = {grouped: batches_of(config, bundle, encoder, grouped, args.steps) for grouped in (False, True)}
    variants = [(grouped, fused) for grouped in (False, True) for fused in (False, True)]
    times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for grouped, fused in variants:
            model.load_state_dict(initial)  # every variant steps from the same weights
            times[(grouped, fused)].append(time_steps(model, plans[grouped], config.train.lr, fused))
    base = statistics.median(times[(False, False)])
    rows = []
    for grouped, fused in variants:
        median = statistics.median(times[(grouped, fused)])
        rows.append({"batches": "length-grouped" if grouped else "random", "adamw": "fused" if fused else "default",
                     "seconds_per_step": round(median, 3), "speedup": round(base / median, 2),
                     "padded_tokens_per_utterance": round(padded_tokens(encoder, plans[grouped]), 1)})
    result = {"preset": args.preset, "backbone": encoder.inner.text_backbone.name, "batch_size": config.train.batch_size,
              "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}
    table = ["| batches | AdamW | padded tokens / utterance | s / step | speed-up |", "|:---|:---|---:|---:|---:|"]
    table += [f"| {r['batches']} | {r['adamw']} | {r['padded_tokens_per_utterance']} | {r['seconds_per_step']} | "
              f"{r['speedup']}x |" for r in rows]
    text = (f"Fine-tuning `{args.preset}` ({result['backbone']}, {result['batch_size']} utterances a batch), "
            f"median of {args.repeats} x {args.steps} steps, {result['threads']} threads, {result['machine']}.\n\n"
            + "\n".join(table) + "\n")
    print(text)
    if args.markdown:
        args.markdown.write_text(f"```\n{' '.join(['python', *sys.argv])}\n```\n\n" + text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
