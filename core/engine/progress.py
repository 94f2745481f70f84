"""How the engine reports progress without printing.

The engine and the apps call the current `ProgressReporter`: per-epoch bars and lines while a model
trains, step counters while frozen features or branch outputs are computed, notes that need a person's
attention (a stored result not reused, and why) and status lines (a comparison's next model, a search's
finished trial). Library use is silent (epoch lines, notes and status go to the ``emofuse`` logger);
the CLI installs a reporter that draws rich bars (`emofuse.cli.progress`).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Callable, ContextManager, Iterator, Mapping

log = logging.getLogger("emofuse.training")


class EpochProgress:
    """Progress of one training stage; this base reports each epoch's line to the log only."""

    def __init__(self, stage: str, epochs: int):
        self.stage, self.epochs = stage, epochs

    def __enter__(self) -> "EpochProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def start_epoch(self, epoch: int, batches: int) -> None:
        """An epoch of `batches` batches begins."""

    def advance(self, loss: float | None = None) -> None:
        """One batch done (`loss` only when `live`)."""

    def epoch_line(self, row: Mapping[str, Any], monitor: str) -> None:
        log.info("%s", epoch_summary(self.stage, self.epochs, row, monitor))

    @property
    def live(self) -> bool:
        """True when a bar is drawn (then per-batch loss values are worth fetching from the device)."""
        return False


def epoch_summary(stage: str, epochs: int, row: Mapping[str, Any], monitor: str) -> str:
    """One epoch's metrics as a line of text."""
    return (f"{stage} epoch {row['epoch'] + 1}/{epochs}: train loss {row['train_loss']:.4f}, "
            f"val loss {row['val_loss']:.4f}, val {monitor} {row.get(f'val_{monitor}', float('nan')):.4f}, "
            f"lr {row['lr']:.2e}")


class ProgressReporter:
    """Makes the progress objects the engine reports to; the base is silent."""

    def epochs(self, stage: str, epochs: int) -> EpochProgress:
        return EpochProgress(stage, epochs)

    @contextlib.contextmanager
    def steps(self, description: str, total: int | None) -> Iterator[Callable[[], None]]:
        """A counter of `total` steps: the context yields the function to call after each one."""
        yield lambda: None

    def note(self, message: str) -> None:
        """One line worth a person's attention: why something stored is not reused (recomputed)."""
        log.warning("%s", message)

    def status(self, message: str) -> None:
        """One line of news about a long job (what a comparison does next, a search trial finished)."""
        log.info("%s", message)


def note(message: str) -> None:
    """Tell the reporter in force (also the silent one: its notes go to the log)."""
    _current.get().note(message)


SILENT = ProgressReporter()
_current: contextvars.ContextVar[ProgressReporter] = contextvars.ContextVar("emofuse_progress", default=SILENT)


def reporter(enabled: bool = True) -> ProgressReporter:
    """The reporter in force (the silent one when `enabled` is false)."""
    return _current.get() if enabled else SILENT


def reporting(new: ProgressReporter) -> ContextManager[None]:
    """Use `new` for the engine's progress inside the ``with`` block."""

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        token = _current.set(new)
        try:
            yield
        finally:
            _current.reset(token)

    return scope()
