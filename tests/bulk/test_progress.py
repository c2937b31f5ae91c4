"""Tests for gateway.bulk.progress: plain lines off a terminal, rich's bar on one."""

from __future__ import annotations

import io

from gateway.bulk.progress import PlainProgress, RichProgress, make_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = make_progress(stream)
    assert isinstance(progress, PlainProgress)
    progress.start(3)
    for ok in (True, False, True):
        progress.advance(ok)
    progress.stop()
    [line] = stream.getvalue().splitlines()  # a fast run: only the final line
    assert line.startswith("deactivate: 3/3 done, 1 failed, ") and line.endswith("ETA 0s")


def test_plain_lines_are_throttled() -> None:
    stream = io.StringIO()
    progress = PlainProgress(stream, every_s=0.0)
    progress.start(2)
    progress.advance(True)
    progress.advance(True)
    assert stream.getvalue().count("\n") == 2


def test_rich_bar_on_a_terminal() -> None:
    stream = Terminal()
    progress = make_progress(stream)
    assert isinstance(progress, RichProgress)
    progress.start(4)
    for ok in (True, True, False, True):
        progress.advance(ok)
    progress.stop()
    text = stream.getvalue()
    assert "4/4" in text and "1 failed" in text and "rows/s" in text
