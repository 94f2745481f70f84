"""Every results table in the docs, generated from the measurements in ``benchmarks/results/*.json``.

    .venv/bin/python benchmarks/results_tables.py            # rewrite the generated regions
    .venv/bin/python benchmarks/results_tables.py --check    # exit 1 when a committed region is stale

A generated region of a Markdown file (`TARGETS`) lies between ``<!-- results:NAME -->`` and
``<!-- /results -->``. NAME is a section of `SECTIONS` (its tables), ``NAME first`` (its first table alone,
as the README shows the main job) or ``all`` (every section with its title and description: the results page).

To publish a new measurement, write its JSON into ``benchmarks/results/`` and add a `Section` to `SECTIONS`.
The table's form follows the JSON's shape, and the formatter reuses the code that wrote the JSON:
``emofuse compare`` (`write_comparison`), ``emofuse evaluate --dataset`` (the cross-corpus report) and
``benchmarks/bench_meld.py``; any other measurement written as flat rows (a list of objects, or an object
whose ``rows`` is one: timings, say) becomes a table of its keys. A section with several comparison files
sets them side by side (``labels`` names the columns); several files of another shape are stacked.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_meld, beside this file


@dataclass(frozen=True)
class Section:
    """One results section: where its numbers come from, its title and what a reader should take from it."""

    name: str
    files: tuple[str, ...]
    title: str
    description: str
    #: Column labels of side-by-side comparison files, one per file.
    labels: tuple[str, ...] = ()


SECTIONS: list[Section] = [
    Section(
        "main-job", ("main_job_cv3.json",),
        "RAVDESS: the main job (`emofuse compare`, 3 speaker folds)",
        "`emofuse compare` with no arguments: the `ravdess-reference` preset (an action-unit `features` branch as "
        "\"video\", `mm-lstm` with the packaged Whisper tiny.en audio and MiniLM text, every fusion) over 3 folds of "
        "actors (each tested once; 4 test, 2 validation and 6 training actors a fold), one seed, beside logistic-"
        "regression baselines fit on the same training actors. 9 minutes on 2 cores from a fresh cache. The "
        "late fusions beat the strongest baseline (the branch regressions with their probabilities averaged) in "
        "every fold. The second table sets each branch beside the regressions over its own inputs: the audio-text "
        "branch clearly beats the usual recipe (Whisper's last layer), but a regression that reads every Whisper "
        "layer gains most of that too, and the AU branch does not beat its own regression."),
    Section(
        "main-job-time", ("main_job_timing.json",),
        "RAVDESS: the main job's time, before and after scoring from the feature cache",
        "The main job from fresh folders, back to back on one idle 2-core machine, before and after scoring, "
        "evaluation and prediction read the frozen features that training stored (ablations mark the modality absent "
        "over the same features). Every row's accuracy and every ablation's are identical to the digit in both runs."),
    Section(
        "schedule", ("main_job_cv3.json", "main_job_cv3_early_stopping.json", "main_job_whisper_cv4.json"),
        "RAVDESS: a fixed schedule against early stopping",
        "Why the `mm-lstm` preset trains a fixed 20 epochs and keeps the last: with early stopping on the validation "
        "loss, one fold's 2 validation actors stopped the branch after 3 epochs (second column). With 4 folds (7 "
        "training actors) early stopping does better, but the run takes 14 minutes instead of 10, so the main job "
        "uses 3 folds and the fixed schedule.",
        labels=("fixed schedule, 3 folds", "early stopping, 3 folds", "early stopping, 4 folds")),
    Section(
        "whisper-base", ("ravdess_whisper_base_vs_tiny_cv3.json",),
        "RAVDESS: Whisper base beside tiny.en, one comparison, every row also scored on EmoDB",
        "The main job with a third branch: `mm-lstm` over multilingual Whisper base (installed with "
        "`EMOFUSE_WHISPER_BASE=1 bash scripts/setup.sh`) beside the tiny.en one, same folds and seed, and every row "
        "and baseline also scored on all of EmoDB over the six classes both corpora name (`--cross-dataset emodb`). "
        "Base's branch is a point above tiny.en's (73.2 against 72.2 %, inside the fold spread) and its last layer "
        "helps a regression (67.6 against 63.9 %), at about 1.5x the encoding and training time; the main job, "
        "which must stay under 10 minutes, stays on tiny.en. The fusions here fuse all three branches (84.3 %). On "
        "EmoDB every row falls to about 29 % WA (a sixth of the clips would be chance): models of acted English "
        "speech do not carry over to German; the AU branch and the rows built on it read nothing there."),
    Section(
        "speaker-normalisation", ("main_job_cv3.json", "main_job_per_speaker_cv3.json"),
        "RAVDESS: per-speaker normalisation (transductive)",
        "The main job again with `--set data.speaker_normalization=per-speaker`: every speaker's inputs (the action "
        "units, the cached Whisper and MiniLM features, the baselines' pooled vectors) standardised over all that "
        "speaker's clips, the test speakers' unlabelled clips included. That is transductive: it assumes a batch of "
        "each new speaker's recordings at hand, so such a model cannot predict a lone clip (predict and serve refuse "
        "it). Every row gains 7-17 points; the fusions stay ahead of the strongest baseline (90.7 against 87.2 %, "
        "+3.5, interval +1.7 to +5.3, above it in 2 of 3 folds), but the audio-text branch alone now trails the regression over "
        "its own inputs (79.4 against 80.8 %).",
        labels=("none", "per-speaker")),
    Section(
        "emodb", ("emodb_reference_loso.json",),
        "EmoDB: leave one speaker out (`emofuse compare --preset emodb-reference --folds 10`)",
        "German acted speech (535 clips, 10 speakers, 7 classes with boredom), speech only, so the `mm-lstm` "
        "branch alone beside the baselines over its own inputs; 10 folds, each speaker tested once. The branch "
        "beats the usual recipe (Whisper's last layer) clearly and the regression over everything it reads by a "
        "margin whose interval touches zero: ahead, but only just clear of the noise."),
    Section(
        "cross-corpus", ("cross_corpus_ravdess_to_emodb.json", "cross_corpus_emodb_to_ravdess.json",
                         "cross_corpus_ravdess_to_emodb_without_text.json",
                         "cross_corpus_emodb_to_ravdess_without_text.json"),
        "Cross-corpus: RAVDESS and EmoDB (`emofuse evaluate MODEL --dataset NAME --baseline`)",
        "A model trained on one corpus (`mm-lstm` on RAVDESS's speaker split; `emodb-reference` on EmoDB's) scored "
        "on every clip of the other over the six classes both name; the baselines are fit on the clips the model "
        "learned from. Said plainly: across corpora everything falls to about a third right (in-corpus: 72-88 %), "
        "and the model's lead over the Whisper last-layer regression is inside the noise in both directions. The "
        "regression over every input collapses because its MiniLM features of German and English sentences share "
        "nothing; without the text at test time (`--without text`) the models lose little."),
    Section(
        "egemaps", ("compare_egemaps_cv4_refit.json",),
        "RAVDESS with eGeMAPS audio: the fusions do not beat the simple model",
        "`emofuse compare --preset ravdess-egemaps --folds 4 --set fusion_inputs=in-sample --set train.refit=true`: "
        "eGeMAPS in place of Whisper, 4 actor folds, branches and fusions trained again on train + validation "
        "(refit). An honest negative result: every fusion trails the regression over the concatenated inputs, in "
        "every fold. Whisper features (the main job) are what lifted the audio-text branch and the fusions above "
        "the baselines."),
    Section(
        "whisper-padding", ("whisper_padding.json",),
        "RAVDESS: padding clips before Whisper (`audio_padding_seconds`)",
        "`mm-lstm`'s `audio_padding_seconds` pads each clip shorter than it with silence before a Whisper backbone "
        "(0, the default: the clip's own frames; 30: Whisper's full window) and keeps every frame of the padded "
        "window. Measured with the baselines' regression over the last layer's mean+std (padded frames included; "
        "beside it, the same encoding pooled over the clip's own frames), leave one actor out, 720 clips "
        "(`benchmarks/bench_whisper_padding.py`, one thread). Padding gains nothing clear: pooled as mm-lstm "
        "pools it, every difference to clip length is under a point with an interval across zero (pooled over the "
        "clip's own frames, base at 4 s gains 1.4, its interval just reaching zero), while the 30 s window encodes "
        "about 10x slower (Whisper base at 30 s was not run: about 12 minutes). Over 4 actor folds "
        "(`whisper_padding_cv4.json`) tiny.en at 30 s is 3.2 points below clip length. The default stays at 0."),
    Section(
        "meld-frozen", ("meld_mpnet_3seeds.json",),
        "MELD: frozen text encoders and dialogue context (3 seeds)",
        "MELD transcripts (Friends dialogues, 7 emotions): the whole train partition to fit, dev to choose the epoch "
        "and to report; ± is the 95% t interval over seeds (`benchmarks/bench_meld.py`, 2 threads). Every text branch "
        "beats the sentence-embedding baseline by about 4-5 points of weighted F1, but neither the larger encoder "
        "(all-mpnet-base-v2) nor dialogue context measurably raises it: all four rows lie inside the seed spread."),
    Section(
        "meld-finetuned", ("meld_finetune_mpnet_adjusted_3seeds.json", "meld_finetune_mpnet_adjusted_long_3seeds.json",
                           "meld_finetune_mpnet_linear_3seeds.json"),
        "MELD: fine-tuning all-mpnet-base-v2 (3 seeds)",
        "`meld-finetune-mpnet` (the best preset) and the measured variants in `benchmarks/configs/`: a logit-adjusted "
        "loss (`meld-finetune-mpnet-adjusted.toml`) trades about a point of weighted F1 for 2-4 points of macro F1 "
        "(rare classes), and training it longer keeps that trade; a plain sentence classifier inside the engine "
        "(`meld-finetune-mpnet-linear.toml`) scores level with the preset. None reaches weighted F1 61 or macro F1 "
        "45; fine-tuning costs 35-55 minutes a run on 2 cores."),
    Section(
        "meld-one-seed", ("meld_finetune_plain_seed0.json", "meld_finetune_turns_seed0.json",
                          "meld_finetune_adjusted_seed0.json", "meld_finetune_mpnet_pooled_seed0.json",
                          "meld_finetune_mpnet_named_seed0.json", "meld_finetune_mpnet_onelr_seed0.json",
                          "meld_finetune_mpnet_turns_seed0.json"),
        "MELD: single-seed experiments that did not help",
        "One seed each, so a difference under about 1.5 points (the seed spread above) says nothing. Reading the "
        "previous turns inside the encoder's input, naming the speaker, a mean-pooled head, one learning rate for "
        "encoder and head, and dialogue context on a fine-tuned encoder: none raised weighted F1 by more than half a "
        "point over the row it started from (a logit-adjusted loss buys macro F1 with accuracy). Their "
        "configurations are in `benchmarks/configs/`."),
]

#: Files holding generated regions, relative to the repository root.
TARGETS = ("README.md", "docs/results.md")

REGION = re.compile(r"<!-- results:(?P<name>[\w-]+)(?: (?P<mode>first))? -->\n.*?<!-- /results -->", re.S)


# -- one JSON shape each ---------------------------------------------------------------------------------
def _is_comparison(doc: Any) -> bool:
    return isinstance(doc, dict) and "rows" in doc and "baseline_key" in doc


def _is_cross_corpus(doc: Any) -> bool:
    return isinstance(doc, dict) and "shared_classes" in doc and "metrics" in doc


def _is_meld(doc: Any) -> bool:
    return isinstance(doc, dict) and "results" in doc and "bench_meld.py" in doc.get("command", "")


COMPARISON_KEYS = ("model", "accuracy", "vs_baseline_text", "folds_above", "macro_f1", "uar")
CROSS_KEYS = ("cross_accuracy", "cross_uar", "cross_macro_f1")


def comparison_tables(docs: list[dict[str, Any]], labels: tuple[str, ...]) -> list[str]:
    """One `emofuse compare` result: its rows in the columns `write_comparison` uses (the headline ones) and
    each branch beside the regressions over its own inputs. Several: their accuracy side by side."""
    from emofuse.core.apps.compare import comparison_columns
    from emofuse.core.apps.report import Column, markdown_table

    if len(docs) > 1:
        return [side_by_side(docs, labels)]
    doc = docs[0]
    cross = (doc.get("cross_corpus") or {}).get("dataset")  # a second corpus every row was also scored on
    by_key = {c.key: c for c in comparison_columns([], folds=bool(doc["folds"]), cross=cross)}
    keys = COMPARISON_KEYS + (CROSS_KEYS if cross else ())
    tables = [markdown_table(doc["rows"], [by_key[k] for k in keys if k in by_key])]
    own = [{"branch": r["model"], "accuracy": r["accuracy"], "baseline": b["baseline"].removeprefix("baseline: "),
            "baseline_accuracy": b["accuracy"], "text": b["text"], "folds_above": b.get("folds_above")}
           for r in doc["rows"] for b in r.get("vs_own_baselines", ()) if "text" in b]
    if own:
        pct = dict(fmt=".1f", pct=True)
        columns = [Column("branch", "Branch", justify="left"), Column("accuracy", "Acc %", **pct),
                   Column("baseline", "Regression over its own inputs", justify="left"),
                   Column("baseline_accuracy", "Its acc %", **pct), Column("text", "Δ, points (95% CI)"),
                   *([Column("folds_above", "Folds above")] if doc["folds"] else [])]
        tables.append(markdown_table(own, columns))
    return tables


def side_by_side(docs: list[dict[str, Any]], labels: tuple[str, ...]) -> str:
    """Several comparisons' accuracy (mean ± std over folds) per row, rows matched by their key."""
    from emofuse.core.apps.report import Column, markdown_table

    if len(labels) != len(docs):
        raise SystemExit(f"a section with {len(docs)} comparison files needs {len(docs)} labels, not {len(labels)}")
    rows: dict[str, dict[str, Any]] = {}
    for i, doc in enumerate(docs):
        for r in doc["rows"]:
            row = rows.setdefault(r["key"], {"model": r["model"]})
            row.update({f"accuracy_{i}": r["accuracy"], f"accuracy_{i}_std": r.get("accuracy_std")})
    columns = [Column("model", "Model", justify="left"),
               *(Column(f"accuracy_{i}", f"Acc % ({label})", ".1f", std_key=f"accuracy_{i}_std", pct=True)
                 for i, label in enumerate(labels))]
    return markdown_table(list(rows.values()), columns)


