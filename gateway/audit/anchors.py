"""Audit anchors: the head of the audit chain logged off the host, and the check against them.

Every `anchor_every_s`, and once more after the log is closed at shutdown, `Anchors` logs one
``audit.anchor`` line to the structured log (which ships elsewhere): ``{"file", "seq", "hash"}``,
the last durable record of that audit file. A rewrite of the file, even one that recomputes
every hash, then disagrees with a shipped anchor, or ends before one (records dropped).

`read_anchors` finds those lines in log files: JSON lines, possibly behind a prefix (a container
runtime's timestamp) or inside a ``log``/``message`` string (a log shipper's wrapper); every
other line is ignored. `AnchorCheck` applies the anchors that name one log, by file name, so that
files copied elsewhere, and the rotated ``name.000001.jsonl`` siblings, still match.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)

ANCHOR_EVENT = "audit.anchor"
_HASH = re.compile(r"[0-9a-f]{64}")
_ROTATED = re.compile(r"(?P<stem>.+)\.\d{6,}(?P<suffix>\.[^.]+)?")
_WRAPPERS = ("log", "message", "msg")  # fields a shipper may put the JSON line in


@dataclass(frozen=True, slots=True)
class Anchor:
    file: str  # the audit file as the gateway named it
    seq: int
    hash: str
    source: str = ""  # "<log file>:<line>", for messages
    ts: str = ""  # when it was logged, if the line says


class AnchorSource(Protocol):
    """What anchors are taken from: `AuditLog`."""

    @property
    def path(self) -> Path: ...

    async def head(self) -> tuple[int, str]: ...


class Anchors:
    """Logs the head of one audit log every `every_s` seconds, and after it is closed.

    Logged at info, or at the lowest level the logging configuration lets through when that
    is higher (`level`): anchors are never filtered out."""

    def __init__(self, audit: AnchorSource, every_s: float, level: int = logging.INFO) -> None:
        self.audit, self.every_s, self.level = audit, every_s, max(level, logging.INFO)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-anchors")

    async def stop(self) -> None:
        """Stops the periodic anchors; `emit()` once the log is closed gives the last one."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def emit(self) -> None:
        seq, digest = await self.audit.head()
        if seq:
            log.log(self.level, ANCHOR_EVENT, file=str(self.audit.path), seq=seq, hash=digest)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.emit()
            except Exception:  # an anchor must never stop the next one
                log.exception("audit.anchor_failed", file=str(self.audit.path))


def read_anchors(paths: Iterable[Path | str]) -> list[Anchor]:
    """Every ``audit.anchor`` line in the log files `paths`; raises OSError."""
    found = []
    for path in paths:
        with open(path, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                anchor = _anchor(_json_in(line))
                if anchor is not None:
                    found.append(Anchor(anchor.file, anchor.seq, anchor.hash,
                                        f"{path}:{number}", anchor.ts))
    return found


def _json_in(line: bytes | str, depth: int = 0) -> dict[str, Any] | None:
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    if value.get("event") != ANCHOR_EVENT and depth == 0:
        inner = next((value[k] for k in _WRAPPERS if isinstance(value.get(k), str)), None)
        return None if inner is None else _json_in(inner, depth + 1)
    return value


def _anchor(entry: dict[str, Any] | None) -> Anchor | None:
    if entry is None or entry.get("event") != ANCHOR_EVENT:
        return None
    file, seq, digest = entry.get("file"), entry.get("seq"), entry.get("hash")
    if not (isinstance(file, str) and file and type(seq) is int and seq >= 1
            and isinstance(digest, str) and _HASH.fullmatch(digest)):
        return None
    ts = entry.get("timestamp", entry.get("ts", ""))
    return Anchor(file, seq, digest, ts=ts if isinstance(ts, str) else "")


def log_name(path: Path | str) -> str:
    """The name of the log a file belongs to: a rotated ``name.000001.jsonl`` → ``name.jsonl``."""
    name = Path(path).name
    rotated = _ROTATED.fullmatch(name)
    return name if rotated is None else rotated["stem"] + (rotated["suffix"] or "")


class AnchorCheck:
    """The anchors of one log, checked record by record as its chain is verified."""

    def __init__(self, anchors: Sequence[Anchor], current: Path) -> None:
        self.name = log_name(current)
        self.given = len(anchors)
        self._by_seq: dict[int, list[Anchor]] = {}
        for anchor in anchors:
            if Path(anchor.file).name == self.name:
                self._by_seq.setdefault(anchor.seq, []).append(anchor)
        self.matched = 0

    def check(self, seq: int, digest: str) -> str | None:
        """The disagreement of the record at `seq` with its anchors, or None."""
        for anchor in self._by_seq.get(seq, ()):
            if anchor.hash != digest:
                return (f"seq {seq} has hash {digest[:16]}…, but the anchor at "
                        f"{_where(anchor)} says {anchor.hash[:16]}…: the file was rewritten")
            self.matched += 1
        return None

    def finish(self, last_seq: int) -> str | None:
        """After the last record: an anchor past it means records were removed."""
        if self.given and not self._by_seq:
            return f"none of the {self.given} anchor(s) given names {self.name}"
        beyond = [a for seq, group in self._by_seq.items() if seq > last_seq for a in group]
        if not beyond:
            return None
        anchor = max(beyond, key=lambda a: a.seq)
        return (f"the anchor at {_where(anchor)} is for seq {anchor.seq}, but the files end "
                f"at seq {last_seq}: records were removed")


def _where(anchor: Anchor) -> str:
    return anchor.source + (f" ({anchor.ts})" if anchor.ts else "")
