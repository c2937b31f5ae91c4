"""`serve --workers 2` with the memory backend: what Kore.ai's rate-limit answer taught one
worker, the other follows (the supervisor's shared table), over real processes and sockets."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.metrics import PUBLISH_EVERY_S
from tests.conftest import BOT, CALLER_KEY, base_settings, merge, write_config
from tests.integration.test_crash import wait_healthy
from tests.integration.test_workers import start, stop, wait_listening

CALLS = 20
PATH = f"/v1/bots/{BOT}/sessions/deactivate"


@contextlib.asynccontextmanager
async def two_workers(sandbox: Any, tmp_path: Path, overrides: dict[str, Any]
                      ) -> AsyncIterator[tuple[str, Path]]:
    """`serve --workers 2` with these settings, ready: its URL and log; stopped cleanly."""
    log = tmp_path / "gateway.log"
    proc = start(write_config(tmp_path, merge(base_settings(tmp_path, sandbox.url), overrides)),
                 log)
    try:
        [listen] = await wait_listening(log, proc)
        url = f"http://{listen}"
        await wait_healthy(url, proc)
        yield url, log
    except BaseException:
        stop(proc)
        raise
    assert stop(proc) == 0


async def one(url: str, path: str, method: str = "POST") -> tuple[int, dict[str, Any] | str]:
    """One request on its own connection, so that either worker may answer it."""
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                      timeout=aiohttp.ClientTimeout(total=15)) as s,
                s.request(method, url + path, json={"userId": "u-1"} if method == "POST" else None,
                          headers={"Authorization": f"Bearer {CALLER_KEY}"}) as resp):
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT and POSIX signals")
async def test_a_worker_that_saw_no_refusal_still_pauses(sandbox: Any, tmp_path: Path) -> None:
    sandbox.faults.rate_429, sandbox.faults.limit_answer = 1.0, "kore"
    async with two_workers(sandbox, tmp_path, {"upstream": {"timeout_s": 5},
                                               "rate_limit": {"backoff_s": 60}}) as (url, log):
        first = await one(url, PATH)
        assert first[0] == 429 and len(sandbox.calls) == 1
        later = await asyncio.gather(*(one(url, PATH) for _ in range(CALLS)))
        ready = await asyncio.gather(*(one(url, "/readyz", "GET") for _ in range(10)))
        await asyncio.sleep(2 * PUBLISH_EVERY_S)  # the pausing worker's count is published
        metrics = (await one(url, "/metrics", "GET"))[1]
    assert [status for status, _ in later] == [429] * CALLS
    assert len(sandbox.calls) == 1, "a worker sent a call during the pause"
    assert {body["pausedBots"] for _, body in ready} == {1}  # type: ignore[index]
    assert isinstance(metrics, str)
    assert f'kore_gateway_ratelimit_learned_budget{{bot="{BOT}"}} 1.0' in metrics
    assert "kore_gateway_ratelimit_paused_bots 1.0" in metrics
    [pause] = [line for line in metrics.splitlines()
               if line.startswith(f'kore_gateway_ratelimit_pause_seconds{{bot="{BOT}"}} ')]
    assert 0 < float(pause.split()[-1]) <= 60
    assert "kore_gateway_ratelimit_pauses_total 1.0" in metrics
    pids = {line for line in log.read_text().splitlines() if '"gateway.listening"' in line}
    assert len(pids) == 2


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT and POSIX signals")
async def test_the_learned_budget_counts_the_calls_of_both_workers(sandbox: Any,
                                                                   tmp_path: Path) -> None:
    """Kore.ai accepts six calls in its window, sent by either worker: the budget learned is
    six, not the share of the worker that saw the refusal."""
    sandbox.faults.limits, sandbox.faults.limit_answer = [(6, 30.0)], "kore"
    overrides = {"upstream": {"timeout_s": 2},
                 "rate_limit": {"windows": [{"calls": 60, "per_s": 30}], "backoff_s": 60}}
    async with two_workers(sandbox, tmp_path, overrides) as (url, _):
        accepted = [await one(url, PATH) for _ in range(6)]  # each on its own connection
        refused = await one(url, PATH)
        later = await asyncio.gather(*(one(url, PATH) for _ in range(CALLS)))  # both workers
        await asyncio.sleep(2 * PUBLISH_EVERY_S)
        metrics = (await one(url, "/metrics", "GET"))[1]
    assert [status for status, _ in accepted] == [200] * 6
    assert refused[0] == 429 and {status for status, _ in later} == {429}
    assert len(sandbox.calls) == 7, "a worker sent a call during the pause"
    assert isinstance(metrics, str)
    assert f'kore_gateway_ratelimit_learned_budget{{bot="{BOT}"}} 6.0' in metrics, [
        line for line in metrics.splitlines() if "learned_budget" in line]
