"""The audit log failing under a running gateway: a full disk (a file-size limit put on the
live process) fails closed with nothing sent upstream, turns /readyz 503 with a loud log line,
and recovers without a restart; a removed file is recreated and the chain goes on; an exit
forced in the middle of a write waits for it (`AuditLog.halt`)."""

from __future__ import annotations

import asyncio
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.audit import log as audit_module
from gateway.audit.log import AuditLog, verify_files
from tests.conftest import BOT
from tests.faults.kore import AUTH, expect_exact_attempts, wait_for
from tests.faults.process import GatewayProcess, post
from tests.integration.sides import AuditTrail

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="prlimit on another process")


async def readyz(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url + "/readyz") as resp:
        return resp.status, await resp.json()


async def wait_ready(session: aiohttp.ClientSession, url: str, status: int) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal found
        code, found = await readyz(session, url)
        return code == status

    deadline = time.monotonic() + 5
    while not await check():
        assert time.monotonic() < deadline, f"/readyz never answered {status}: {found}"
        await asyncio.sleep(0.05)
    return found


@linux_only
async def test_disk_full_fails_closed_and_recovers_without_restart(sandbox: Any,
                                                                   tmp_path: Path) -> None:
    gw = await GatewayProcess(tmp_path, sandbox.url).start()
    soft, hard = resource.prlimit(gw.pid, resource.RLIMIT_FSIZE)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            assert (await post(session, gw.url, "before"))[0] == 200
            # The file cannot grow by a byte: as with a full disk, every write fails.
            resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (gw.audit_path.stat().st_size, hard))
            status, body, _ = await post(session, gw.url, "while-full")
            assert (status, body["error"]["code"]) == (503, "audit_unavailable")
            assert len(sandbox.calls) == 1  # nothing went upstream
            detail = await wait_ready(session, gw.url, 503)
            assert detail["checks"]["audit"] is False
            await asyncio.sleep(1.2)  # past the readiness cache: still unready, still refusing
            assert (await readyz(session, gw.url))[0] == 503
            assert (await post(session, gw.url, "still-full"))[0] == 503

            resource.prlimit(gw.pid, resource.RLIMIT_FSIZE, (soft, hard))  # space again
            await wait_ready(session, gw.url, 200)
            assert (await post(session, gw.url, "after"))[0] == 200
    finally:
        gw.stop()
    loud = [e for e in gw.events() if e["event"] == "audit.unwritable"]
    assert loud and loud[0]["level"] == "error" and str(gw.audit_path) in loud[0]["path"]
    assert any(e["event"] == "audit.recovered" for e in gw.events())
    report = verify_files([gw.audit_path])
    assert report.ok, report.error
    records = gw.records()
    # The refusals of the outage were kept, and written first once the disk had room again.
    assert [(r["requestId"], r["event"]) for r in records] == [
        ("before", "deactivate.requested"), ("before", "deactivate.completed"),
        ("while-full", "deactivate.denied"), ("still-full", "deactivate.denied"),
        ("after", "deactivate.requested"), ("after", "deactivate.completed")]
    assert {(r["outcome"], r["status"], r["error"]) for r in records[2:4]} == {
        ("failed", 503, "audit_unavailable")}
    assert [c.headers["x-request-id"] for c in sandbox.calls] == ["before", "after"]


async def test_removed_audit_file_is_recreated_and_the_chain_goes_on(
        start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
    gateway = await start_gateway()
    url = f"/v1/bots/{BOT}/sessions/deactivate"
    first = await gateway.post(url, json={"userId": "u-1"}, headers=AUTH)
    assert first.status == 200
    # Captured from the removal on: the first call's terminal commit (its fsync, after its
    # answer) may be the one that notices the file is gone.
    with capture_logs() as logs:
        audit.path.unlink()
        second = await gateway.post(url, json={"userId": "u-2"},
                                    headers={**AUTH, "X-Request-ID": "after-removal"})
    assert second.status == 200
    records = audit.records()
    assert [r["seq"] for r in records] == [3, 4]  # history that vanished stays visible
    expect_exact_attempts(records, sandbox, "after-removal")
    assert any(e["event"] == "audit.reopened" for e in logs)
    assert verify_files([audit.path]).error == f"{audit.path}:1: seq 3, expected 1"


async def test_halt_waits_for_a_write_in_progress_and_lets_none_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the second signal relies on before `os._exit`: no line is cut in half."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.open()
    entered, release = threading.Event(), threading.Event()
    real_write = audit_module._write_all

    def slow_disk(fd: int, data: bytes) -> None:
        entered.set()
        release.wait(5)
        real_write(fd, data)

    monkeypatch.setattr(audit_module, "_write_all", slow_disk)
    writing = asyncio.ensure_future(log.append({"event": "deactivate.denied", "n": 1}))
    assert await asyncio.to_thread(entered.wait, 5)
    halted: list[bool] = []
    halter = threading.Thread(target=lambda: halted.append(log.halt(timeout_s=5)))
    halter.start()
    await asyncio.sleep(0.2)
    assert halted == []  # waiting for the write in progress
    release.set()
    await asyncio.to_thread(halter.join, 5)
    assert halted == [True]
    await writing
    assert path.read_bytes().endswith(b"\n")

    later = asyncio.ensure_future(log.append({"event": "deactivate.denied", "n": 2}))
    await asyncio.sleep(0.3)
    assert not later.done() and len(path.read_bytes().splitlines()) == 1
    log._io_lock.release()  # only so the test can close the log
    await later
    await log.close()
    await wait_for(lambda: verify_files([path]).ok, what="the chain")
