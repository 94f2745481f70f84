"""The engine's progress drawn with rich: a bar over each epoch's batches on a terminal, one line per
epoch always, step counters while features or branch outputs are computed, and dim notes."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from emofuse.core.engine.progress import EpochProgress, ProgressReporter, epoch_summary


class RichEpochProgress(EpochProgress):
    def __init__(self, stage: str, epochs: int, console: Console):
        super().__init__(stage, epochs)
        self._console = console
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> "RichEpochProgress":
        if self._console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), transient=True, console=self._console,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def start_epoch(self, epoch: int, batches: int) -> None:
        if self._progress is None:
            return
        desc = f"{self.stage} epoch {epoch + 1}/{self.epochs}"
        if self._task is None:
            self._task = self._progress.add_task(desc, total=batches, loss="-")
        else:
            self._progress.reset(self._task, total=batches, description=desc, loss="-")

    def advance(self, loss: float | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, **({"loss": f"{loss:.4f}"} if loss is not None else {}))

    def epoch_line(self, row: Mapping[str, Any], monitor: str) -> None:
        mark = " [green]*best*[/]" if row.get("improved") else ""
        self._console.print(epoch_summary(self.stage, self.epochs, row, monitor) + mark, highlight=False, soft_wrap=True)

    @property
    def live(self) -> bool:
        return self._progress is not None


class RichReporter(ProgressReporter):
    def __init__(self, console: Console | None = None):
        self.console = console or Console()

    def epochs(self, stage: str, epochs: int) -> EpochProgress:
        return RichEpochProgress(stage, epochs, self.console)

    @contextlib.contextmanager
    def steps(self, description: str, total: int | None) -> Iterator[Callable[[], None]]:
        if not self.console.is_terminal:
            yield lambda: None
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True, console=self.console) as bar:
            task = bar.add_task(description, total=total)
            yield lambda: bar.advance(task)

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False, soft_wrap=True)

    def status(self, message: str) -> None:
        self.console.print(Text(message, style="dim"))
