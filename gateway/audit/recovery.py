"""What a crash left open: `opened` records (`deactivate.requested`) with no closing record.

A terminal record may be written after the caller has its answer (`AuditLog.append_nowait`),
so a process that dies can leave a durable `requested` record without its terminal one. The
restarted gateway closes each of them (`deactivation.close_left_open`); this module finds them.

The search reads backwards from the end of a log, through its rotated files, and stops at the
first record more than `window_s` older than the last one. That is enough: the log writes
records in the order they were queued and keeps (never drops) a terminal record whose commit
failed, and a request's terminal record is queued within its deadline (`upstream.timeout_s`,
or `server.drain_s` at shutdown) of its `requested` record. So every record after an open
`requested` one in the file was queued before its terminal record would have been, and the
last record is less than that deadline newer than it; the caller adds a margin for clock steps.
Pairs are counted by `requestId`, so a request ID a caller reused is still paired right.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from gateway.audit.files import rotated_files

TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_BLOCK = 1 << 20


def unclosed(path: Path | str, *, window_s: float, opened: str = "deactivate.requested",
             closed: str = "deactivate.completed") -> list[dict[str, Any]]:
    """The `opened` records of the log at `path` (and its rotated files) that no later `closed`
    record with the same `requestId` answers, oldest first, as they are on disk."""
    closes: Counter[Any] = Counter()
    found: list[dict[str, Any]] = []
    oldest: str | None = None  # records older than this cannot be open
    for file in reversed(rotated_files(path)):
        for record in _records_backwards(file):
            ts = record.get("ts")
            if isinstance(ts, str):
                if oldest is None:
                    oldest = _earlier(ts, window_s)
                elif ts < oldest:
                    return found[::-1]
            event, request_id = record.get("event"), record.get("requestId")
            if event == closed:
                closes[request_id] += 1
            elif event == opened:
                if closes[request_id]:
                    closes[request_id] -= 1
                else:
                    found.append(record)
    return found[::-1]


def _earlier(ts: str, window_s: float) -> str:
    """`ts` minus the window, in the same format (they compare as text); "" when unreadable."""
    try:
        when = datetime.strptime(ts, TS_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return ""
    return (when - timedelta(seconds=window_s)).strftime(TS_FORMAT)


def _records_backwards(path: Path) -> Iterator[dict[str, Any]]:
    for line in _lines_backwards(path):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # verify's business; a torn last line is cut at open
        if isinstance(record, dict):
            yield record


def _lines_backwards(path: Path) -> Iterator[bytes]:
    """The non-empty lines of `path`, last first, read in blocks from the end."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return
    with file:
        end = file.seek(0, os.SEEK_END)
        rest = b""
        while end > 0:
            start = max(0, end - _BLOCK)
            file.seek(start)
            lines = (file.read(end - start) + rest).split(b"\n")
            rest = lines[0]  # may continue in the block before
            yield from (line for line in reversed(lines[1:]) if line)
            end = start
        if rest:
            yield rest
