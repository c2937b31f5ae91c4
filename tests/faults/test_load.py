"""Bounded load through a faulty Kore.ai: every call ends as 200 or a contract error with no
other 5xx, the audit verifies with exactly one terminal record per call and exact `attempts`;
and a burst against Kore.ai's per-bot limits (scaled down) never causes an upstream 429."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gateway.audit.log import rotated_files, verify_files
from tests.conftest import SETTLE_S, open_requests, read_records
from tests.faults.kore import AUTH, TERMINAL, calls_for, inject
from tests.integration.sides import AuditTrail
from tests.integration.test_crash import REPO

CALLS = 2000
ROTATE_BYTES = 256 * 1024  # the log rotates several times during the run
CONCURRENCY = 50
BOTS = 50  # spreads the calls: Kore.ai's default budget (600 / 60 s) is per bot
TIME_LIMIT_S = 30
CONTRACT_ERRORS = {429: {"rate_limited"}, 502: {"upstream_unavailable", "upstream_auth_failed"},
                   503: {"overloaded", "audit_unavailable", "upstream_unavailable"},
                   504: {"upstream_timeout"}}


async def run_calls(gateway: Any, plan: list[tuple[str, str]], concurrency: int
                    ) -> dict[str, tuple[int, str | None, str | None]]:
    """Each (request ID, botId) once, `concurrency` at a time: {rid: (status, code, RA)}."""
    gate = asyncio.Semaphore(concurrency)
    answers: dict[str, tuple[int, str | None, str | None]] = {}

    async def one(rid: str, bot: str) -> None:
        async with gate:
            resp = await gateway.post(f"/v1/bots/{bot}/sessions/deactivate",
                                      json={"userId": rid}, headers={**AUTH, "X-Request-ID": rid})
            body = await resp.json()
            code = body["error"]["code"] if resp.status != 200 else None
            answers[rid] = (resp.status, code, resp.headers.get("Retry-After"))

    await asyncio.gather(*(one(rid, bot) for rid, bot in plan))
    return answers


def expect_contract_answers(answers: dict[str, tuple[int, str | None, str | None]]) -> None:
    for rid, (status, code, retry_after) in answers.items():
        if status == 200:
            continue
        assert code in CONTRACT_ERRORS.get(status, set()), (rid, status, code)
        if status in (429, 503):
            assert retry_after is not None and int(retry_after) >= 1, (rid, status)


async def settle(audit: AuditTrail) -> None:
    """`read_records(settle_s=SETTLE_S)` over every file of the log, without blocking the
    event loop the gateway under test runs on: waits until no call that went upstream is left
    without its terminal record, which may be written just after its answer (contract §3)."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        try:
            records = [r for path in rotated_files(audit.path) for r in read_records(path)]
        except ValueError:  # a line read while it was being written: read again
            pass
        else:
            if not open_requests(records):
                return
        await asyncio.sleep(0.02)


def expect_one_terminal_record_each(audit: AuditTrail, rids: set[str]) -> list[dict[str, Any]]:
    """Over every file of the log (rotated ones first): chain intact, one terminal each."""
    files = rotated_files(audit.path)
    report = verify_files(files)
    assert report.ok, report.error
    records = [record for path in files for record in read_records(path)]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    terminal = Counter(r["requestId"] for r in records if r["event"] in TERMINAL)
    assert set(terminal) == rids and set(terminal.values()) == {1}
    requested = Counter(r["requestId"] for r in records if r["event"] == "deactivate.requested")
    completed = {r["requestId"] for r in records if r["event"] == "deactivate.completed"}
    assert set(requested) == completed and set(requested.values()) <= {1}
    return records


async def test_load_through_a_failing_upstream(start_gateway: Any, sandbox: Any,
                                               audit: AuditTrail) -> None:
    inject(sandbox, error_rate=0.2, error_status=503, rate_429=0.05, retry_after_s=1, seed=42)
    gateway = await start_gateway(upstream={"timeout_s": 5}, audit={"max_bytes": ROTATE_BYTES})
    plan = [(f"load-{i}", f"st-load-{i % BOTS}") for i in range(CALLS)]
    started = time.monotonic()
    answers = await run_calls(gateway, plan, CONCURRENCY)
    took = time.monotonic() - started

    assert took < TIME_LIMIT_S
    assert len(answers) == CALLS
    expect_contract_answers(answers)
    statuses = Counter(status for status, _, _ in answers.values())
    # Each 429 from Kore.ai teaches its bot a budget (contract §2: what Kore.ai accepted in
    # the window before it), so many of a bot's later calls are refused by the gateway itself.
    assert statuses[200] + statuses[429] >= CALLS * 0.95, statuses
    assert statuses[200] >= CALLS * 0.25, statuses
    await settle(audit)
    records = expect_one_terminal_record_each(audit, set(answers))
    completed = [r for r in records if r["event"] == "deactivate.completed"]
    by_rid: dict[str, list[Any]] = {}
    for call in sandbox.calls:
        by_rid.setdefault(call.headers["x-request-id"], []).append(call)
    for record in completed:
        assert record["attempts"] == len(by_rid.get(record["requestId"], [])), record
        assert record["status"] == answers[record["requestId"]][0]
    assert sum(r["attempts"] for r in completed) == len(sandbox.calls)
    assert len(sandbox.calls) > len(completed)  # the faults really forced retries
    expect_cli_verifies(rotated_files(audit.path), len(records))


