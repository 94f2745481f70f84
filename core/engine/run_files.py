"""The layout of a run folder and what decides whether a finished run can be reused.

A run folder (``<output_dir>/<name>``) holds ``model.safetensors`` + ``model.json`` (the best model),
``last.safetensors`` + ``last.json`` (the state a killed run resumes from), ``metrics.jsonl`` (one row
per epoch), ``result.json`` (written last: the run finished), ``config.toml``, ``run.json`` (the
config it was trained with, compared on a rerun) and ``.lock`` (held while a training writes it). A fingerprint covers
everything that shapes a result, the code of every component included (`components_code`), so a rerun,
a second fusion or a search trial over the same branches reuses them instead of training again, and a
run whose components' code changed is trained again with one line saying which and how (`stale_note`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from emofuse.core.checkpoint import atomic_write_bytes
from emofuse.core.config import ComponentRef, RunConfig, TrainConfig
from emofuse.core.data.code_identity import code_identity, what_changed
from emofuse.core.engine.progress import note

SPLITS = ("train", "val", "test")

MODEL_FILE = "model"

STATE_FILE = "last"

HISTORY_FILE = "metrics.jsonl"

RESULT_FILE = "result.json"

BRANCHES_DIR = "branches"

#: Held while a training writes the folder (see `emofuse.core.engine.run_guard`).
LOCK_FILE = ".lock"

#: The config a run folder was trained with, minus machine-local settings (see `run_guard`).
IDENTITY_FILE = "run.json"


@dataclass
class RunResult:
    """What a run produced: where, its best checkpoint, final metrics per split and its history."""

    run_dir: Path
    checkpoint: Path
    metrics: dict[str, dict[str, float]]
    history: list[dict]
    fusion_report: dict | None = None
    branch_results: dict[str, "RunResult"] = field(default_factory=dict)
    #: (file or row, reason) of every sample left out as bad input (skip mode), reader and decoder alike.
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.checkpoint),
            "metrics": self.metrics,
            "fusion_report": self.fusion_report,
            "branches": {b: str(r.run_dir) for b, r in self.branch_results.items()},
        }


def config_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The training settings that shape the result (device and loader workers do not; nor does
    ``refit``: a refit run's selection run is the very run trained without it, in the same folder)."""
    return cfg.model_dump(mode="json", exclude={"device", "num_workers", "refit"})


def components_code(config: RunConfig, registry: Any) -> dict[str, dict[str, Any]]:
    """`code_identity` of every component `config` names (encoders, those nested in an encoder's
    options such as a wrapper's inner one, fusion, losses, dataset reader), by ``"<kind> '<name>'"``."""
    refs: list[tuple[str, Any]] = [("dataset", config.data.dataset), ("loss", config.loss.name)]
    refs += [("fusion", config.fusion.name)] if config.fusion is not None else []
    refs += [("loss", config.fusion_loss.name)] if config.fusion_loss is not None else []
    for ref in config.branches.values():
        refs += [("encoder", name) for name in _encoder_names(ref.model_dump(mode="json"), registry)]
    return {f"{kind} {name!r}": code_identity(registry.cls(kind, name)) for kind, name in sorted(set(refs))}


def _encoder_names(options: Any, registry: Any) -> list[str]:
    """The encoder named by a component ref and by any ref nested in its options."""
    if isinstance(options, ComponentRef):
        options = options.model_dump(mode="json")
    if isinstance(options, list):
        return [n for item in options for n in _encoder_names(item, registry)]
    if not isinstance(options, dict):
        return []
    name = options.get("name")
    own = [name] if isinstance(name, str) and name in registry.names("encoder") else []
    return own + [n for key, value in options.items() if key != "name" for n in _encoder_names(value, registry)]


def split_digest(bundle: Any) -> str:
    """Hash of which clips are in which split: a branch trained on another split must not be reused
    (its training clips could be test clips now)."""
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(f"[{split}]".encode())
        for sample in bundle.splits.get(split, []):
            h.update(sample.id.encode() + b"\0")
    return h.hexdigest()[:16]


