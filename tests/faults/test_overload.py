"""Overload and cut-short requests: a burst past `server.max_in_flight` is shed at once (not
queued), and a request ended by anything but a contract error still gets exactly one
terminal audit record."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from gateway.http.app import RUNTIME
from tests.conftest import BOT
from tests.faults.kore import AUTH, expect_exact_attempts, inject, wait_for
from tests.integration.sides import AuditTrail, expect_error, retry_after

URL = f"/v1/bots/{BOT}/sessions/deactivate"
LATENCY_S = 1.0


async def test_burst_past_max_in_flight_is_shed_at_once(start_gateway: Any, sandbox: Any,
                                                        audit: AuditTrail) -> None:
    inject(sandbox, latency_ms=LATENCY_S * 1000)
    gateway = await start_gateway(server={"max_in_flight": 4})

    async def one(i: int) -> tuple[Any, float]:
        started = time.monotonic()
        resp = await gateway.post(URL, json={"userId": f"u-{i}"},
                                  headers={**AUTH, "X-Request-ID": f"burst-{i}"})
        await resp.read()
        return resp, time.monotonic() - started

    answers = await asyncio.gather(*(one(i) for i in range(24)))
    served = [resp for resp, _ in answers if resp.status == 200]
    shed = [(resp, took) for resp, took in answers if resp.status != 200]
    assert 4 <= len(served) < 24 and len(served) + len(shed) == 24
    for resp, took in shed:
        await expect_error(resp, 503, "overloaded")
        assert retry_after(resp) >= 1
        assert took < LATENCY_S / 2  # refused at once, never queued behind the slow calls
    assert len(sandbox.calls) == len(served)
    records = audit.expect_chain()
    for resp, _ in answers:
        rid = resp.headers["X-Request-ID"]
        record = expect_exact_attempts(records, sandbox, rid)
        expected = ("deactivate.completed", 200) if resp.status == 200 else (
            "deactivate.denied", 503)
        assert (record["event"], record["status"]) == expected


async def test_unexpected_error_still_ends_with_one_terminal_record(
        start_gateway: Any, sandbox: Any, audit: AuditTrail,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug after the requested record: the caller gets the 500 envelope, the audit its end."""
    gateway = await start_gateway()
    rt = gateway.app[RUNTIME]

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(rt.client, "deactivate", broken)
    resp = await gateway.post(URL, json={"userId": "u-1"}, headers={**AUTH, "X-Request-ID": "bug"})
    await expect_error(resp, 500, "internal_error")
    [requested, completed] = audit.expect_chain()
    assert (requested["event"], completed["event"]) == ("deactivate.requested",
                                                        "deactivate.completed")
    assert (completed["status"], completed["error"], completed["attempts"]) == (
        500, "internal_error", 0)
    assert rt.in_flight == 0


async def test_batch_cut_short_by_a_shutdown_audits_every_item(
        start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
    """Items already sent end `completed`, items still queued end `denied`: none is lost."""
    inject(sandbox, latency_ms=5000)
    gateway = await start_gateway(server={"batch_concurrency": 2})
    items = [{"botId": BOT, "userId": f"u-{i}"} for i in range(6)]
    batch = asyncio.ensure_future(gateway.post("/v1/sessions/deactivate", json={"items": items},
                                               headers={**AUTH, "X-Request-ID": "big"}))
    await wait_for(lambda: len(sandbox.calls) == 2, what="the first items in flight")
    await gateway.app[RUNTIME].cancel_in_flight(wait_s=2)
    with pytest.raises(aiohttp.ClientError):
        await batch
    records = audit.expect_chain()
    for i in range(6):
        record = expect_exact_attempts(records, sandbox, f"big.{i}")
        assert (record["status"], record["error"]) == (503, "overloaded")
        assert record["event"] == ("deactivate.completed" if i < 2 else "deactivate.denied")


async def test_bug_in_one_batch_item_fails_that_item_alone(
        start_gateway: Any, sandbox: Any, audit: AuditTrail,
        monkeypatch: pytest.MonkeyPatch) -> None:
    gateway = await start_gateway()
    client = gateway.app[RUNTIME].client
    real = client.deactivate

    async def flaky_code(app: Any, d: Any, *args: Any) -> Any:
        if d.user_id == "boom":
            raise RuntimeError("a bug")
        return await real(app, d, *args)

    monkeypatch.setattr(client, "deactivate", flaky_code)
    items = [{"botId": BOT, "userId": "boom"}, {"botId": BOT, "userId": "fine"}]
    resp = await gateway.post("/v1/sessions/deactivate", json={"items": items},
                              headers={**AUTH, "X-Request-ID": "mixed"})
    assert resp.status == 200
    results = (await resp.json())["results"]
    assert [(r["status"], (r.get("error") or {}).get("code")) for r in results] == [
        (500, "internal_error"), (200, None)]
    records = audit.expect_chain()
    assert expect_exact_attempts(records, sandbox, "mixed.0")["error"] == "internal_error"
    assert expect_exact_attempts(records, sandbox, "mixed.1")["outcome"] == "success"
