"""What a fault test checks on each side: the calls Kore.ai got for one request ID, the audit's
terminal record for it, and the rule tying them together (`attempts` is exact)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from gateway.sandbox.server import NOT_ANSWERED, Faults
from tests.conftest import CALLER_KEY

AUTH = {"Authorization": f"Bearer {CALLER_KEY}"}
TERMINAL = ("deactivate.completed", "deactivate.denied")


def inject(sandbox: Any, **faults: Any) -> None:
    """Replaces every fault at once: a `seed` reseeds the dice, limits start empty."""
    sandbox.emulator.faults = Faults(**faults)


def calls_for(sandbox: Any, rid: str) -> list[Any]:
    return [c for c in sandbox.calls if c.headers.get("x-request-id") == rid]


def terminal_records(records: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
    return [r for r in records if r["requestId"] == rid and r["event"] in TERMINAL]


def expect_exact_attempts(records: list[dict[str, Any]], sandbox: Any, rid: str, *,
                          unreachable: bool = False) -> dict[str, Any]:
    """One terminal record for `rid` whose `attempts` and `upstreamStatus` match what Kore.ai
    saw: every PUT that reached it counts (`unreachable`: none could), and the status of the
    last one it answered (not a dropped one) is the one recorded."""
    [record] = terminal_records(records, rid)
    calls = calls_for(sandbox, rid)
    if not unreachable:
        assert record["attempts"] == len(calls), (record, [c.status for c in calls])
    answered = [c.status for c in calls if c.status != NOT_ANSWERED]
    assert record["upstreamStatus"] == (answered[-1] if answered else None), (record, answered)
    requested = [r for r in records if r["requestId"] == rid
                 and r["event"] == "deactivate.requested"]
    assert len(requested) == (record["event"] == "deactivate.completed")
    return record


async def wait_for(predicate: Any, timeout_s: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