def expect_cli_verifies(files: list[Path], records: int) -> None:
    """`kore-gateway audit verify` takes the rotated files oldest first, and only so."""
    assert len(files) > 2  # the log rotated under load
    command = [sys.executable, "-m", "gateway", "audit", "verify"]
    ok = subprocess.run([*command, *map(str, files)], capture_output=True, text=True,
                        check=False, cwd=REPO, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert f"OK: {records} record(s) in {len(files)} file(s)" in ok.stdout
    swapped = [files[1], files[0], *files[2:]]
    broken = subprocess.run([*command, *map(str, swapped)], capture_output=True, text=True,
                            check=False, cwd=REPO, timeout=60)
    assert broken.returncode == 1 and "BROKEN" in broken.stderr


LIMIT = {"calls": 20, "per_s": 2}
BURST = 150


async def burst(start_gateway: Any, sandbox: Any, rate_limit: dict[str, Any],
                max_attempts: int = 3) -> dict[str, tuple[int, str | None, str | None]]:
    inject(sandbox, limits=[(LIMIT["calls"], LIMIT["per_s"])])
    gateway = await start_gateway(upstream={"timeout_s": 3, "max_attempts": max_attempts},
                                  rate_limit=rate_limit)
    plan = [(f"burst-{i}", f"st-paced-{i % 2}") for i in range(BURST)]
    return await run_calls(gateway, plan, CONCURRENCY)


async def test_burst_against_kores_per_bot_limits_never_gets_an_upstream_429(
        start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
    started = time.monotonic()
    answers = await burst(start_gateway, sandbox, {"windows": [LIMIT]})
    took = time.monotonic() - started

    assert sandbox.emulator.stats()["upstream_429"] == 0
    expect_contract_answers(answers)
    statuses = Counter(status for status, _, _ in answers.values())
    assert set(statuses) <= {200, 429}, statuses
    # Each bot: a window's worth (paced over the window), more as windows pass, the rest
    # refused: never more than the windows the burst lasted allow.
    windows = math.ceil(took / LIMIT["per_s"])
    assert 2 * LIMIT["calls"] <= statuses[200] <= 2 * LIMIT["calls"] * windows, (statuses, took)
    await settle(audit)
    records = expect_one_terminal_record_each(audit, set(answers))
    for rid, (status, _, _) in answers.items():
        if status == 429:  # refused by the gateway's own pacing: nothing went upstream
            assert calls_for(sandbox, rid) == []
    denied = [r for r in records if r["event"] == "deactivate.denied"]
    assert len(denied) == statuses[429] and {r["error"] for r in denied} <= {"rate_limited"}


async def test_the_same_burst_without_pacing_does_get_upstream_429s(
        start_gateway: Any, sandbox: Any) -> None:
    """The control: the sandbox's limits are real, so zero 429s above is the pacing's doing."""
    answers = await burst(start_gateway, sandbox, {"enabled": False}, max_attempts=1)
    assert sandbox.emulator.stats()["upstream_429"] > 0
    assert any(status == 429 for status, _, _ in answers.values())


async def test_a_burst_stalled_midway_refuses_what_has_no_room_in_time_and_sends_nothing_more(
        start_gateway: Any, sandbox: Any, monkeypatch: Any) -> None:
    """The event loop stalls for 0.3 s (a collection, a busy host) just before `burst-20` is
    sent: it and the calls due during the stall leave late and take their places in the
    windows as they leave. The calls granted a window after them would land inside Kore.ai's
    window of them; those that can wait for room within their deadline wait, and the others
    are refused by the gateway itself (429 `rate_limited`) instead of being sent into a
    window it counts as full. Kore.ai refuses nothing."""
    from gateway.kore.client import KoreClient

    deactivate = KoreClient.deactivate
    stalled: list[str] = []

    async def stall_once(self: KoreClient, app: Any, d: Any, request_id: str,
                         deadline: float, trace: Any) -> Any:
        if request_id == "burst-20" and not stalled:
            stalled.append(request_id)
            time.sleep(0.3)  # noqa: ASYNC251 - on purpose: the event loop stalls, as in a pause
        return await deactivate(self, app, d, request_id, deadline, trace)

    monkeypatch.setattr(KoreClient, "deactivate", stall_once)
    answers = await burst(start_gateway, sandbox, {"windows": [LIMIT]})
    assert stalled
    assert sandbox.emulator.stats()["upstream_429"] == 0
    expect_contract_answers(answers)
    statuses = Counter(status for status, _, _ in answers.values())
    assert statuses[200] >= 2 * LIMIT["calls"] and set(statuses) <= {200, 429}, statuses


async def test_a_burst_whose_first_calls_leave_late_still_gets_no_upstream_429(
        start_gateway: Any, sandbox: Any, monkeypatch: Any) -> None:
    """The burst's grants are made at once, each bot's 21st counted from its 1st as granted.
    Here the first token takes 0.45 s (as a loaded machine gave once), so each bot's first
    calls leave more than the spacing margin late: its 21st, on time for its own slot, would
    land inside Kore.ai's window of them. It waits for room instead (`MemoryRateLimiter.
    sending`), and Kore.ai refuses nothing."""
    from gateway.kore.tokens import TokenCache

    token = TokenCache.token
    ready_at = time.monotonic() + 0.45

    async def slow_first_token(self: TokenCache, app: Any) -> Any:
        if (late := ready_at - time.monotonic()) > 0:
            await asyncio.sleep(late)
        return await token(self, app)

    monkeypatch.setattr(TokenCache, "token", slow_first_token)
    answers = await burst(start_gateway, sandbox, {"windows": [LIMIT]})
    assert sandbox.emulator.stats()["upstream_429"] == 0
    statuses = Counter(status for status, _, _ in answers.values())
    assert statuses[200] >= 2 * LIMIT["calls"] and set(statuses) <= {200, 429}, statuses
