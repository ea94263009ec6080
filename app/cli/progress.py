"""Progress of background jobs on the command line (the `polar` CLI, `make demo`), with rich.

On a terminal a bar is redrawn in place; anywhere else (a pipe, a log file, CI) rich draws
nothing while it runs and prints the finished line once, so a log gets one readable line per job
instead of a run of carriage returns.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskID, TextColumn


class JobLike(Protocol):
    """What a progress line reads from a job (app.cli.http.Job, or a job's JSON as an object)."""

    @property
    def progress(self) -> float: ...  # 0..1

    @property
    def state(self) -> str: ...


class JobProgress:
    """`with JobProgress("training Fido") as bar: client.wait_job(id, bar)`.

    Each call with a job moves the bar; the line reads "training Fido: 40% (running)".
    """

    def __init__(self, label: str, *, file: TextIO | None = None) -> None:
        self.label = label
        # sys.stderr is looked up now, not at import: tests and callers swap it.
        self.console = Console(file=file or sys.stderr, highlight=False)
        columns: list[ProgressColumn] = [TextColumn("{task.description}:")]
        if self.console.is_terminal:
            columns.append(BarColumn(bar_width=30))
        columns.append(TextColumn("{task.percentage:>3.0f}% ({task.fields[state]})"))
        self.progress = Progress(*columns, console=self.console, transient=False)
        self.task: TaskID | None = None

    def __enter__(self) -> JobProgress:
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=1.0, state="queued")
        return self

    def __call__(self, job: JobLike) -> None:
        assert self.task is not None, "use JobProgress as a context manager"
        self.progress.update(self.task, completed=job.progress, state=job.state)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()