def branch_fingerprint(config: RunConfig, bundle: Any = None, code: Mapping[str, Any] | None = None) -> str:
    """Everything that shapes a branch run's result (not its name, folder or device); with `bundle`,
    also its split; with `code` (`components_code`), the code of its components."""
    return config_hash({
        "stage": "branch",
        "code": dict(code) if code is not None else None,
        "data": config.data.model_dump(mode="json"),
        "split": split_digest(bundle) if bundle is not None else None,
        "branches": {k: v.model_dump(mode="json") for k, v in config.branches.items()},
        "loss": config.loss.model_dump(mode="json"),
        "train": train_settings(config.train),
    })


def fusion_fingerprint(config: RunConfig, branch_checkpoints: Mapping[str, str], bundle: Any,
                       code: Mapping[str, Any] | None = None) -> str:
    fusion_train = config.fusion_train or config.train
    return config_hash({
        "stage": "fusion",
        "code": dict(code) if code is not None else None,
        "data": config.data.model_dump(mode="json"),
        "split": split_digest(bundle),
        "branch_checkpoints": dict(branch_checkpoints),
        "fusion": config.fusion.model_dump(mode="json") if config.fusion else None,
        "inputs": [config.fusion_inputs, config.fusion_folds] if config.fusion_inputs != "in-sample" else None,
        "loss": (config.fusion_loss or config.loss).model_dump(mode="json"),
        "train": train_settings(fusion_train),
    })


def finished_result(run_dir: Path, fingerprint: str) -> RunResult | None:
    """The result of a finished run with this fingerprint, if `run_dir` holds one."""
    path = run_dir / RESULT_FILE
    if not path.is_file() or not (run_dir / f"{MODEL_FILE}.safetensors").is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if data.get("fingerprint") != fingerprint or not data.get("finished"):
        return None
    history = [json.loads(line) for line in (run_dir / HISTORY_FILE).read_text(encoding="utf-8").splitlines() if line.strip()] \
        if (run_dir / HISTORY_FILE).is_file() else []
    branches = {b: finished_result(Path(d), fp) for b, (d, fp) in data.get("branch_runs", {}).items()}
    if any(r is None for r in branches.values()):
        return None
    return RunResult(run_dir, run_dir / f"{MODEL_FILE}.safetensors", data["metrics"], history,
                     data.get("fusion_report"), branches)  # type: ignore[arg-type]


def reuse_or_explain(run_dir: Path, fingerprint: str, code: Mapping[str, Any], what: str) -> RunResult | None:
    """The finished run in `run_dir` when its fingerprint matches; else None, after one line through
    the progress reporter when it is the code of a component that changed (its resume state is then
    removed too: it was made by the old code)."""
    done = finished_result(run_dir, fingerprint)
    if done is None:
        line = stale_note(run_dir, what, code)
        if line:
            note(line)
            for suffix in (".safetensors", ".json"):
                (Path(run_dir) / f"{STATE_FILE}{suffix}").unlink(missing_ok=True)
    return done


def stale_note(run_dir: Path, what: str, code: Mapping[str, Any]) -> str | None:
    """One line saying why the finished run in `run_dir` is not reused, when the code of one of its
    components changed since it was trained (None when nothing there or no code change)."""
    try:
        result = json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not result.get("finished"):
        return None
    if "code" not in result:
        return f"{what} {run_dir}: made by an older emofuse that kept no record of its components' code; training it again"
    recorded = result.get("code") or {}
    for component in sorted(code):
        change = what_changed(component, recorded.get(component), code[component])
        if change:
            return f"{what} {run_dir}: {change}; training it again"
    return None


def recorded_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint a finished run recorded in its result file (None when there is none)."""
    try:
        return json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


def write_result(run_dir: Path, result: RunResult, fingerprint: str, branch_runs: Mapping[str, tuple[str, str]] | None = None,
                 code: Mapping[str, Any] | None = None) -> None:
    payload = {**result.to_json(), "fingerprint": fingerprint, "finished": True, "branch_runs": dict(branch_runs or {}),
               "code": dict(code or {})}
    atomic_write_bytes(run_dir / RESULT_FILE, json.dumps(payload, indent=2, sort_keys=True).encode())


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")


def write_history(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())

