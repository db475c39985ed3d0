"""Rich progress bars and per-run log files for long jobs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class StepProgress:
    """A progress bar fed by ``update({"step", "total", "loss", ...})`` callbacks (a no-op when disabled)."""

    def __init__(self, description: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.description = description
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> StepProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._progress.__enter__()
        return self

    def update(self, info: dict[str, Any]) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task(
                self.description,
                total=info["total"],
                completed=info["step"] - 1,
                loss=info["loss"],
                epoch=info["epoch"],
            )
        self._progress.update(self._task, completed=info["step"], loss=info["loss"], epoch=info["epoch"])

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)


class CountProgress:
    """A progress bar fed by ``update(done, total)`` callbacks, e.g. tiles of a slide (a no-op when disabled)."""

    def __init__(self, description: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.description = description
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> CountProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=True,
            )
            self._progress.__enter__()
        return self

    def update(self, done: int, total: int) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task(self.description, total=total)
        self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy medseg's and the pipelines' log records into ``path`` (appending) while the block runs."""
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger("medseg"), logging.getLogger("pipelines")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()
