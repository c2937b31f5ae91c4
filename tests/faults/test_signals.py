"""Signals to the real gateway process: SIGTERM drains (readiness 503 at once, new calls shed,
in-flight calls finish, exit 0, the audit verifies with one terminal record per call); past
`drain_s` the stragglers are audited as cut short; a second signal exits at once without a torn
audit line. SIGKILL mid-stream is tests/integration/test_crash.py."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audit.log import verify_files
from tests.faults.kore import inject, terminal_records, wait_for
from tests.faults.process import GatewayProcess, post
from tests.integration.live import send_raw

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
IN_FLIGHT = 8


def one_terminal_record_each(records: list[dict[str, Any]], rids: list[str]) -> None:
    for rid in rids:
        assert len(terminal_records(records, rid)) == 1, rid
    terminal = Counter(r["requestId"] for r in records if r["event"] != "deactivate.requested")
    assert set(terminal) == set(rids) and set(terminal.values()) == {1}


async def test_sigterm_drains_in_flight_calls_and_sheds_new_ones(sandbox: Any,
                                                                 tmp_path: Path) -> None:
    inject(sandbox, latency_ms=1200)
    gw = await GatewayProcess(tmp_path, sandbox.url).start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            rids = [f"drain-{i}" for i in range(IN_FLIGHT)]
            calls = [asyncio.ensure_future(post(session, gw.url, rid)) for rid in rids]
            await wait_for(lambda: len(sandbox.calls) == IN_FLIGHT, what="calls in flight")
            gw.signal(signal.SIGTERM)
            started = time.monotonic()
            await wait_for_not_ready(session, gw.url)
            assert time.monotonic() - started < 2  # at once, not after the drain (20 s)
            status, body, headers = await post(session, gw.url, "late")
            assert (status, body["error"]["code"]) == (503, "overloaded")
            assert int(headers["Retry-After"]) >= 1
            assert headers["Connection"].lower() == "close"  # move on to another instance
            assert [(await call)[0] for call in calls] == [200] * IN_FLIGHT
        assert gw.wait(timeout_s=15) == 0
    finally:
        gw.stop()
    assert len(sandbox.calls) == IN_FLIGHT  # the shed call never went upstream
    report = verify_files([gw.audit_path])
    assert report.ok, report.error
    records = gw.records()
    one_terminal_record_each(records, [*rids, "late"])
    assert [r["outcome"] for r in records if r["requestId"] == "late"] == ["failed"]
    events = [e["event"] for e in gw.events()]
    assert "gateway.draining" in events and "gateway.stopped" in events


async def wait_for_not_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(100):
        async with session.get(url + "/readyz") as resp:
            if resp.status == 503:
                assert (await resp.json())["checks"]["draining"] is True
                return
        await asyncio.sleep(0.01)
    raise AssertionError("/readyz never turned 503")


async def test_calls_past_drain_s_are_audited_as_cut_short(sandbox: Any, tmp_path: Path) -> None:
    inject(sandbox, latency_ms=8000)
    gw = await GatewayProcess(tmp_path, sandbox.url, server={"drain_s": 0.5}).start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            rids = [f"slow-{i}" for i in range(3)]
            calls = [asyncio.ensure_future(post(session, gw.url, rid)) for rid in rids]
            await wait_for(lambda: len(sandbox.calls) == 3, what="calls in flight")
            started = time.monotonic()
            gw.signal(signal.SIGTERM)
            assert gw.wait(timeout_s=10) == 0
            assert time.monotonic() - started < 5  # drain_s, not Kore.ai's 8 s
            assert [(await call)[0] for call in calls] == [None] * 3  # hung up, no answer
    finally:
        gw.stop()
    records = gw.records()
    assert verify_files([gw.audit_path]).ok
    one_terminal_record_each(records, rids)
    for rid in rids:
        [record] = terminal_records(records, rid)
        assert (record["event"], record["status"], record["error"], record["attempts"]) == (
            "deactivate.completed", 503, "overloaded", 1)
    assert "gateway.drain_timeout" in [e["event"] for e in gw.events()]


async def test_second_signal_exits_at_once_without_a_torn_line(sandbox: Any,
                                                               tmp_path: Path) -> None:
    inject(sandbox, latency_ms=8000)
    gw = await GatewayProcess(tmp_path, sandbox.url).start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            calls = [asyncio.ensure_future(post(session, gw.url, f"held-{i}"))
                     for i in range(IN_FLIGHT)]
            await wait_for(lambda: len(sandbox.calls) == IN_FLIGHT, what="calls in flight")
            gw.signal(signal.SIGTERM)
            await wait_for_not_ready(session, gw.url)
            # Keep the audit busy (every shed call is a denied record) while the second
            # signal lands, so an exit in the middle of a write would show.
            shed = [asyncio.ensure_future(post(session, gw.url, f"shed-{i}"))
                    for i in range(200)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            gw.signal(signal.SIGINT)
            assert gw.wait(timeout_s=5) == 128 + signal.SIGINT
            assert time.monotonic() - started < 4  # not the 8 s the calls in flight need
            await asyncio.gather(*calls, *shed)
    finally:
        gw.stop()
    data = gw.audit_path.read_bytes()
    assert data.endswith(b"\n")
    report = verify_files([gw.audit_path])
    assert report.ok, report.error
    assert "gateway.killed" in [e["event"] for e in gw.events()]


async def test_serve_enforces_header_limits_and_slow_client_timeouts(sandbox: Any,
                                                                     tmp_path: Path) -> None:
    gw = await GatewayProcess(tmp_path, sandbox.url, server={
        "max_headers": 16, "max_header_bytes": 1024, "client_timeout_s": 0.5}).start()
    try:
        many = "".join(f"X-H{i}: v\r\n" for i in range(20))
        answer = send_raw(gw.port, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{many}"
                                   "Connection: close\r\n\r\n".encode())
        assert answer.status == 400
        big = "X-Big: " + "v" * 1100
        answer = send_raw(gw.port, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{big}\r\n"
                                   "Connection: close\r\n\r\n".encode())
        assert answer.status == 400
        started = time.monotonic()
        answer = send_raw(gw.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert answer.status == 408 and time.monotonic() - started < 4
        gw.signal(signal.SIGTERM)
        assert gw.wait(timeout_s=15) == 0
    finally:
        gw.stop()
