"""The reference comparison on real RAVDESS data, as one `emofuse compare` run over speaker folds.

Branches (the ``ravdess-reference`` preset, or ``--preset ravdess-egemaps``): ``video`` = the
``features`` encoder over the clip's facial action units (the AU table in ``../shared/data``),
``audio_text`` = the ``mm-lstm`` encoder over the speech recording and its statement text. Every
registered fusion (or ``--fusions``) is trained over the same frozen branches, each branch is scored
alone, and the baselines of `emofuse.core.apps.baselines` (logistic regression over each branch's
pooled frozen inputs, over both concatenated, the majority class) are fit on the same clips; every
model row carries its paired difference to the strongest baseline. All of that is
`emofuse.core.apps.compare`; this script only fixes the protocol and writes the Markdown with the
command that made it.

Protocol: cross-validation by actor (``--folds 4``: actors 1-3, 4-6, 7-9, 10-12 tested in turn, the
next two actors validate, the rest train), the protocol of the figures reported elsewhere for grouped
CV by actor on actors 1-12, 8 classes (eGeMAPS alone 47.2%, AUs alone 58.3%, both concatenated in one
logistic regression 71.7%, averaged probabilities 67.9%). Finished runs are reused by fingerprint.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference_table.py --preset ravdess-egemaps --folds 4 \
        --set train.refit=true --threads 1
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import emofuse  # noqa: E402
from emofuse.core.apps.compare import comparison_markdown  # noqa: E402
from emofuse.core.apps.report import write_json, write_text  # noqa: E402
from emofuse.core.config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The baselines reported elsewhere for grouped CV by actor on actors 1-12 (8 classes), for context.
REPORTED_BASELINES = {"eGeMAPS": 0.472, "AUs": 0.583, "concatenated": 0.717, "averaged probabilities": 0.679}

log = logging.getLogger("emofuse.benchmark")


def base_config(preset: str, data_dir: Path | None, sets: Sequence[str], out: Path) -> RunConfig:
    return emofuse.compose(preset, data=data_dir, output=out, sets=list(sets))


def command_line(argv: Sequence[str]) -> str:
    return "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reference_table.py " + shlex.join(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="ravdess-reference")
    p.add_argument("--data", type=Path, default=None, help="folder holding the corpora (default ../shared/data)")
    p.add_argument("--folds", type=int, default=4, help="speaker folds (0: one speaker-independent split)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--fusions", default=None, help="comma-separated fusions (default: every registered one)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--no-robustness", action="store_true", help="skip the modality-removed columns")
    p.add_argument("--threads", type=int, default=int(os.environ.get("EMOFUSE_THREADS", 0)) or None,
                   help="CPU threads for PyTorch (default: $EMOFUSE_THREADS, else PyTorch's choice)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reference-table")
    p.add_argument("--markdown", type=Path, default=ROOT / "benchmarks" / "results" / "reference_table.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["EMOFUSE_THREADS"] = str(args.threads)

    config = base_config(args.preset, args.data, args.sets, args.out)
    started = time.time()
    result = emofuse.compare(config, fusions=[f.strip() for f in args.fusions.split(",")] if args.fusions else None,
                             seeds=[int(s) for s in args.seeds.split(",") if s.strip()], folds=args.folds or None,
                             robustness=not args.no_robustness)  # its notes go to the log (the silent reporter)
    minutes = (time.time() - started) / 60
    reported = ", ".join(f"{k} {100 * v:.1f}%" for k, v in REPORTED_BASELINES.items())
    text = "\n".join([
        f"### RAVDESS reference comparison (`{args.preset}`)", "", "Made with:", "", "```", command_line(argv), "```",
        "", comparison_markdown(result, config=config),
        f"For context, logistic-regression figures reported elsewhere for grouped CV by actor: {reported}.", "",
        f"_{minutes:.1f} minutes on {os.cpu_count()} CPU core(s); raw numbers in `{result.out_dir}/`._", ""])
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.markdown, text)
    write_json(args.markdown.with_suffix(".json"), {"command": command_line(argv), "minutes": minutes,
                                                    "rows": result.rows, "stage_seconds": result.stage_seconds})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
