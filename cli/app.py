"""The ``emofuse`` command line: parse, compose through the registry, call the core, print with rich.

Thin on purpose: train, evaluate, compare and search are calls of the Python API (`emofuse.compose`,
`emofuse.train`, ...) with their results printed here. Errors the user can fix print as one line,
exit code 2.
Heavy modules (torch, the engine, the apps) are imported inside the commands that need them, so that
`emofuse --help`, `emofuse presets` and a cached `emofuse plugins` answer without importing torch.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from emofuse.core.errors import EmofuseError

app = typer.Typer(
    name="emofuse",
    help="Multimodal emotion recognition: compose encoders, fusions and losses from plugins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide enough for the comparison table when output goes to a file or a pipe (rich's default there is 80).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

DEFAULT_MAIN_PRESET = "ravdess-reference"
#: The main job (`emofuse compare` with no arguments) cross-validates by speaker: RAVDESS test splits
#: of 2-3 actors would let a clip or two decide the ranking. 3 folds (4 test, 2 validation, 6 training actors
#: each) keep it within 10 minutes on 2 cores; 4 folds took 13.6 (docs/results.md).
DEFAULT_MAIN_FOLDS = 3


@app.callback()
def _global_options(
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, envvar="EMOFUSE_THREADS",
        help="CPU threads for PyTorch (default: PyTorch's choice; 1 is fastest on a busy machine)."),
):
    """Multimodal emotion recognition: compose encoders, fusions and losses from plugins."""
    if threads:  # applied when a command that computes starts (`_use_threads`): help and listings skip torch
        os.environ["EMOFUSE_THREADS"] = str(threads)  # the trainer then keeps this choice


#: Commands that compute nothing: they run without importing torch, so `--threads` waits for the others.
LISTING_COMMANDS = frozenset({"plugins_cmd", "presets_cmd", "new_plugin_cmd", "cache_cmd", "cache_prune_cmd"})


def _use_threads(command: Callable) -> None:
    threads = os.environ.get("EMOFUSE_THREADS")
    if threads and command.__name__ not in LISTING_COMMANDS:
        import torch

        torch.set_num_threads(int(threads))


def friendly_errors(fn: Callable) -> Callable:
    """Print an `EmofuseError` as one red line (no traceback) and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from emofuse.cli.progress import RichReporter
        from emofuse.core.engine.progress import reporting

        _use_threads(fn)
        try:
            with reporting(RichReporter(console)):
                return fn(*args, **kwargs)
        except EmofuseError as exc:
            # The message is data, never markup: a plugin's text may hold `[/x]`, which rich would parse.
            err_console.print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted: the last checkpoint is kept; rerun the same command to resume[/]")
            raise typer.Exit(130) from None

    return wrapper


# --- options shared by the commands that compose a run -------------------------------------------
PresetOpt = typer.Option(None, "--preset", "-p", help="A preset from registry.toml (see `emofuse presets`).")
ConfigOpt = typer.Option(None, "--config", "-c", help="A run config TOML file.", exists=False)
EncoderOpt = typer.Option(None, "--encoder", "-e", help="Branch encoder, as NAME or BRANCH=NAME (repeatable); replaces the preset's branches.")
FusionOpt = typer.Option(None, "--fusion", "-f", help="Fusion over the branches, or 'none'.")
LossOpt = typer.Option(None, "--loss", "-l", help="Loss component.")
SetOpt = typer.Option(None, "--set", "-s", help="Override any config key: key.path=value (repeatable).")
DataOpt = typer.Option(None, "--data", "-d", help="Folder holding the corpora (default: $EMOFUSE_DATA, else shared/data in the current folder or the nearest one above it).")
DatasetOpt = typer.Option(None, "--dataset", help="Dataset reader (see `emofuse plugins`).")
LabelsOpt = typer.Option(None, "--labels", help="Explicit label set, comma-separated, in class-index order.")
OutputOpt = typer.Option(None, "--output", "-o", help="Folder for runs (default: runs/).")
TranscriberOpt = typer.Option(None, "--transcriber", envvar="EMOFUSE_TRANSCRIBER", metavar="MODEL",
                              help="Whisper that transcribes clips without text: whisper (tiny.en, English, the "
                                   "default) or whisper-base (multilingual; EMOFUSE_WHISPER_BASE=1 scripts/setup.sh).")
