"""The circuit breaker through HTTP: a run of failed calls to a bot opens its circuit (fast 502
with Retry-After, nothing sent, state in /readyz and the logs), a probe after the cool-down
closes it, failures across many bots open the host's, and a probe cut short by a shutdown never
leaves a circuit stuck half-open."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from gateway.http.app import RUNTIME
from tests.conftest import BOT
from tests.faults.kore import AUTH, calls_for, expect_exact_attempts, inject, wait_for
from tests.integration.sides import AuditTrail, expect_error, retry_after

URL = f"/v1/bots/{BOT}/sessions/deactivate"
BODY = {"userId": "u-1"}
COOLDOWN_S = 0.5


async def circuit(gateway: Any, bot: str = BOT) -> str:
    """The bot's circuit as /readyz shows it ("open" covers half-open), or the host's."""
    resp = await gateway.get("/readyz")
    assert resp.status == 200  # an upstream outage is not this instance's unreadiness
    detail = (await resp.json())["circuit"]
    if bot == "*":
        return str(detail["state"])
    return "open" if bot in detail["openBotIds"] else "closed"


async def test_run_of_failures_opens_then_a_probe_closes(start_gateway: Any, sandbox: Any,
                                                         audit: AuditTrail) -> None:
    inject(sandbox, error_rate=1.0, error_status=503)
    gateway = await start_gateway(upstream={"max_attempts": 1, "breaker_failures": 2,
                                            "breaker_cooldown_s": COOLDOWN_S})
    with capture_logs() as logs:
        for _ in range(2):
            await expect_error(await gateway.post(URL, json=BODY, headers=AUTH), 502,
                               "upstream_unavailable")
        assert await circuit(gateway) == "open"
        started = time.monotonic()
        resp = await gateway.post(URL, json=BODY, headers={**AUTH, "X-Request-ID": "fast"})
        await expect_error(resp, 502, "upstream_unavailable")
        assert time.monotonic() - started < 1 and retry_after(resp) == 1
        assert calls_for(sandbox, "fast") == []

        inject(sandbox)  # Kore.ai is back
        await asyncio.sleep(COOLDOWN_S + 0.1)
        resp = await gateway.post(URL, json=BODY, headers={**AUTH, "X-Request-ID": "probe"})
        assert resp.status == 200
        assert await circuit(gateway) == "closed"
    changes = [(e["event"], e["bot"]) for e in logs if e["event"].startswith("upstream.circuit_")]
    assert changes == [("upstream.circuit_open", BOT), ("upstream.circuit_half_open", BOT),
                       ("upstream.circuit_closed", BOT)]
    records = audit.expect_chain()
    fast = expect_exact_attempts(records, sandbox, "fast")
    assert (fast["event"], fast["status"], fast["error"]) == ("deactivate.denied", 502,
                                                              "upstream_unavailable")
    assert expect_exact_attempts(records, sandbox, "probe")["outcome"] == "success"


async def test_failures_across_many_bots_open_the_host(start_gateway: Any, sandbox: Any,
                                                       audit: AuditTrail) -> None:
    """Kore.ai down for every bot: after `breaker_host_bots` distinct failing bots, a bot
    never called before is refused at once too; the first success closes it again."""
    inject(sandbox, error_rate=1.0, error_status=503)
    gateway = await start_gateway(upstream={"max_attempts": 1, "breaker_host_bots": 3,
                                            "breaker_cooldown_s": COOLDOWN_S})
    for n in range(3):
        await expect_error(await gateway.post(f"/v1/bots/st-down-{n}/sessions/deactivate",
                                              json=BODY, headers=AUTH), 502,
                           "upstream_unavailable")
    assert await circuit(gateway, "*") == "open"
    resp = await gateway.post(URL, json=BODY, headers={**AUTH, "X-Request-ID": "new-bot"})
    await expect_error(resp, 502, "upstream_unavailable")
    assert retry_after(resp) >= 1 and calls_for(sandbox, "new-bot") == []
    inject(sandbox)
    await asyncio.sleep(COOLDOWN_S + 0.1)
    assert (await gateway.post(URL, json=BODY, headers=AUTH)).status == 200
    assert await circuit(gateway, "*") == "closed"
    audit.expect_chain()


async def test_probe_cut_short_gives_its_slot_back(start_gateway: Any, sandbox: Any,
                                                   audit: AuditTrail) -> None:
    inject(sandbox, fail_first=1, error_status=503)
    gateway = await start_gateway(upstream={"max_attempts": 1, "breaker_failures": 1,
                                            "breaker_cooldown_s": 0.2})
    await expect_error(await gateway.post(URL, json=BODY, headers=AUTH), 502,
                       "upstream_unavailable")
    await asyncio.sleep(0.3)
    inject(sandbox, latency_ms=3000)
    probe = asyncio.ensure_future(gateway.post(URL, json=BODY,
                                               headers={**AUTH, "X-Request-ID": "cut"}))
    await wait_for(lambda: calls_for(sandbox, "cut"), what="the probe to reach Kore.ai")
    await gateway.app[RUNTIME].cancel_in_flight(wait_s=2)  # what a drain past drain_s does
    try:
        await probe
    except aiohttp.ClientError:
        pass  # the connection of a cancelled request is closed without an answer
    inject(sandbox)
    resp = await gateway.post(URL, json=BODY, headers=AUTH)
    assert resp.status == 200, await resp.text()  # the next call may probe: not stuck
    cut = expect_exact_attempts(audit.expect_chain(), sandbox, "cut")
    assert (cut["event"], cut["status"], cut["error"], cut["upstreamStatus"]) == (
        "deactivate.completed", 503, "overloaded", None)