def cross_corpus_tables(docs: list[dict[str, Any]], labels: tuple[str, ...]) -> list[str]:
    """`emofuse evaluate --dataset --baseline` reports stacked: the model's row, then each baseline's, with the
    model's paired difference to it (the report's own rows and columns), under a "trained on -> scored on" cell."""
    from emofuse.core.apps.cross_corpus import cross_corpus_columns, rows_of
    from emofuse.core.apps.report import Column, markdown_table

    rows = []
    for doc in docs:
        result = SimpleNamespace(source=doc["source"], report=SimpleNamespace(metrics=doc["metrics"]),
                                 baselines=doc.get("baselines"))
        pair = f"{doc['source']} -> {doc['dataset']} ({doc['num_samples']} clips)"
        if doc.get("dropped_modalities"):
            pair += f", without {', '.join(doc['dropped_modalities'])}"
        rows += [{**row, "pair": pair if i == 0 else ""} for i, row in enumerate(rows_of(result))]
    return [markdown_table(rows, [Column("pair", "Trained on -> scored on", justify="left"), *cross_corpus_columns()])]


def meld_tables(docs: list[dict[str, Any]], labels: tuple[str, ...]) -> list[str]:
    """`bench_meld.py` results stacked (a row met again in a later file is skipped): each row's dev scores as
    `bench_meld.py` writes them (mean ± 95% t interval over seeds), its budget and training time."""
    from bench_meld import RowResult

    from emofuse.core.apps.report import Column, markdown_table

    seen: set[tuple[str, int]] = set()
    rows = []
    for doc in docs:
        for r in doc["results"]:
            steps = r["runs"][0].get("steps_per_epoch")
            if (r["key"], steps) in seen:
                continue
            seen.add((r["key"], steps))
            result = RowResult(r["key"], r["model"], r["command"], r["notes"], r["runs"])
            chosen = ("" if "best_epoch" not in r["runs"][0] else
                      ", ".join(f"{run['best_epoch']}/{run['epochs_run']}" for run in r["runs"]))
            rows.append({"model": r["model"], "seeds": len(r["runs"]) if chosen else "",
                         **{m: result.cell(m) for m in ("weighted_f1", "macro_f1", "accuracy")},
                         "steps": steps or "", "chosen": chosen,
                         "seconds": sum(run["seconds"] for run in r["runs"]) / len(r["runs"])})
    columns = [Column("model", "Model", justify="left"), Column("seeds", "Seeds"),
               Column("weighted_f1", "Dev weighted F1 %"), Column("macro_f1", "Dev macro F1 %"),
               Column("accuracy", "Dev acc %"), Column("steps", "Steps / epoch"),
               Column("chosen", "Chosen epoch / run"), Column("seconds", "Train s / run", ".0f")]
    return [markdown_table(rows, columns)]


