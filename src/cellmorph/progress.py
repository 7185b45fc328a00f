"""Progress of long steps: bars on a terminal, one plain line per finished step in a batch log.

A four-hour run under ``nohup`` or Slurm must show signs of life, and a log must not fill
with bar redraws: with ``enabled``, a terminal (a TTY on stderr) gets rich progress bars;
anything else gets one line per finished plate, fold or epoch, with the elapsed time and
an estimate of what is left. Tasks made with ``log=False`` (batches) only drive bars.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Task:
    """One counted step (plates, folds, epochs or batches)."""

    def __init__(self, progress: "Progress", description: str, total: int, log: bool, every: float = 0.0) -> None:
        self._progress, self._log, self._every = progress, log, every
        self._last_line = float("-inf")
        self.description, self.total, self.done = description, int(total), 0
        self._resumed = 0  # steps finished by an earlier invocation: no time to learn from
        self._started = time.monotonic()
        self._id = progress._bar.add_task(description, total=total, info="") if progress._bar else None

    def reset(self, total: int | None = None, description: str | None = None, info: str = "") -> None:
        """Start counting again, e.g. the epochs of the next fold."""
        self.total = self.total if total is None else int(total)
        self.description = description or self.description
        self.done, self._resumed, self._started = 0, 0, time.monotonic()
        if self._progress._bar:
            self._progress._bar.reset(self._id, total=self.total, description=self.description, info=info)

    def update(self, info: str) -> None:
        """Side information for the bar (not logged)."""
        if self._progress._bar:
            self._progress._bar.update(self._id, info=info)

    def advance(self, n: int = 1, info: str = "", resumed: bool = False) -> None:
        """``n`` more steps done; ``resumed`` steps were done earlier and do not enter the estimate."""
        self.done += n
        self._resumed += n if resumed else 0
        if self._progress._bar:
            self._progress._bar.update(self._id, advance=n, info=info)
        elif self._log and self._progress.mode == "log":
            now = time.monotonic()
            if now - self._last_line < self._every and self.done < self.total:
                return
            self._last_line = now
            elapsed = now - self._started
            worked = self.done - self._resumed
            left = elapsed / worked * (self.total - self.done) if worked else 0.0
            detail = f" {info}" if info else ""
            self._progress.line(f"{self.description} {self.done}/{self.total}{detail}; "
                                f"elapsed {format_seconds(elapsed)}, about {format_seconds(left)} left")


class Progress:
    """``with Progress(enabled) as progress: task = progress.task("folds", 38)``."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.stream = stream or sys.stderr
        interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.mode = "off" if not enabled else ("bar" if interactive else "log")
        self._bar = None

    def __enter__(self) -> "Progress":
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream), transient=False,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar:
            self._bar.__exit__(*exc)
            self._bar = None

    def task(self, description: str, total: int, log: bool = True, every: float = 0.0) -> Task:
        """A counted step; in a log, a line per advance (at most one per ``every`` seconds, and the last)."""
        return Task(self, description, total, log, every)

    def line(self, text: str) -> None:
        """One plain line (log mode) or a line above the bars (terminal); nothing when off."""
        if self.mode == "off":
            return
        if self._bar:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(f"[{datetime.now():%H:%M:%S}] {text}", file=self.stream, flush=True)
