"""The layout of a run folder and what decides whether a finished run can be reused.

A run folder (``<output_dir>/<name>``) holds ``model.safetensors`` + ``model.json`` (the best model),
``last.safetensors`` + ``last.json`` (the state a killed run resumes from), ``metrics.jsonl`` (one row
per epoch), ``result.json`` (written last: the run finished), ``config.toml``, ``run.json`` (the
config it was trained with, compared on a rerun) and ``.lock`` (held while a training writes it). A fingerprint covers
everything that shapes a result, so a rerun, a second fusion or a search trial over the same branches
reuses them instead of training again.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from emofuse.core.checkpoint import atomic_write_bytes
from emofuse.core.config import RunConfig, TrainConfig

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
    ``refit``: a refit run's selection run is the very run trained without it, in the same folder).
    ``keep`` and ``lr_decay`` count only when not at their defaults, so runs made before they existed are
    still reused."""
    exclude = {"device", "num_workers", "refit"} | ({"keep"} if cfg.keep == "best" else set()) | (
        {"lr_decay"} if cfg.lr_decay == "cosine" else set())
    return cfg.model_dump(mode="json", exclude=exclude)


def split_digest(bundle: Any) -> str:
    """Hash of which clips are in which split: a branch trained on another split must not be reused
    (its training clips could be test clips now)."""
    h = hashlib.sha256()
    for split in SPLITS:
        h.update(f"[{split}]".encode())
        for sample in bundle.splits.get(split, []):
            h.update(sample.id.encode() + b"\0")
    return h.hexdigest()[:16]


def branch_fingerprint(config: RunConfig, bundle: Any = None) -> str:
    """Everything that shapes a branch run's result (not its name, folder or device); with `bundle`,
    also its split."""
    return config_hash({
        "stage": "branch",
        "data": config.data.model_dump(mode="json"),
        "split": split_digest(bundle) if bundle is not None else None,
        "branches": {k: v.model_dump(mode="json") for k, v in config.branches.items()},
        "loss": config.loss.model_dump(mode="json"),
        "train": train_settings(config.train),
    })


def fusion_fingerprint(config: RunConfig, branch_checkpoints: Mapping[str, str], bundle: Any) -> str:
    fusion_train = config.fusion_train or config.train
    return config_hash({
        "stage": "fusion",
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


def recorded_fingerprint(run_dir: Path) -> str | None:
    """The fingerprint a finished run recorded in its result file (None when there is none)."""
    try:
        return json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        return None


def write_result(run_dir: Path, result: RunResult, fingerprint: str, branch_runs: Mapping[str, tuple[str, str]] | None = None) -> None:
    payload = {**result.to_json(), "fingerprint": fingerprint, "finished": True, "branch_runs": dict(branch_runs or {})}
    atomic_write_bytes(run_dir / RESULT_FILE, json.dumps(payload, indent=2, sort_keys=True).encode())


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")


def write_history(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())

