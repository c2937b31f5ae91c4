"""gateway.audit.keyless: keyless denials one by one up to a budget in any second, then summed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.audit.keyless import SUPPRESSED_EVENT, UnauthenticatedAudit
from gateway.audit.log import AuditLog, rotated_files, verify_files
from gateway.metrics import Metrics
from tests.conftest import FakeClock, read_records


def denied(client: str) -> dict[str, object]:
    return {"event": "deactivate.denied", "client": client, "status": 401}


async def opened(tmp_path: Path) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", fsync=False)
    log.open()
    return log


class TestUnauthenticatedAudit:
    async def test_budget_then_one_summary_at_the_end_of_the_second(
            self, tmp_path: Path) -> None:
        log = await opened(tmp_path)
        clock = FakeClock(1000.25)
        metrics = Metrics()
        keyless = UnauthenticatedAudit(log, 2, metrics=metrics, clock=clock)
        for client in ["a", "b", "c", "c", "d", None]:
            await keyless.deny(denied(client) if client else {"event": "deactivate.denied"})
        assert [r.get("client") for r in read_records(log.path)] == ["a", "b"]
        await asyncio.sleep(0.8)  # the rest of this second (0.75 s), on the loop's clock
        await asyncio.sleep(0.05)
        *_, summary = read_records(log.path)
        assert summary["event"] == SUPPRESSED_EVENT and summary["client"] is None
        assert summary["count"] == 4
        assert summary["clients"] == {"c": 2, "d": 1, "unknown": 1}
        assert b"kore_gateway_audit_unauthenticated_suppressed_total 4.0" in metrics.render()
        await keyless.aclose()
        await log.close()
        assert verify_files(rotated_files(log.path)).ok

    async def test_a_new_second_has_a_new_budget(self, tmp_path: Path) -> None:
        log = await opened(tmp_path)
        clock = FakeClock(1000.0)
        keyless = UnauthenticatedAudit(log, 1, clock=clock)
        await keyless.deny(denied("a"))
        await keyless.deny(denied("a"))
        clock.advance(1.0)
        await keyless.deny(denied("a"))
        await keyless.aclose()
        await log.close()
        events = [r["event"] for r in read_records(log.path)]
        assert events.count("deactivate.denied") == 2
        assert events.count(SUPPRESSED_EVENT) == 1

    async def test_never_more_than_the_budget_in_any_one_second(self, tmp_path: Path) -> None:
        """A burst across the turn of a clock second gets `per_s` records, not twice that."""
        log = await opened(tmp_path)
        clock = FakeClock(1000.9)
        keyless = UnauthenticatedAudit(log, 3, clock=clock)
        for _ in range(5):
            await keyless.deny(denied("a"))
            clock.advance(0.05)  # 1000.9 … 1001.15: across 1001.0
        written = len(read_records(log.path))
        clock.advance(0.8)  # 1001.95: the first record is over 1 s old
        await keyless.deny(denied("a"))
        await keyless.aclose()
        await log.close()
        events = [r["event"] for r in read_records(log.path)]
        assert written == 3
        assert events.count("deactivate.denied") == 4 and events.count(SUPPRESSED_EVENT) == 1

    async def test_one_summary_a_second_when_the_timer_fires_early(self, tmp_path: Path) -> None:
        """The loop's timer may fire a little before the second ends (its clock lags under
        load): what is counted after it waits for the end of the next second."""
        log = await opened(tmp_path)
        clock = FakeClock(1000.998)
        keyless = UnauthenticatedAudit(log, 0, clock=clock)
        await keyless.deny(denied("a"))
        assert keyless._timer is not None
        keyless._timer.cancel()
        keyless._flush()  # as the timer firing at 1000.998, before the second ends
        await asyncio.gather(*keyless._writing)
        clock.advance(0.001)  # 1000.999: still the second just summarized
        await keyless.deny(denied("b"))
        loop = asyncio.get_running_loop()
        assert keyless._timer is not None and keyless._timer.when() - loop.time() > 0.99
        await keyless.aclose()
        await log.close()
        assert [(r["event"], r["clients"]) for r in read_records(log.path)] == [
            (SUPPRESSED_EVENT, {"a": 1}), (SUPPRESSED_EVENT, {"b": 1})]

    async def test_a_budget_of_zero_writes_only_summaries(self, tmp_path: Path) -> None:
        log = await opened(tmp_path)
        keyless = UnauthenticatedAudit(log, 0, clock=FakeClock(1000.0))
        for _ in range(3):
            await keyless.deny(denied("a"))
        await keyless.aclose()
        await log.close()
        assert [(r["event"], r.get("count")) for r in read_records(log.path)] == [
            (SUPPRESSED_EVENT, 3)]

    async def test_only_the_ten_busiest_addresses_are_named(self, tmp_path: Path) -> None:
        log = await opened(tmp_path)
        keyless = UnauthenticatedAudit(log, 0, clock=FakeClock())
        for n in range(15):
            for _ in range(n + 1):
                await keyless.deny(denied(f"192.0.2.{n}"))
        await keyless.aclose()
        await log.close()
        [summary] = read_records(log.path)
        assert summary["count"] == sum(range(1, 16))
        # On disk an object's keys are in sorted order (the canonical form): counts rank them.
        assert summary["clients"] == {f"192.0.2.{n}": n + 1 for n in range(14, 4, -1)}

    async def test_nothing_counted_writes_no_summary(self, tmp_path: Path) -> None:
        log = await opened(tmp_path)
        keyless = UnauthenticatedAudit(log, 5)
        await keyless.deny(denied("a"))
        await keyless.aclose()
        await log.close()
        assert [r["event"] for r in read_records(log.path)] == ["deactivate.denied"]
