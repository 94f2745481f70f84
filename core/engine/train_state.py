"""The resumable training state, in safetensors + JSON (never pickle).

What a resumed run needs to continue exactly where it stopped: the trainable weights, the best
weights so far, AdamW's moments (flattened to ``optimizer.state.<param>.<name>`` tensors, the rest
of its state dict in JSON), the scheduler and gradient-scaler state, the epoch, early-stopping
state, the history so far and every RNG state (torch CPU and CUDA, NumPy, Python; one set per rank).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emofuse.core.checkpoint import load_checkpoint, save_checkpoint, tensor_path
from emofuse.core.errors import CheckpointError

#: A damaged resume state: training again from the first epoch is the way out.
RESTART_HINT = "rerun with --no-resume to train from the first epoch (or delete the run folder's last.* files)"

STATE_KIND = "emofuse-training-state"


# -- optimizer -------------------------------------------------------------------------------------
def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = "optimizer.state."
    for key, value in tensors.items():
        if key.startswith(prefix):
            pid, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# -- RNG -------------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states as (tensors, JSON)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    py_version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [py_version, list(py_state), py_gauss]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([v for _, v in cuda][: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


# -- the whole state -------------------------------------------------------------------------------
@dataclass
class TrainingState:
    """Everything `emofuse.core.engine.training.fit` needs to continue after `epoch` (0-based, completed)."""

    fingerprint: str
    epoch: int
    module: dict[str, torch.Tensor]
    best_module: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    early_stopping: dict[str, Any]
    history: list[dict[str, Any]]
    #: Per rank: (tensors, JSON) of its RNG states.
    rng: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]
    finished: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def save_training_state(path: Path, state: TrainingState) -> Path:
    tensors: dict[str, torch.Tensor] = {f"module.{k}": v for k, v in state.module.items()}
    if state.best_module is not None:
        tensors.update({f"best.{k}": v for k, v in state.best_module.items()})
    opt_tensors, opt_meta = flatten_optimizer(state.optimizer)
    tensors.update(opt_tensors)
    rng_meta = []
    for rank, (rng_tensors, meta) in enumerate(state.rng):
        tensors.update({f"rng.{rank}.{k}": v for k, v in rng_tensors.items()})
        rng_meta.append(meta)
    meta = {
        "kind": STATE_KIND,
        "fingerprint": state.fingerprint,
        "epoch": state.epoch,
        "finished": state.finished,
        "has_best": state.best_module is not None,
        "optimizer": opt_meta,
        "scheduler": state.scheduler,
        "scaler": state.scaler,
        "early_stopping": state.early_stopping,
        "history": state.history,
        "rng": rng_meta,
        "extra": state.extra,
    }
    return save_checkpoint(path, tensors, meta)


def load_training_state(path: Path) -> TrainingState | None:
    """The state at `path`, or None when there is none; a damaged one raises `CheckpointError`."""
    if not tensor_path(path).is_file():
        return None
    try:
        tensors, meta = load_checkpoint(path)
    except CheckpointError as exc:  # the fix that works is to start over: say so
        raise CheckpointError(f"{exc.message}; it is this run's resume state", hint=RESTART_HINT) from None
    if meta.get("kind") != STATE_KIND:
        raise CheckpointError(f"{tensor_path(path)}: not an emofuse training state", hint=RESTART_HINT)

    def strip(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    rng = [(strip(f"rng.{rank}."), m) for rank, m in enumerate(meta["rng"])]
    return TrainingState(
        fingerprint=meta["fingerprint"],
        epoch=int(meta["epoch"]),
        module=strip("module."),
        best_module=strip("best.") if meta.get("has_best") else None,
        optimizer=unflatten_optimizer(tensors, meta["optimizer"]),
        scheduler=meta["scheduler"],
        scaler=meta.get("scaler"),
        early_stopping=meta["early_stopping"],
        history=list(meta["history"]),
        rng=rng,
        finished=bool(meta.get("finished")),
        extra=dict(meta.get("extra") or {}),
    )
