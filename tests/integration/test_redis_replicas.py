"""Several real gateway processes sharing one real Redis: one budget for all of them, no
upstream 429, and a gateway that keeps serving while Redis is gone and returns to it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.redis_scenario import CALLER_KEY, QUICK, Cluster, Scenario, run_scenario
from tests.conftest import BOT

OUTAGE = Scenario(gateways=2, bots=2, calls=20, per_s=2.0, timeout_s=5.0,
                  local_fallback_fraction=0.25)


async def test_three_gateways_share_one_budget(redis_server_binary: str, tmp_path: Path) -> None:
    """The benchmark scenario, scaled to seconds: 160 calls over 4 bots, 20 per 2 s each."""
    f = await run_scenario(QUICK, tmp_path)
    assert f["upstream_429"] == 0, f
    assert f["succeeded"] == QUICK.deactivations and f["gateway_deferrals_429"] == 0
    assert f["max_upstream_calls_per_bot_in_any_window"] <= QUICK.calls
    # Three processes each pacing on its own would finish in a third of the time (and meet 429s).
    assert QUICK.minimum_s() * 0.9 <= f["completion_s"] <= QUICK.minimum_s() * 2
    assert f["redis_keys"] == QUICK.bots
    assert f["audit_chains_ok"] and f["gateway_exit_codes"] == [0, 0, 0]


async def deactivate(session: aiohttp.ClientSession, url: str, bot: str, n: int
                     ) -> tuple[int, float]:
    started = time.monotonic()
    async with session.post(f"{url}/v1/bots/{bot}/sessions/deactivate", json={"userId": f"u-{n}"},
                            headers={"Authorization": f"Bearer {CALLER_KEY}"}) as resp:
        await resp.read()
        return resp.status, time.monotonic() - started


async def spread(session: aiohttp.ClientSession, urls: list[str], count: int
                 ) -> list[tuple[int, float]]:
    """`count` calls at once, round-robin over gateways and the two bots."""
    return list(await asyncio.gather(*(
        deactivate(session, urls[i % len(urls)], f"st-outage-{i % 2}", i)
        for i in range(count))))


async def rate_limit_states(cluster: Cluster) -> list[tuple[int, str]]:
    states = []
    for url in cluster.gateway_urls:
        status, body = await cluster.readiness(url)
        states.append((status, body["rateLimit"]["state"]))
    return states


async def fallback_gauges(session: aiohttp.ClientSession, cluster: Cluster) -> list[str]:
    lines = []
    for url in cluster.gateway_urls:
        async with session.get(url + "/metrics") as resp:
            text = await resp.text()
        lines += [line for line in text.splitlines()
                  if line.startswith("kore_gateway_ratelimit_redis_fallback ")]
    return lines


async def test_redis_killed_mid_run_gateways_serve_locally_then_return(
        redis_server_binary: str, tmp_path: Path) -> None:
    async with Cluster(OUTAGE, tmp_path, redis_server_binary) as cluster, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        urls = cluster.gateway_urls
        assert {s for s, _ in await spread(session, urls, 10)} == {200}

        cluster.redis.kill()
        during = await spread(session, urls, 20)
        assert {s for s, _ in during} <= {200, 429} and max(t for _, t in during) < 3.0
        assert await rate_limit_states(cluster) == [(200, "local_fallback")] * 2
        assert await fallback_gauges(session, cluster) == [
            "kore_gateway_ratelimit_redis_fallback 1.0"] * 2

        cluster.redis.start()  # same port, empty
        deadline = time.monotonic() + 10
        while await rate_limit_states(cluster) != [(200, "redis")] * 2:
            assert time.monotonic() < deadline, await rate_limit_states(cluster)
            await asyncio.sleep(0.2)
        assert await fallback_gauges(session, cluster) == [
            "kore_gateway_ratelimit_redis_fallback 0.0"] * 2
        assert {s for s, _ in await spread(session, urls, 4)} == {200}
        stats = await cluster.sandbox_get("/__sandbox/stats")
    assert stats["upstream_429"] == 0
    for n in range(OUTAGE.gateways):
        log = (tmp_path / f"gateway-{n}.log").read_text()
        assert log.count("ratelimit.redis_unavailable") == 1, log
        assert log.count("ratelimit.redis_restored") == 1, log


async def test_a_hung_redis_holds_no_request(make_config: Any, gateway_for: Any, sandbox: Any,
                                            auth_headers: dict[str, str],
                                            silent_port: int) -> None:
    """Redis accepts connections and never answers: requests are served, readiness stays 200."""
    gateway = await gateway_for(make_config(sandbox.url, rate_limit={
        "backend": "redis", "redis_url": f"redis://127.0.0.1:{silent_port}/0",
        "redis_timeout_s": 0.1}))

    async def one(n: int) -> tuple[int, float]:
        started = time.monotonic()
        resp = await gateway.post(f"/v1/bots/{BOT}/sessions/deactivate", json={"userId": f"u{n}"},
                                  headers=auth_headers)
        return resp.status, time.monotonic() - started

    results = await asyncio.gather(*(one(n) for n in range(5)))
    assert [s for s, _ in results] == [200] * 5 and max(t for _, t in results) < 2.0
    ready = await gateway.get("/readyz")
    body = await ready.json()
    assert ready.status == 200 and body["rateLimit"]["state"] == "local_fallback"
    metrics = await (await gateway.get("/metrics")).text()
    assert "kore_gateway_ratelimit_redis_fallback 1.0" in metrics
