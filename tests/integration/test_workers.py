"""`serve --workers 2` as a real subprocess: the workers listen on one port (port 0 resolved
once), split Kore.ai's per-bot budget so that together they never exceed it, and each keeps its
own verifiable audit chain."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audit.log import verify_files
from tests.conftest import BOT, CALLER_KEY, base_settings, merge, read_records, write_config
from tests.integration.test_crash import REPO, wait_healthy

WORKERS = 2
BUDGET = 20  # Kore.ai's per-bot limit: calls per window
WINDOW_S = 2.0
CALLS = 2 * BUDGET  # twice the budget at once: one worker alone could spend all of it
# The sandbox enforces the budget over a shorter window than the gateway is told, so that the
# few milliseconds between a grant and its arrival upstream can never decide the outcome.
SANDBOX_WINDOW_S = 1.5


def start(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
             "--workers", str(WORKERS)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


async def wait_listening(log: Path, proc: subprocess.Popen[bytes], timeout_s: float = 30
                         ) -> set[str]:
    """Until every worker listens (SO_REUSEPORT spreads connections only over those); returns
    the addresses they listen on."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [json.loads(line) for line in log.read_text(errors="replace").splitlines()
                 if '"gateway.listening"' in line]
        if len(lines) >= WORKERS:
            return {line["listen"] for line in lines}
        assert proc.poll() is None and time.monotonic() < deadline, \
            log.read_text(errors="replace")[-2000:]
        await asyncio.sleep(0.05)


async def burst(url: str, count: int) -> list[int]:
    """`count` deactivations at once, each on its own connection (so either worker may get it)."""
    async def one(i: int) -> int:
        async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                          timeout=aiohttp.ClientTimeout(total=30)) as s,
                    s.post(f"{url}/v1/bots/{BOT}/sessions/deactivate", json={"userId": f"u-{i}"},
                           headers={"Authorization": f"Bearer {CALLER_KEY}"}) as resp):
            return resp.status

    return list(await asyncio.gather(*(one(i) for i in range(count))))


def requested_times(path: Path) -> list[float]:
    return sorted(datetime.datetime.fromisoformat(r["ts"]).timestamp()
                  for r in read_records(path) if r["event"] == "deactivate.requested")


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT and POSIX signals")
async def test_workers_share_one_per_bot_budget(sandbox: Any, tmp_path: Path) -> None:
    sandbox.faults.limits = [(BUDGET, SANDBOX_WINDOW_S)]
    settings = merge(base_settings(tmp_path, sandbox.url), {
        "server": {"listen": "127.0.0.1:0"},  # the supervisor picks one port for all workers
        "upstream": {"timeout_s": 15},
        "rate_limit": {"enabled": True, "windows": [{"calls": BUDGET, "per_s": WINDOW_S}]},
    })
    audit = Path(settings["audit"]["path"])
    log = tmp_path / "gateway.log"
    proc = start(write_config(tmp_path, settings), log)
    try:
        [listen] = await wait_listening(log, proc)
        assert not listen.endswith(":0"), listen
        url = f"http://{listen}"
        await wait_healthy(url, proc)
        statuses = await burst(url, CALLS)
    finally:
        code = stop(proc)

    assert code == 0
    assert statuses == [200] * CALLS
    stats = sandbox.emulator.stats()
    assert stats["upstream_429"] == 0, stats
    assert stats["by_status"] == {"200": CALLS}, stats
    files = [audit.with_name(f"{audit.stem}-w{n}{audit.suffix}") for n in range(WORKERS)]
    share = BUDGET // WORKERS
    for path in files:
        report = verify_files([path])
        assert report.ok, report.error
        times = requested_times(path)
        assert times, f"{path.name}: this worker served nothing, the split was not exercised"
        # No worker sends more than its share of the budget within one window.
        for first, later in zip(times, times[share:]):
            assert later - first >= SANDBOX_WINDOW_S, (path.name, later - first)
    assert sum(len(requested_times(p)) for p in files) == CALLS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited: it only waits for its parent to reap it
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
async def test_workers_do_not_outlive_a_killed_supervisor(sandbox: Any, tmp_path: Path) -> None:
    """The supervisor SIGKILLed (as the OOM killer does): its workers get SIGTERM from the
    kernel and exit, instead of staying behind, orphaned, on the port."""
    settings = merge(base_settings(tmp_path, sandbox.url), {"server": {"drain_s": 1}})
    log = tmp_path / "gateway.log"
    proc = start(write_config(tmp_path, settings), log)
    try:
        await wait_listening(log, proc)
        pids = [json.loads(line)["pid"] for line in log.read_text().splitlines()
                if '"gateway.listening"' in line]
        assert len(pids) == WORKERS and all(_alive(pid) for pid in pids)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not [pid for pid in pids if _alive(pid)], log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