def _is_whisper_padding(doc: Any) -> bool:
    return isinstance(doc, list) and bool(doc) and all(isinstance(r, dict) and {"backbone", "padding_seconds"} <= set(r)
                                                       for r in doc)


def whisper_padding_tables(docs: list[dict[str, Any]], labels: tuple[str, ...]) -> list[str]:
    """`bench_whisper_padding.py` rows, in the table that script writes."""
    from bench_whisper_padding import padding_table

    return [padding_table(doc) for doc in docs]


def _records(doc: Any) -> list[dict[str, Any]] | None:
    """The rows of a plain measurement: a list of flat objects, or an object whose ``rows`` is one."""
    rows = doc.get("rows") if isinstance(doc, dict) else doc
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        if all(not isinstance(v, (dict, list)) for r in rows for v in r.values()):
            return rows
    return None


def _is_records(doc: Any) -> bool:
    return _records(doc) is not None


def records_tables(docs: list[dict[str, Any]], labels: tuple[str, ...]) -> list[str]:
    """Any other measurement written as flat rows (timings, say): one column per key, in the order the keys
    first appear, numbers to 4 significant digits; several files are stacked."""
    from emofuse.core.apps.report import Column, markdown_table

    rows = [row for doc in docs for row in _records(doc) or []]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    number = (lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    columns = [Column(key, key.replace("_", " "), number, justify="left" if i == 0 else "right")
               for i, key in enumerate(keys)]
    return [markdown_table(rows, columns)]


#: (is this the shape?, its tables), tried in order: the first shape every file of a section has wins.
FORMATS: list[tuple[Callable[[Any], bool], Callable[[list[dict[str, Any]], tuple[str, ...]], list[str]]]] = [
    (_is_comparison, comparison_tables),
    (_is_cross_corpus, cross_corpus_tables),
    (_is_meld, meld_tables),
    (_is_whisper_padding, whisper_padding_tables),
    (_is_records, records_tables),
]


# -- sections and regions --------------------------------------------------------------------------------
def section_tables(section: Section) -> list[str]:
    docs = [json.loads((RESULTS / name).read_text(encoding="utf-8")) for name in section.files]
    for is_shape, tables in FORMATS:
        if all(is_shape(doc) for doc in docs):
            return tables(docs, section.labels)
    raise SystemExit(f"section {section.name!r}: {', '.join(section.files)} are not all of one known shape "
                     "(an `emofuse compare` comparison.json, a cross-corpus report, a bench_meld.py result, or "
                     "flat rows: a list of objects or {\"rows\": [...]}); add a formatter to FORMATS")


def sources(section: Section) -> str:
    return "Source: " + ", ".join(f"`benchmarks/results/{name}`" for name in section.files) + "."


def render_all() -> str:
    parts = []
    for section in SECTIONS:
        parts += [f"## {section.title}\n", section.description + "\n", *section_tables(section), sources(section) + "\n"]
    return "\n".join(parts)


def render_region(name: str, mode: str | None) -> str:
    if name == "all":
        return render_all()
    section = next((s for s in SECTIONS if s.name == name), None)
    if section is None:
        raise SystemExit(f"<!-- results:{name} -->: no such section (known: all, {', '.join(s.name for s in SECTIONS)})")
    tables = section_tables(section)
    return "\n".join(tables[:1] if mode == "first" else tables)


def render(text: str) -> str:
    """`text` with every generated region filled in from the JSON files."""
    def fill(match: re.Match[str]) -> str:
        mode = f" {match['mode']}" if match["mode"] else ""
        return f"<!-- results:{match['name']}{mode} -->\n{render_region(match['name'], match['mode'])}<!-- /results -->"

    return REGION.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report files whose generated regions are stale")
    args = p.parse_args(argv)
    stale = []
    for relative in TARGETS:
        path = ROOT / relative
        text = path.read_text(encoding="utf-8")
        rendered = render(text)
        if rendered != text:
            stale.append(relative)
            if not args.check:
                path.write_text(rendered, encoding="utf-8")
    verb = "stale (run benchmarks/results_tables.py)" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale)}" if stale else "results tables up to date")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