LanguageOpt = typer.Option(None, "--language", envvar="EMOFUSE_TRANSCRIBE_LANGUAGE", metavar="CODE",
                           help="Language of the speech for --transcriber whisper-base (de, en, ...); default: "
                                "detected per clip.")
NameOpt = typer.Option(None, "--name", "-n", help="Run name (folder under --output).")
SeedOpt = typer.Option(None, "--seed", help="Random seed of every stage (train, fusion_train, branch_train.*).")
EpochsOpt = typer.Option(None, "--epochs", help="Maximum epochs of every stage (train, fusion_train, branch_train.*); --set train.epochs=N sets the [train] key alone.")
PrecisionOpt = typer.Option(None, "--precision", help="auto|fp32|bf16|fp16, for every stage.")
BadSampleOpt = typer.Option(None, "--on-bad-sample", help="error (default) or skip: leave unreadable or unusable samples out; they are counted in a warning, and train lists each one at the end.")
LimitOpt = typer.Option(None, "--limit", help="Use at most N samples, N >= 1 (quick runs; leave it out for all).")


def compose_run_config(*, encoder: list[str] | None = None, sets: list[str] | None = None, **flags: Any):
    """The command's flags -> `emofuse.compose` (one validated `RunConfig`)."""
    import emofuse

    cfg = emofuse.compose(encoders=encoder, sets=sets or [], **flags)
    if encoder and (flags.get("preset") or flags.get("config")):  # say what --encoder replaced and kept
        from emofuse.core.engine.compose import encoder_replacement_note
        from emofuse.core.presets import compose_config

        before = compose_config(preset=flags.get("preset"), config_file=flags.get("config"))
        note = encoder_replacement_note(before, cfg, name_given=bool(flags.get("name")))
        if note:
            err_console.print(Text(note, style="yellow"), highlight=False, soft_wrap=True)
    return cfg


