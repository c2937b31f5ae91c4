"""SIGKILL of the gateway in the middle of a stream of calls loses no write-ahead record, and
the restarted gateway first closes every `requested` record left without its terminal one
(`"outcome": "unknown"`), in its own file, in rotated files and in per-worker files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks.ports import free_port
from gateway.audit.log import rotated_files, verify_files
from tests.conftest import BOT, CALLER_KEY, base_settings, merge, read_records, write_config
from tests.integration.served import REPO, Served


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"gateway exited early with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError("gateway did not become healthy")


def start_gateway(config_path: Path, workers: int = 1) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
                             "--workers", str(workers)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def chain_records(path: Path) -> list[dict[str, Any]]:
    """Every record of one chain: its rotated files, oldest first, then the current file."""
    return [r for file in rotated_files(path) for r in read_records(file)]


def assert_every_request_closed_once(records: list[dict[str, Any]]) -> list[str]:
    """Each requested record has exactly one completed record (by request ID, counted: the
    calls after the restart reuse IDs); returns the IDs closed as unknown."""
    requested = [r["requestId"] for r in records if r["event"] == "deactivate.requested"]
    completed = [r["requestId"] for r in records if r["event"] == "deactivate.completed"]
    assert sorted(requested) == sorted(completed), "one terminal record per requested one"
    return [r["requestId"] for r in records if r.get("outcome") == "unknown"]


async def stream_calls(url: str, count: int, concurrency: int) -> list[int | None]:
    statuses: list[int | None] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        async with gate:
            try:
                async with s.post(f"{url}/v1/bots/{BOT}/sessions/deactivate",
                                  json={"userId": f"u-{i}"},
                                  headers={"Authorization": f"Bearer {CALLER_KEY}",
                                           "X-Request-ID": f"crash-{i}"}) as resp:
                    statuses.append(resp.status)
            except aiohttp.ClientError:
                statuses.append(None)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        await asyncio.gather(*(one(s, i) for i in range(count)))
    return statuses


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
async def test_sigkill_mid_stream_loses_no_requested_record(sandbox: Any, tmp_path: Path) -> None:
    sandbox.faults.latency_ms = 15
    port = free_port()
    settings = merge(base_settings(tmp_path, sandbox.url),
                     {"server": {"listen": f"127.0.0.1:{port}"}})
    config_path = write_config(tmp_path, settings)
    audit = Path(settings["audit"]["path"])
    url = f"http://127.0.0.1:{port}"
    proc = start_gateway(config_path)
    try:
        await wait_healthy(url, proc)
        stream = asyncio.create_task(stream_calls(url, count=400, concurrency=20))
        deadline = time.monotonic() + 10
        while len(sandbox.calls) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        statuses = await asyncio.wait_for(stream, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert None in statuses, "the kill did not happen mid-stream"
    reached = {call.headers.get("X-Request-ID") for call in sandbox.calls}
    assert len(reached) >= 60
    requested = {r["requestId"] for r in read_records(audit) if r["event"] == "deactivate.requested"}
    assert reached <= requested, f"calls without a durable requested record: {reached - requested}"
    assert verify_files([audit]).ok

    before = read_records(audit)
    left_open = {r["requestId"] for r in before if r["event"] == "deactivate.requested"} - {
        r["requestId"] for r in before if r["event"] == "deactivate.completed"}

    # A restarted gateway first closes what was left open, then continues the same chain.
    proc = start_gateway(config_path)
    try:
        await wait_healthy(url, proc)
        assert await stream_calls(url, count=3, concurrency=3) == [200, 200, 200]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    assert proc.returncode == 0
    report = verify_files([audit])
    assert report.ok, report.error
    after = read_records(audit)[len(before):]
    closing = after[:len(left_open)]
    assert {r["requestId"] for r in closing} == left_open
    assert all(r["event"] == "deactivate.completed" and r["outcome"] == "unknown"
               and r["status"] is None and r["error"] == "gateway_restarted" for r in closing)
    assert set(assert_every_request_closed_once(read_records(audit))) == left_open


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
async def test_sigkill_of_two_workers_rotating_is_closed_by_the_restart(
        sandbox: Any, tmp_path: Path) -> None:
    """Two workers, each with its own chain rotated every few records, killed mid-stream; the
    restart runs one worker, so both per-worker chains are closed by it (files no worker of
    the new run writes), across their rotated files."""
    sandbox.faults.latency_ms = 15
    port = free_port()
    settings = merge(base_settings(tmp_path, sandbox.url),
                     {"server": {"listen": f"127.0.0.1:{port}"}, "audit": {"max_bytes": 1024}})
    config_path = write_config(tmp_path, settings)
    audit = Path(settings["audit"]["path"])
    chains = [audit.with_name(f"deactivations-w{n}.jsonl") for n in (0, 1)]
    url = f"http://127.0.0.1:{port}"
    served = Served(config_path, tmp_path / "gateway.log", workers=2)
    proc = served.proc
    try:
        await wait_healthy(url, proc)
        # Every worker: a stream started earlier could put all its kept-alive connections on
        # the first one up.
        await served.listening()
        stream = asyncio.create_task(stream_calls(url, count=400, concurrency=20))
        deadline = time.monotonic() + 10
        while len(sandbox.calls) < 80 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        statuses = await asyncio.wait_for(stream, timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert None in statuses, "the kill did not happen mid-stream"
    assert all(len(rotated_files(chain)) > 1 for chain in chains), "both chains rotated"
    reached = {call.headers.get("X-Request-ID") for call in sandbox.calls}
    requested = {r["requestId"] for chain in chains for r in chain_records(chain)
                 if r["event"] == "deactivate.requested"}
    assert reached <= requested, "every call that reached Kore.ai has a requested record"

    proc = start_gateway(config_path, workers=1)
    try:
        await wait_healthy(url, proc)
        assert await stream_calls(url, count=3, concurrency=3) == [200, 200, 200]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    assert proc.returncode == 0
    unknown = []
    for chain in chains:
        report = verify_files(rotated_files(chain))
        assert report.ok, report.error
        unknown += assert_every_request_closed_once(chain_records(chain))
    assert unknown, "requests in flight at the kill were closed as unknown"
    assert verify_files(rotated_files(audit)).ok and len(chain_records(audit)) == 6
