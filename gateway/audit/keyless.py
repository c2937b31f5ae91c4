"""Requests without a valid key in the audit: one record each up to a budget, then a count.

Up to `audit.max_unauthenticated_per_s` (default 20) `deactivate.denied` records of keyless
requests (no key, an unknown key) are written one by one in any one second of this process
(a sliding second: never twice that many across the turn of a clock second). Beyond that a
denial is only counted, by client address, and at the end of the clock second the counts
become one `audit.unauthenticated_suppressed` record (one a second: the event loop's timer may
fire a little before the second ends, and what is counted after it then waits for the end of the
next second, not for a second summary of the same one): `count` (every suppressed denial)
and `clients` (the ten addresses with the most, address → count; in the file, as every
object, in key order). Its `client` is null: it
speaks for many. A keyless flood so costs the disk at most that many records and one summary
a second. Requests with a valid key never pass through here: they are audited one by one.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from gateway.audit.log import AuditLog
from gateway.errors import AuditUnavailable
from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

SUPPRESSED_EVENT = "audit.unauthenticated_suppressed"
TOP_CLIENTS = 10
UNKNOWN_CLIENT = "unknown"


class UnauthenticatedAudit:
    """The audit of keyless denials: `deny(record)` writes the record or counts it."""

    def __init__(self, audit: AuditLog, per_s: int, *, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._audit = audit
        self._per_s = per_s
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        # When the last `per_s` records were written: one more fits once the oldest is 1 s old.
        self._written: deque[float] = deque(maxlen=max(per_s, 1))
        self._counts: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None
        # The end of the second the timer's summary closes; once it has fired (or `aclose`
        # has written the counts), the end of the last second summarized.
        self._due = -math.inf
        self._writing: set[asyncio.Task[None]] = set()

    async def deny(self, record: Mapping[str, Any]) -> None:
        """Writes `record` (raising `AuditUnavailable` as `AuditLog.append` does) while fewer
        than `per_s` were written in the last second; otherwise counts it for the summary."""
        now = self._clock()
        written = self._written
        if self._per_s > 0 and (len(written) < self._per_s or now - written[0] >= 1.0):
            written.append(now)
            await self._audit.append(record)
            return
        self._counts[str(record.get("client") or UNKNOWN_CLIENT)] += 1
        self._metrics.audit_unauthenticated_suppressed()
        if self._timer is None:
            self._due = max(math.floor(now) + 1, self._due + 1)
            self._timer = asyncio.get_running_loop().call_later(self._due - now, self._flush)

    def summary(self) -> dict[str, Any] | None:
        """The summary record of what was counted since the last one (and forgets it)."""
        counts, self._counts = self._counts, Counter()
        if not counts:
            return None
        top = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CLIENTS])
        return {"event": SUPPRESSED_EVENT, "client": None, "count": sum(counts.values()),
                "clients": top}

    async def aclose(self) -> None:
        """Writes what is still counted; call before the audit log closes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._write(self.summary())
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)

    def _flush(self) -> None:
        self._timer = None
        task = asyncio.get_running_loop().create_task(self._write(self.summary()))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, record: dict[str, Any] | None) -> None:
        if record is None:
            return
        try:
            await self._audit.append(record)
        except AuditUnavailable:
            log.error("audit.summary_lost", event_name=SUPPRESSED_EVENT, count=record["count"])