# --- commands --------------------------------------------------------------------------------------
@app.command("plugins")
@friendly_errors
def plugins_cmd(
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help="Only this kind: encoder, fusion, loss, dataset."),
    options: bool = typer.Option(False, "--options", help="Also list each component's options and defaults."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List every registered component: kind, name, provider distribution and version, summary."""
    from emofuse.core.apps.components import list_components

    listing = list_components()
    rows = [c for c in listing.components if kind is None or c.kind == kind]
    if as_json:
        out = [{k: v for k, v in vars(c).items()} for c in rows]
        typer.echo(json.dumps({"components": out, "problems": listing.problems}, indent=2))
        return
    table = Table(title="emofuse components", show_lines=options)
    for col in ("kind", "name", "provider", "summary"):
        table.add_column(col, overflow="fold")
    if options:
        table.add_column("options (name: type = default; constraints; help)", overflow="fold")
    for c in rows:
        cells = [c.kind, c.name, f"{c.distribution} {c.version}", c.summary]
        if options:
            cells.append("\n".join(_option_line(name, o) for name, o in c.options.items()))
        table.add_row(*(Text(cell) for cell in cells))  # plain text: a summary or help may hold [brackets]
    console.print(table)
    if options and (kind in (None, "dataset")):
        console.print(Text("dataset options go under data.options in a config, or --set data.options.KEY=VALUE"))
    for p in listing.problems:
        err_console.print(Text.assemble(("skipped plugin ", "yellow"), p), highlight=False)


def _option_line(name: str, option: dict[str, str]) -> str:
    line = f"{name}: {option['type']} = {option['default']}"
    if option["constraints"]:
        line += f"; {option['constraints']}"
    return line + (f"; {option['help']}" if option["help"] else "")


@app.command("new-plugin")
@friendly_errors
def new_plugin_cmd(
    name: str = typer.Argument(..., help="Plugin name, e.g. prosody: writes the package emofuse-NAME."),
    into: Path = typer.Option(Path("."), "--into", help="Folder to create the package in."),
):
    """Write a plugin package (an encoder, a fusion, their conformance tests) to start a component from."""
    from emofuse.core.apps.scaffold import new_plugin

    target = new_plugin(name, into)
    console.print(f"wrote {target}: pip install -e '{target}[test]' && pytest {target}/tests", markup=False, highlight=False)


@app.command("presets")
@friendly_errors
def presets_cmd(
    show: Optional[str] = typer.Argument(None, help="Print this preset's resolved config as TOML."),
):
    """List the presets in registry.toml, or show one as a full run config."""
    from emofuse.core.config import to_toml
    from emofuse.core.presets import compose_config, describe, load_presets

    presets = load_presets()
    if show:
        typer.echo(to_toml(compose_config(preset=show)))
        return
    table = Table(title="presets (registry.toml)")
    table.add_column("preset")
    table.add_column("branches")
    table.add_column("fusion")
    table.add_column("loss")
    table.add_column("description", overflow="fold")
    for name in presets:
        cfg = compose_config(preset=name)
        branches = ", ".join(f"{b}={r.name}" for b, r in cfg.branches.items())
        table.add_row(name, branches, cfg.fusion.name if cfg.fusion else "-", cfg.loss.name, describe(name, presets))
    console.print(table)


@app.command("train")
@friendly_errors
def train_cmd(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    encoder: Optional[List[str]] = EncoderOpt,
    fusion: Optional[str] = FusionOpt,
    loss: Optional[str] = LossOpt,
    sets: Optional[List[str]] = SetOpt,
    data: Optional[Path] = DataOpt,
    dataset: Optional[str] = DatasetOpt,
    labels: Optional[str] = LabelsOpt,
    output: Optional[Path] = OutputOpt,
    name: Optional[str] = NameOpt,
    seed: Optional[int] = SeedOpt,
    epochs: Optional[int] = EpochsOpt,
    precision: Optional[str] = PrecisionOpt,
    on_bad_sample: Optional[str] = BadSampleOpt,
    limit: Optional[int] = LimitOpt,
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Resume from the run folder's last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run of another config in the run folder (without it, such a folder is refused)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the composed config and exit."),
):
    """Train a composed model: one branch alone, or each branch then a fusion over them (staged)."""
    from emofuse.core.config import to_toml

    cfg = compose_run_config(**_compose_args(locals()))
    if dry_run:
        typer.echo(to_toml(cfg))
        return
    import emofuse

    _print_run_result(emofuse.train(cfg, resume=resume, overwrite=overwrite))


def _compose_args(values: dict[str, Any]) -> dict[str, Any]:
    keys = ("preset", "config", "encoder", "fusion", "loss", "sets", "data", "dataset", "labels", "output", "name",
            "seed", "epochs", "precision", "on_bad_sample", "limit")
    return {k: values.get(k) for k in keys}


def _print_run_result(result: Any) -> None:
    table = Table(title=f"run {result.run_dir}")
    table.add_column("split")
    metric_names = sorted({m for split in result.metrics.values() for m in split}, key=lambda m: (m != "n", m))
    for m in metric_names:
        table.add_column(m, justify="right")
    for split, values in result.metrics.items():  # n: clips scored, a count
        table.add_row(split, *[("" if m not in values else f"{values[m]:.0f}" if m == "n" else f"{values[m]:.4f}")
                               for m in metric_names])
    console.print(table)
    if result.fusion_report:
        console.print(Text.assemble(("fusion learned: ", "bold"), json.dumps(result.fusion_report, indent=2)))
    console.print(f"best checkpoint: {result.checkpoint}", markup=False, highlight=False)
    if result.skipped:
        from emofuse.core.data.pipeline import skipped_report

        err_console.print(Text(skipped_report(result.skipped), style="yellow"), highlight=False)


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    checkpoint: Path = typer.Argument(..., help="A model.safetensors written by `emofuse train`."),
    split: str = typer.Option("test", "--split", help="train, val or test."),
    data: Optional[Path] = DataOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for metrics.json, the table and confusion PNG."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for 95% intervals (0: none)."),
    without: Optional[List[str]] = typer.Option(None, "--without", help="Remove this modality at test time (repeatable)."),
    on_bad_sample: Optional[str] = typer.Option(None, "--on-bad-sample", help="error or skip (default: the run's setting): skip leaves unreadable clips out of the score and lists them."),
    explain: int = typer.Option(0, "--explain", min=0, help="Also draw explanation PNGs for the split's first N clips (into <out>/explain)."),
    baseline: bool = typer.Option(False, "--baseline", help="Also fit logistic-regression and majority baselines on the run's split and show the model's paired difference to each."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Cross-corpus: score on every clip of this other corpus (read from --data) over the classes both name; the clips and classes left out are listed."),
):
    """Score a checkpoint on a split: accuracy, F1s, UA/WA, per-class metrics, confusion matrix, 95% CIs."""
    import emofuse
    from emofuse.cli.tables import evaluation_tables, rich_table
    from emofuse.core.apps.report import Column

    if dataset is not None:
        from emofuse.core.errors import ConfigError

        if split != "test" or explain:
            raise ConfigError("--dataset scores every clip of the other corpus", hint="drop --split/--explain")
        cross = emofuse.evaluate_on(checkpoint, dataset, data=data, out=out, bootstrap=bootstrap,
                                    without=tuple(without or ()), on_bad_sample=on_bad_sample, baseline=baseline)
        console.print(cross.files["cross_corpus"].read_text(encoding="utf-8"), markup=False, highlight=False)
        for table in evaluation_tables(cross.report, title=cross.title):
            console.print(table)
        console.print(f"written: {', '.join(str(p) for p in cross.files.values())}", markup=False, highlight=False)
        if cross.skipped:
            from emofuse.core.data.pipeline import skipped_report

            console.print(skipped_report(cross.skipped), markup=False, highlight=False)
        return
    result = emofuse.evaluate(checkpoint, split=split, data=data, out=out, bootstrap=bootstrap,
                              without=tuple(without or ()), on_bad_sample=on_bad_sample, explain=explain,
                              baseline=baseline)
    if result.unexplained:
        console.print(f"{result.unexplained} of {explain} clips could not be explained (unreadable)")
    if result.baselines is not None:
        console.print(rich_table(result.baselines, [Column("model", "Baseline (same clips)", justify="left"),
                                                    Column("accuracy", "Acc %", ".1f", pct=True),
                                                    Column("text", "Model minus baseline, points (95% CI)")],
                                 title=f"model: {100 * result.report.metrics['accuracy']:.1f}% accuracy"))
    for table in evaluation_tables(result.report, title=result.title):
        console.print(table)
    console.print(f"written: {', '.join(str(p) for p in result.files.values())}", markup=False, highlight=False)
    if result.skipped:
        from emofuse.core.data.pipeline import skipped_report

        console.print(skipped_report(result.skipped), markup=False, highlight=False)


@app.command("compare")
@friendly_errors
def compare_cmd(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    encoder: Optional[List[str]] = EncoderOpt,
    fusions: Optional[str] = typer.Option(None, "--fusions", help="Comma-separated fusions (default: every registered one)."),
    loss: Optional[str] = LossOpt,
    sets: Optional[List[str]] = SetOpt,
    data: Optional[Path] = DataOpt,
    dataset: Optional[str] = DatasetOpt,
    labels: Optional[str] = LabelsOpt,
    output: Optional[Path] = OutputOpt,
    name: Optional[str] = NameOpt,
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds; several give mean and std."),
    epochs: Optional[int] = EpochsOpt,
    precision: Optional[str] = PrecisionOpt,
    on_bad_sample: Optional[str] = BadSampleOpt,
    limit: Optional[int] = LimitOpt,
    robustness: bool = typer.Option(True, "--robustness/--no-robustness", help="Also score with one modality removed at test time."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for comparison.md/.csv/.json/.png (default: under the run folder)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace runs of another config found in the comparison's run folders (without it, such a folder is refused)."),
    folds: Optional[int] = typer.Option(None, "--folds", help=f"Cross-validate over K speaker folds (each speaker tested once): mean ± std and paired differences per fold (default: {DEFAULT_MAIN_FOLDS} for the main job, the {DEFAULT_MAIN_PRESET} preset chosen by default; else one split)."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also fit the logistic-regression and majority-class baselines on the same clips and inputs."),
    cross_dataset: Optional[str] = typer.Option(None, "--cross-dataset", help="Cross-corpus: also score every row, baselines included, on every clip of this second corpus over the classes both name (read from --cross-data)."),
    cross_data: Optional[Path] = typer.Option(None, "--cross-data", help="Folder holding the second corpus (default: the --data folder)."),
):
    """Compare every registered fusion (and each branch alone) over the same frozen branches and beside simple baselines, in one table."""
    values = _compose_args(locals())
    values["fusion"] = None
    values["seed"] = None
    values["preset"] = preset or (None if config or encoder else DEFAULT_MAIN_PRESET)
    if folds is None and values["preset"] == DEFAULT_MAIN_PRESET and not preset:
        folds = DEFAULT_MAIN_FOLDS
    cfg = compose_run_config(**values)
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    fusion_list = [f.strip() for f in fusions.split(",")] if fusions else None
    import time

    import emofuse
    from emofuse.core.apps.compare import comparison_columns, runs_text
    from emofuse.cli.tables import rich_table

    started = time.perf_counter()
    result = emofuse.compare(cfg, fusions=fusion_list, seeds=seed_list, folds=folds, baselines=baselines,
                             robustness=robustness, out=out, overwrite=overwrite, cross_dataset=cross_dataset,
                             cross_data=cross_data)
    cross = result.cross["dataset"] if result.cross else None
    console.print(rich_table(result.rows, comparison_columns(result.ablations, folds=bool(folds), cross=cross),
                             title=f"{cfg.data.dataset}: test clips, {runs_text(result)}"))
    for f in result.failures:
        console.print(Text.assemble((f"fusion {f['fusion']} (seed {f['seed']}) failed: ", "yellow"), str(f["error"])))
    console.print(f"{time.perf_counter() - started:.0f} s; written to {result.out_dir}: comparison.md, "
                  "comparison.csv, comparison.json, comparison.png, confusion/", markup=False, highlight=False)


@app.command("search")
@friendly_errors
def search_cmd(
    preset: Optional[str] = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    encoder: Optional[List[str]] = EncoderOpt,
    fusion: Optional[str] = FusionOpt,
    loss: Optional[str] = LossOpt,
    sets: Optional[List[str]] = SetOpt,
    data: Optional[Path] = DataOpt,
    dataset: Optional[str] = DatasetOpt,
    labels: Optional[str] = LabelsOpt,
    output: Optional[Path] = OutputOpt,
    name: Optional[str] = NameOpt,
    seed: Optional[int] = SeedOpt,
    epochs: Optional[int] = EpochsOpt,
    precision: Optional[str] = PrecisionOpt,
    on_bad_sample: Optional[str] = BadSampleOpt,
    limit: Optional[int] = LimitOpt,
    trials: int = typer.Option(50, "--trials", help="Trials in the study, all workers together; a resumed study runs only the missing ones."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: SQLite under runs/search/); postgresql://... for several machines."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (resumes when it exists)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue an existing study of that name."),
    scope: str = typer.Option("auto", "--scope", help="auto|fusion|full: fusion reuses frozen branches, full retrains them per trial."),
    pruner: str = typer.Option("median", "--pruner", help="median|hyperband|none, from each epoch's validation score."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop starting trials after this many seconds."),
):
    """Tune a composed variant with Optuna (resumable SQLite study by default, any storage URL)."""
    import emofuse
    from emofuse.core.errors import ConfigError

    if scope not in ("auto", "fusion", "full") or pruner not in ("median", "hyperband", "none"):
        raise ConfigError(f"--scope {scope!r} / --pruner {pruner!r}: expected auto|fusion|full and median|hyperband|none")
    cfg = compose_run_config(**_compose_args(locals()))
    result = emofuse.search(cfg, trials=trials, storage=storage, study=study, resume=resume, scope=scope,
                            pruner=pruner, seed=seed, timeout=timeout)
    _print_search_summary(result)


def _print_search_summary(result: Any) -> None:
    """The study's outcome: counts, best value, parameters with their importances, where it was written."""
    from emofuse.core.apps.search import format_value

    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    console.print(Text.assemble((f"study {result.study_name}", "bold"),
                                f" ({result.storage}, scope {result.scope}): {counts or 'no trials'}"))
    for note in result.summary.get("notes", []):
        console.print(Text.assemble(("note: ", "yellow"), note))
    if result.best_number is None:
        console.print("[yellow]no trial completed: nothing to export[/]")
        return
    table = Table(title=f"best trial {result.best_number}: val {result.monitor} = {result.best_value:.4f}")
    table.add_column("parameter")
    table.add_column("value", justify="right")
    table.add_column("importance", justify="right")
    for name, value in result.best_params.items():
        importance = (result.importances or {}).get(name)
        table.add_row(name, format_value(value), "" if importance is None else f"{importance:.3f}")
    console.print(table)
    if result.importances is None and result.summary.get("importance_note"):
        console.print(Text(result.summary["importance_note"], style="dim"))
    console.print(f"best config: {result.best_config_path}  (emofuse train --config {result.best_config_path})",
                  markup=False, highlight=False)
    console.print(f"summary: {result.summary_path}", markup=False, highlight=False)


@app.command("predict")
@friendly_errors
def predict_cmd(
    checkpoint: Path = typer.Argument(..., help="A model.safetensors written by `emofuse train`."),
    inputs: Optional[List[Path]] = typer.Argument(None, help="Media files or folders to classify."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="A CSV/JSONL manifest of clips."),
    text: Optional[str] = typer.Option(None, "--text", help="Transcript to use for every clip given as a path."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write JSON lines here instead of stdout."),
    max_audio_seconds: float = typer.Option(60.0, "--max-audio-seconds", help="Use at most this many seconds of each clip's audio (its record then carries a warning); 0 decodes whole clips up to the 300 s ceiling (memory grows with length)."),
    explain: bool = typer.Option(False, "--explain", help="Also draw, per clip, a PNG: face track, crops with the spatial attention, each branch's share."),
    explain_dir: Optional[Path] = typer.Option(None, "--explain-dir", help="Folder for the --explain PNGs (default: 'explanations' beside --out, else in the current folder)."),
    transcribe: bool = typer.Option(True, "--transcribe/--no-transcribe",
                                    help="Transcribe the speech of clips without text (offline; Whisper tiny.en "
                                         "unless --transcriber)."),
    transcriber_name: Optional[str] = TranscriberOpt,
    language: Optional[str] = LanguageOpt,
):
    """Classify clips with a checkpoint: one JSON line of class probabilities per clip."""
    from emofuse.core.apps import predict
    from emofuse.core.errors import ConfigError

    if not max_audio_seconds >= 0:
        raise ConfigError(f"--max-audio-seconds {max_audio_seconds}: expected a number of seconds >= 0")
    choose_transcriber(transcriber_name, language)
    if explain and explain_dir is None:
        explain_dir = (Path(out).parent if out is not None else Path(".")) / "explanations"
    records = predict.predict_files(checkpoint, inputs=inputs or [], manifest=manifest, text=text, out=out,
                                    max_audio_seconds=max_audio_seconds or None,
                                    explain_dir=explain_dir if explain else None, transcribe=transcribe)
    if out is None:
        sys.stdout.write(predict.json_lines(records))
        sys.stdout.flush()
    failures = sum(1 for r in records if "error" in r)
    if failures:  # every readable clip was still predicted; the exit code tells scripts that some were not
        err_console.print(f'{failures} of {len(records)} clips could not be predicted (see their "error" field)',
                          markup=False, highlight=False)
        raise typer.Exit(1)


def choose_transcriber(model: Optional[str], language: Optional[str]) -> None:
    """Hand --transcriber/--language to the transcription (and serve's workers) through its environment
    variables, refusing an unknown model or a language tiny.en cannot transcribe before anything runs."""
    from emofuse.plugins.transcription import LANGUAGE_VARIABLE, MODEL_VARIABLE, chosen_model

    for variable, value in ((MODEL_VARIABLE, model), (LANGUAGE_VARIABLE, language)):
        if value:
            os.environ[variable] = value
    chosen_model()


@app.command("serve")
@friendly_errors
def serve_cmd(
    checkpoint: Path = typer.Argument(..., help="A model.safetensors written by `emofuse train`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    workers: int = typer.Option(1, "--workers", min=1, help="Worker processes, each with its own copy of the model."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.001, help="Largest upload accepted (MB)."),
    max_seconds: float = typer.Option(60.0, "--max-seconds", min=0.1,
                                      help="Longest clip accepted (seconds); also where the model's audio and the "
                                           "transcription stop."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, help="Most clips scored together; 1 turns batching off."),
    batch_window_ms: float = typer.Option(5.0, "--batch-window-ms", min=0.0,
                                          help="How long a batch waits for more requests (ms)."),
    max_queue: int = typer.Option(32, "--max-queue", min=1,
                                  help="Most uploads in the service at once; more are answered 503 with Retry-After."),
    max_transcribing: int = typer.Option(4, "--max-transcribing", min=1,
                                         help="Most uploads waiting for transcription at once; more that need it: 503."),
    transcribe_budget: float = typer.Option(20.0, "--transcribe-budget", min=0.1,
                                            help="Seconds of transcription per clip at most."),
    transcript_memory: int = typer.Option(256, "--transcript-memory", min=0,
                                          help="Recent clips' transcripts kept in memory (never on disk); 0: none."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.1,
                                       help="Seconds within which an upload's body must arrive (else 408)."),
    request_timeout: float = typer.Option(120.0, "--request-timeout", min=0.1,
                                          help="Seconds within which an upload must be answered (else 503)."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", metavar="VAR",
                                              help="Require the API key held in this environment variable in the "
                                                   "X-API-Key header of /v1/ requests (default: EMOFUSE_API_KEY if "
                                                   "set)."),
    cors_origins: Optional[List[str]] = typer.Option(None, "--cors-origin",
                                                     help="An origin whose pages may call the API (repeatable)."),
    allowed_hosts: Optional[List[str]] = typer.Option(None, "--allowed-host",
                                                      help="A Host name answered (repeatable; '*.example.com' "
                                                           "allowed); default: loopback names only."),
    transcriber_name: Optional[str] = TranscriberOpt,
    language: Optional[str] = LanguageOpt,
):
    """Serve a checkpoint over HTTP: POST /v1/predict, GET /v1/model, /healthz, /readyz, /docs and a page at /."""
    from emofuse.core.apps.serve import LOOPBACK_HOSTS, ServeSettings, serve
    from emofuse.core.errors import ConfigError

    choose_transcriber(transcriber_name, language)
    key_var = api_key_env or "EMOFUSE_API_KEY"
    api_key = os.environ.get(key_var) or None
    if api_key_env and api_key is None:
        raise ConfigError(f"--api-key-env {api_key_env}: that environment variable is not set or empty",
                          hint=f"export {api_key_env}=<a long random key>")
    settings = ServeSettings(max_upload_mb=max_upload_mb, max_seconds=max_seconds, max_batch=max_batch,
                             batch_window_ms=batch_window_ms, max_queue=max_queue, max_transcribing=max_transcribing,
                             transcribe_budget_s=transcribe_budget, transcript_memory=transcript_memory,
                             body_timeout_s=body_timeout,
                             request_timeout_s=request_timeout, api_key=api_key,
                             cors_origins=tuple(cors_origins or ()),
                             allowed_hosts=tuple(allowed_hosts or LOOPBACK_HOSTS))
    serve(checkpoint, host=host, port=port, workers=workers, settings=settings,
          warn=lambda line: err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True))


@app.command("zero-shot")
@friendly_errors
def zero_shot_cmd(
    data: Optional[Path] = DataOpt,
    dataset: str = typer.Option("crema-d", "--dataset", help="A corpus with video (see `emofuse plugins`)."),
    labels: Optional[str] = LabelsOpt,
    sets: Optional[List[str]] = SetOpt,
    save: Optional[Path] = typer.Option(None, "--save", help="Also write the zero-shot model as a checkpoint for `emofuse predict`."),
):
    """Score the FER-2013 expression classifier, mapped onto the corpus's labels by name, on its video clips (no training)."""
    from emofuse.core.apps.zero_shot import zero_shot

    cfg = compose_run_config(sets=sets, data=data, dataset=dataset, labels=labels)
    report = zero_shot(cfg.data, save=save)
    table = Table(title=f"FER-2013 zero-shot on {cfg.data.dataset} video")
    for col in ("unit", "count", "accuracy"):
        table.add_column(col, justify="right" if col != "unit" else "left")
    table.add_row("clip (frames averaged)", str(len(report.clip_ids)), f"{report.clip_accuracy:.3f}")
    table.add_row("sampled frame", str(len(report.frame_labels)), f"{report.frame_accuracy:.3f}")
    console.print(table)
    if report.without_face:
        console.print(f"{len(report.without_face)} clip(s) without a face (not scored): "
                      f"{', '.join(report.without_face[:10])}", markup=False, highlight=False)
    if save is not None:
        console.print(f"zero-shot checkpoint: {save}", markup=False, highlight=False)


cache_app = typer.Typer(help="What the feature cache holds (size, components, age), and pruning it.",
                        invoke_without_command=True, no_args_is_help=False)
app.add_typer(cache_app, name="cache")
CacheDirOpt = typer.Option(Path("runs/.cache"), "--cache-dir", help="The feature cache (default: runs/.cache).")


@cache_app.callback()
@friendly_errors
def cache_cmd(ctx: typer.Context, cache_dir: Path = CacheDirOpt):
    """List the cache's entries: one per component state, largest first."""
    if ctx.invoked_subcommand is None:
        from emofuse.core.data.cache_inventory import inventory

        _print_cache_entries(inventory(cache_dir), f"feature cache {cache_dir}")


@cache_app.command("prune")
@friendly_errors
def cache_prune_cmd(
    cache_dir: Path = CacheDirOpt,
    older_than: Optional[float] = typer.Option(None, "--older-than", help="Entries not written for DAYS days."),
    component: Optional[str] = typer.Option(None, "--component", help="Entries of this component (e.g. mm-lstm)."),
    everything: bool = typer.Option(False, "--all", help="Every entry."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be deleted; delete nothing."),
):
    """Delete cache entries (recomputed when next needed); --dry-run lists them first."""
    from emofuse.core.data.cache_inventory import prune

    chosen = prune(cache_dir, older_than_days=older_than, component=component, everything=everything, dry_run=dry_run)
    _print_cache_entries(chosen, ("would delete from " if dry_run else "deleted from ") + str(cache_dir))


def _print_cache_entries(entries: list, title: str) -> None:
    table = Table(title=f"{title}: {len(entries)} entries, {sum(e.size_bytes for e in entries) / 1e6:.1f} MB")
    for column in ("component", "provider", "size MB", "shards", "age (days)", "folder"):
        table.add_column(column, justify="right" if column in ("size MB", "shards", "age (days)") else "left")
    for e in entries:
        table.add_row(Text(e.component), Text(e.provider), f"{e.size_bytes / 1e6:.1f}", str(e.shards),
                      f"{e.age_s / 86400:.1f}", Text(e.path.name))
    console.print(table)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
