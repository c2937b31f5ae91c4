"""SIGKILL of the gateway in the middle of a stream of calls loses no write-ahead record."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audit.log import verify_files
from tests.conftest import BOT, CALLER_KEY, base_settings, merge, read_records, write_config

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def start_gateway(config_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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

    # A restarted gateway continues the same chain.
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
