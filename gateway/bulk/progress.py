"""The live progress of `kore-gateway deactivate`: a rich bar on a terminal, plain lines
otherwise (a CI log, a pipe). Shows rows done, failed, the rate and the time left.

Knows nothing of HTTP or CSV: `bulk.py` reports each finished row as succeeded or not.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

PLAIN_EVERY_S = 2.0  # a plain progress line at most this often


class Progress(Protocol):
    def start(self, total: int) -> None: ...

    def advance(self, ok: bool) -> None: ...

    def stop(self) -> None: ...


def make_progress(stream: TextIO | None = None) -> Progress:
    """A rich bar when `stream` (stderr by default) is a terminal, plain lines otherwise."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return RichProgress(stream)
    return PlainProgress(stream)


class PlainProgress:
    """`deactivate: 20/50 done, 1 failed, 12.3 rows/s, ETA 2s`, every few seconds and at the end."""

    def __init__(self, stream: TextIO, *, every_s: float = PLAIN_EVERY_S) -> None:
        self.stream, self.every_s = stream, every_s
        self.total = self.done = self.failed = 0
        self._started = self._last = 0.0

    def start(self, total: int) -> None:
        self.total = total
        self._started = self._last = time.monotonic()

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def stop(self) -> None:
        if self.total:
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-6)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate else float("inf")
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        print(f"deactivate: {self.done}/{self.total} done, {self.failed} failed, "
              f"{rate:.1f} rows/s, ETA {eta}", file=self.stream, flush=True)


class RichProgress:
    """rich's live bar: description, bar, done/total, failed, rows/s, time remaining."""

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichBar

        self._bar = RichBar(
            TextColumn("[bold]deactivating"), BarColumn(), MofNCompleteColumn(),
            TextColumn("done · [red]{task.fields[failed]} failed"), _rate_column(),
            TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(file=stream), transient=False)
        self._task: Any = None
        self._failed = 0

    def start(self, total: int) -> None:
        self._task = self._bar.add_task("deactivate", total=total, failed=0)
        self._bar.start()

    def advance(self, ok: bool) -> None:
        self._failed += not ok
        self._bar.update(self._task, advance=1, failed=self._failed)

    def stop(self) -> None:
        self._bar.stop()


def _rate_column() -> Any:
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Task) -> Text:
            return Text(f"{task.speed or 0:.1f} rows/s")

    return RateColumn()
