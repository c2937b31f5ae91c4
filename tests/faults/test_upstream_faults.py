"""Kore.ai misbehaving, through each deactivation route: the caller gets the contract's answer
in time, and the terminal audit record's `attempts` equals the PUTs Kore.ai saw for that
request ID (retries, re-mints and dropped connections included)."""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import BOT
from tests.faults.kore import AUTH, calls_for, expect_exact_attempts, inject
from tests.integration.live import refusing_port
from tests.integration.sides import AuditTrail, expect_error, retry_after

MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Scenario:
    faults: dict[str, Any]
    statuses: tuple[int, ...]  # what the caller may get (several: seeded dice)
    code: str | None = None  # the error code, when a single error status is expected
    attempts: int | None = None  # exact, when the scenario fixes it
    upstream: dict[str, Any] = field(default_factory=dict)
    closed_port: bool = False


SCENARIOS = {
    "flaky-5xx-once": Scenario({"fail_first": 1, "error_status": 503}, (200,), attempts=2),
    "flaky-5xx-twice": Scenario({"fail_first": 2, "error_status": 500}, (200,), attempts=3),
    "flaky-5xx-seeded": Scenario({"error_rate": 0.5, "error_status": 502, "seed": 7},
                                 (200, 502)),
    "always-5xx": Scenario({"error_rate": 1.0, "error_status": 500}, (502,),
                           "upstream_unavailable", attempts=MAX_ATTEMPTS),
    "429-beyond-deadline": Scenario({"rate_429": 1.0, "retry_after_s": 30}, (429,),
                                    "rate_limited", attempts=1, upstream={"timeout_s": 2}),
    "slow-beyond-deadline": Scenario({"latency_ms": 1500}, (504,), "upstream_timeout",
                                     attempts=1, upstream={"timeout_s": 0.4}),
    "dropped-always": Scenario({"drop_rate": 1.0}, (502,), "upstream_unavailable",
                               attempts=MAX_ATTEMPTS),
    "dropped-seeded": Scenario({"drop_rate": 0.5, "seed": 3}, (200, 502)),
    "port-closed": Scenario({}, (502,), "upstream_unavailable", attempts=MAX_ATTEMPTS,
                            closed_port=True),
    "token-rejected-once": Scenario({"reject_token_next": 1}, (200,), attempts=2),
    "token-rejected-always": Scenario({"reject_token_next": 100}, (502,),
                                      "upstream_auth_failed", attempts=2),
    "mixed-seeded": Scenario({"error_rate": 0.3, "rate_429": 0.3, "retry_after_s": 0,
                              "drop_rate": 0.1, "seed": 11}, (200, 429, 502)),
}

ROUTES = {
    "simplified": ("POST", f"/v1/bots/{BOT}/sessions/deactivate", {"userId": "u-1"}),
    "kore": ("PUT", f"/api/public/bot/{BOT}/session", {"userId": "u-1", "status": "inactive"}),
    "batch": ("POST", "/v1/sessions/deactivate", {"items": [{"botId": BOT, "userId": "u-1"}]}),
}


async def deactivate(gateway: Any, route: str, rid: str) -> tuple[int, dict[str, Any], str]:
    """(status, error object or {}, the request ID Kore.ai and the audit see) for one call."""
    method, path, body = ROUTES[route]
    resp = await gateway.request(method, path, json=body, headers={**AUTH, "X-Request-ID": rid})
    if route != "batch":
        error = await expect_error(resp, resp.status, (await resp.json())["error"]["code"]) \
            if resp.status != 200 else {}
        if resp.status == 429:
            retry_after(resp)
        return resp.status, error, rid
    assert resp.status == 200
    [item] = (await resp.json())["results"]
    return item["status"], item.get("error") or {}, f"{rid}.0"


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_attempts_are_exact_under_upstream_faults(
        start_gateway: Any, sandbox: Any, audit: AuditTrail, name: str, route: str,
        request: pytest.FixtureRequest) -> None:
    scenario = SCENARIOS[name]
    inject(sandbox, **scenario.faults)
    upstream = {"max_attempts": MAX_ATTEMPTS, **scenario.upstream}
    refused = contextlib.ExitStack()
    request.addfinalizer(refused.close)
    base_url = (f"http://127.0.0.1:{refused.enter_context(refusing_port())}"
                if scenario.closed_port else None)
    gateway = await start_gateway(base_url=base_url, upstream=upstream)
    started = time.monotonic()
    status, error, rid = await deactivate(gateway, route, f"fault-{name}")
    took = time.monotonic() - started

    assert status in scenario.statuses, (status, error)
    if scenario.code is not None:
        assert error["code"] == scenario.code, error
    assert took < upstream.get("timeout_s", 5) + 1  # the deadline holds, retries included
    records = audit.expect_chain()
    record = expect_exact_attempts(records, sandbox, rid, unreachable=scenario.closed_port)
    assert record["event"] == "deactivate.completed" and record["status"] == status
    assert record["error"] == (error.get("code") if status != 200 else None)
    if scenario.attempts is not None:
        assert record["attempts"] == scenario.attempts
    if scenario.closed_port:
        assert sandbox.calls == []


async def test_429_storm_honours_retry_after_between_attempts(
        start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
    """Kore.ai says "retry in 1 s" every time: the gateway waits that long, then gives up."""
    inject(sandbox, rate_429=1.0, retry_after_s=1)
    gateway = await start_gateway(upstream={"max_attempts": MAX_ATTEMPTS, "timeout_s": 5})
    status, error, rid = await deactivate(gateway, "simplified", "storm-1")
    assert (status, error["code"]) == (429, "rate_limited")
    calls = calls_for(sandbox, rid)
    assert len(calls) == MAX_ATTEMPTS
    gaps = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.95 for gap in gaps), gaps
    record = expect_exact_attempts(audit.expect_chain(), sandbox, rid)
    assert record["upstreamStatus"] == 429


async def test_many_callers_through_a_flaky_upstream_each_get_exact_attempts(
        start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
    import asyncio

    inject(sandbox, error_rate=0.4, error_status=503, drop_rate=0.1, seed=5)
    gateway = await start_gateway(upstream={"max_attempts": 4})
    results = await asyncio.gather(*(deactivate(gateway, route, f"crowd-{i}")
                                     for i, route in enumerate(list(ROUTES) * 10)))
    assert {status for status, _, _ in results} <= {200, 502}
    records = audit.expect_chain()
    for _, _, rid in results:
        expect_exact_attempts(records, sandbox, rid)
    assert sum(r["attempts"] for r in records if r["event"] == "deactivate.completed") == len(
        sandbox.calls)
