"""Every row of the contract's "Upstream outcomes as the caller sees them" table over real HTTP,
each checked on the caller's response, at the sandbox and in the audit log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.http.app import RUNTIME
from tests.conftest import BOT, CALLER_KEY, CLIENT_ID, CLIENT_SECRET
from tests.faults.kore import wait_for
from tests.integration.live import refusing_port
from tests.integration.sides import (
    ROUTE_BATCH,
    ROUTE_KORE,
    AuditTrail,
    completed,
    denied,
    expect_error,
    expect_upstream_call,
    request_id,
    requested,
    retry_after,
    set_faults,
)

URL = f"/v1/bots/{BOT}/sessions/deactivate"
AUTH = {"Authorization": f"Bearer {CALLER_KEY}"}
BODY = {"userId": "u-1"}


def expect_calls(sandbox: Any, count: int, rid: str) -> list[Any]:
    """`count` identical PUTs of `BODY` for one caller request (retries repeat the call)."""
    assert len(sandbox.calls) == count, [c.status for c in sandbox.calls]
    for each in sandbox.calls:
        expect_upstream_call(each, bot_id=BOT, user_id=BODY["userId"], request_id=rid)
    return list(sandbox.calls)


async def wait_for_calls(sandbox: Any, count: int, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while len(sandbox.calls) < count:
        assert time.monotonic() < deadline, "the call never reached the sandbox"
        await asyncio.sleep(0.005)


class TestUpstreamSuccess:
    async def test_success_is_200_and_audited(self, gateway: Any, sandbox: Any,
                                              audit: AuditTrail) -> None:
        resp = await gateway.post(URL, json={"userId": "u-1", "channel": "rtm"}, headers=AUTH)
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        assert await resp.json() == {"success": True, "botId": BOT, "userId": "u-1",
                                     "channel": "rtm", "requestId": rid}
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=BOT, user_id="u-1", channel="rtm", request_id=rid)
        assert call.status == 200
        fields = {"caller": "crm-service", "botId": BOT, "userId": "u-1", "channel": "rtm"}
        records = audit.expect(
            requested(rid, **fields),
            completed(rid, outcome="success", status=200, upstream_status=200, attempts=1,
                      **fields))
        assert records[1]["durationMs"] >= 0

    async def test_requested_record_is_durable_before_the_call(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        set_faults(sandbox, latency_ms=200)
        pending = asyncio.ensure_future(gateway.post(URL, json=BODY, headers=AUTH))
        await wait_for_calls(sandbox, 1)
        [written] = audit.expect_chain()
        assert written["event"] == "deactivate.requested"
        resp = await pending
        assert resp.status == 200
        audit.expect(requested(written["requestId"]),
                     completed(written["requestId"], outcome="success", status=200,
                               upstream_status=200, attempts=1))

    async def test_put_is_held_until_its_record_is_durable(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        """The PUT waits for its record's commit; a second request, behind that commit, waits
        for its own record."""
        gateway = await start_gateway()
        log = gateway.app[RUNTIME].audit
        log._io_lock.acquire()  # the commit stops before its write (the disk is stalled)
        try:
            first = asyncio.ensure_future(gateway.post(
                URL, json=BODY, headers={**AUTH, "X-Request-ID": "first"}))
            await wait_for(lambda: not log._worker.idle, what="the first record's commit")
            second = asyncio.ensure_future(gateway.post(
                URL, json={"userId": "u-2"}, headers={**AUTH, "X-Request-ID": "second"}))
            await asyncio.sleep(0.3)
            assert sandbox.calls == [] and audit.records() == []
            assert not first.done() and not second.done()
        finally:
            log._io_lock.release()
        for resp in (await first, await second):
            assert resp.status == 200, await resp.text()
        assert sorted(call.body["userId"] for call in sandbox.calls) == ["u-1", "u-2"]
        # (a terminal record may follow its answer by one commit: the contract allows it)
        await wait_for(lambda: len(audit.records()) == 4, what="both terminal records")
        records = audit.records()
        for rid in ("first", "second"):
            assert [r["event"] for r in records if r["requestId"] == rid] == [
                "deactivate.requested", "deactivate.completed"]

    async def test_deadline_passed_while_the_record_is_written_sends_nothing(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        """The deadline runs out while the record is written: 504, nothing sent, the breaker
        untouched, and the record that did become durable is closed with the timeout."""
        gateway = await start_gateway(upstream={"timeout_s": 0.2})
        log = gateway.app[RUNTIME].audit
        log._io_lock.acquire()
        try:
            pending = asyncio.ensure_future(gateway.post(URL, json=BODY, headers=AUTH))
            await asyncio.sleep(0.5)  # past the deadline
        finally:
            log._io_lock.release()
        resp = await pending
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (504, "upstream_timeout"), body
        assert "before the call could be sent" in body["error"]["message"]
        assert sandbox.calls == []
        assert gateway.app[RUNTIME].breaker.bot_failures(BOT) == 0  # a slow disk, not Kore.ai
        rid = request_id(resp)
        audit.expect(requested(rid), completed(rid, outcome="failed", status=504,
                                              upstream_status=None, error="upstream_timeout",
                                              attempts=0))

    async def test_callers_headers_are_never_forwarded(self, gateway: Any, sandbox: Any,
                                                       audit: AuditTrail) -> None:
        resp = await gateway.post(URL, json=BODY, headers={
            **AUTH, "auth": "callers-own-jwt", "Cookie": "session=abc",
            "X-Forwarded-For": "10.0.0.1", "Proxy-Authorization": "Basic eA==",
            "X-Custom": "secret-ish", "Accept-Language": "de", "Referer": "http://x/",
            "Host": "caller.example", "TE": "trailers", "Upgrade": "websocket",
            "Keep-Alive": "timeout=5", "Forwarded": "for=10.0.0.1"})
        assert resp.status == 200, await resp.text()
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=BOT, user_id="u-1", request_id=request_id(resp))
        assert call.headers["auth"] != "callers-own-jwt"
        assert call.headers["host"] == sandbox.url.removeprefix("http://")
        assert CALLER_KEY not in str(call.headers)


    async def test_configured_session_path_is_used(self, start_gateway: Any, make_sandbox: Any,
                                                   audit: AuditTrail) -> None:
        kore = await make_sandbox(session_paths=("/api/public/{botId}/sessions",))
        gateway = await start_gateway(base_url=kore.url, upstream={
            "session_path": "/api/public/{botId}/sessions", "bot_id_pattern": r"^.{1,200}$"})
        resp = await gateway.post("/v1/bots/st-a%2Fb/sessions/deactivate", json=BODY,
                                  headers=AUTH)
        assert resp.status == 200, await resp.text()
        [call] = kore.calls
        assert call.path == "/api/public/st-a%2Fb/sessions" and call.bot_id == "st-a/b"
        assert call.body == {"userId": "u-1", "status": "inactive"}
        assert call.headers["x-request-id"] == request_id(resp)
        rid = request_id(resp)
        audit.expect(requested(rid, botId="st-a/b"),
                     completed(rid, outcome="success", status=200, upstream_status=200,
                               attempts=1, botId="st-a/b"))

    async def test_user_ids_are_hashed_in_the_audit_when_configured(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(audit={"hash_user_ids": True})
        resp = await gateway.post(URL, json={"userId": "u-1"}, headers=AUTH)
        assert resp.status == 200
        assert sandbox.calls[0].body["userId"] == "u-1"  # Kore.ai still gets the real one
        hashed = "sha256:" + hashlib.sha256(b"u-1").hexdigest()
        records = audit.expect(requested(request_id(resp), userIdHash=hashed),
                               {"event": "deactivate.completed", "userIdHash": hashed})
        assert all("userId" not in r and "u-1" not in json.dumps(r) for r in records)


class TestUpstreamRejected:
    async def test_kore_404_is_404_upstream_rejected(
            self, start_gateway: Any, make_sandbox: Any, audit: AuditTrail) -> None:
        kore = await make_sandbox(known_bots=("st-known-*",))
        gateway = await start_gateway(base_url=kore.url)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        error = await expect_error(resp, 404, "upstream_rejected", names="Bot not found")
        rid = error["requestId"]
        [call] = expect_calls(kore, 1, rid)
        assert call.status == 404
        audit.expect(requested(rid),
                     completed(rid, outcome="rejected", status=404, upstream_status=404,
                               attempts=1, error="upstream_rejected"))

    async def test_kore_400_is_400_upstream_rejected(self, gateway: Any, sandbox: Any,
                                                     audit: AuditTrail) -> None:
        set_faults(sandbox, error_rate=1.0, error_status=400)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        error = await expect_error(resp, 400, "upstream_rejected", names="Bad Request")
        rid = error["requestId"]
        expect_calls(sandbox, 1, rid)  # a rejection is final: no retry
        audit.expect(requested(rid),
                     completed(rid, outcome="rejected", status=400, upstream_status=400,
                               attempts=1, error="upstream_rejected"))


class TestUpstreamAuth:
    @pytest.mark.parametrize("faults, first_status", [
        pytest.param({"reject_token_next": 1}, 401, id="401"),
        pytest.param({"fail_first": 1, "error_status": 403}, 403, id="403"),
    ])
    async def test_refused_token_is_reminted_once_and_succeeds(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, faults: dict[str, Any],
            first_status: int) -> None:
        set_faults(sandbox, **faults)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        refused, served = expect_calls(sandbox, 2, rid)
        assert (refused.status, served.status) == (first_status, 200)
        assert gateway.app[RUNTIME].tokens.mints("sessions") == 2
        audit.expect(requested(rid),
                     completed(rid, outcome="success", status=200, upstream_status=200,
                               attempts=2))

    async def test_refused_token_is_dropped_and_a_fresh_one_minted(self, gateway: Any,
                                                                   sandbox: Any) -> None:
        """Without jti a token minted in the same second may be byte-identical (same claims):
        what matters is that the refused one left the cache and a new one was signed."""
        from gateway.http.app import RUNTIME

        tokens = gateway.app[RUNTIME].tokens
        set_faults(sandbox, reject_token_next=1)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert resp.status == 200
        assert tokens.mints("sessions") == 2
        assert len(sandbox.calls) == 2

    async def test_jti_app_retries_with_a_distinct_token(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(apps=[{
            "name": "sessions", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
            "jti": True, "bots": ["st-*"]}])
        set_faults(sandbox, reject_token_next=1)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        refused, served = sandbox.calls
        # a jti app's tokens live 120 s by default: each serves one attempt
        first = expect_upstream_call(refused, bot_id=BOT, user_id="u-1", request_id=rid,
                                     ttl_s=120)
        second = expect_upstream_call(served, bot_id=BOT, user_id="u-1", request_id=rid,
                                      ttl_s=120)
        assert refused.headers["auth"] != served.headers["auth"]
        assert first["jti"] != second["jti"]
        audit.expect(requested(rid), completed(rid, outcome="success", status=200,
                                               upstream_status=200, attempts=2))

    async def test_remint_is_allowed_when_max_attempts_is_spent(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(upstream={"max_attempts": 1})
        set_faults(sandbox, reject_token_next=1)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        expect_calls(sandbox, 2, rid)
        audit.expect(requested(rid), completed(rid, outcome="success", status=200,
                                               upstream_status=200, attempts=2))

    @pytest.mark.parametrize("faults, status", [
        pytest.param({"reject_token_next": 100}, 401, id="401"),
        pytest.param({"error_rate": 1.0, "error_status": 403}, 403, id="403"),
    ])
    async def test_refused_again_after_remint_is_upstream_auth_failed(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, faults: dict[str, Any],
            status: int) -> None:
        set_faults(sandbox, **faults)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        error = await expect_error(resp, 502, "upstream_auth_failed")
        host = sandbox.url.removeprefix("http://")
        assert f"Kore.ai at {host} refused" in error["message"]  # names the host
        assert "Bot Sessions scope is assigned to the app and published" in error["message"]
        rid = error["requestId"]
        calls = expect_calls(sandbox, 2, rid)  # the first try and one re-mint, no more
        assert [c.status for c in calls] == [status, status]
        assert "WWW-Authenticate" not in resp.headers  # not the caller's credentials
        audit.expect(requested(rid),
                     completed(rid, outcome="failed", status=502, upstream_status=status,
                               attempts=2, error="upstream_auth_failed"))


class TestUpstreamRateLimited:
    async def test_429_after_retries_is_rate_limited_with_retry_after(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        set_faults(sandbox, rate_429=1.0, retry_after_s=0)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        error = await expect_error(resp, 429, "rate_limited")
        retry_after(resp)
        rid = error["requestId"]
        calls = expect_calls(sandbox, 3, rid)  # max_attempts = 3 (default)
        assert [c.status for c in calls] == [429, 429, 429]
        audit.expect(requested(rid),
                     completed(rid, outcome="failed", status=429, upstream_status=429,
                               attempts=3, error="rate_limited"))

    async def test_429_whose_retry_after_passes_the_deadline_is_answered_at_once(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(upstream={"timeout_s": 2})
        set_faults(sandbox, rate_429=1.0, retry_after_s=30)
        started = time.monotonic()
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert time.monotonic() - started < 1.0
        error = await expect_error(resp, 429, "rate_limited")
        assert 30 <= retry_after(resp) <= 31  # Kore.ai's own wait, passed on honestly
        rid = error["requestId"]
        expect_calls(sandbox, 1, rid)
        audit.expect(requested(rid),
                     completed(rid, outcome="failed", status=429, upstream_status=429,
                               attempts=1, error="rate_limited"))


class TestUpstreamUnavailable:
    @pytest.mark.parametrize("status", [500, 502, 503, 504])
    async def test_5xx_after_retries_is_upstream_unavailable(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, status: int) -> None:
        set_faults(sandbox, error_rate=1.0, error_status=status)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        error = await expect_error(resp, 502, "upstream_unavailable")
        rid = error["requestId"]
        calls = expect_calls(sandbox, 3, rid)
        assert [c.status for c in calls] == [status] * 3
        audit.expect(requested(rid),
                     completed(rid, outcome="failed", status=502, upstream_status=status,
                               attempts=3, error="upstream_unavailable"))

    @pytest.mark.parametrize("max_attempts", [1, 2, 5])
    async def test_attempts_are_exactly_max_attempts(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail, max_attempts: int
            ) -> None:
        gateway = await start_gateway(upstream={"max_attempts": max_attempts})
        set_faults(sandbox, error_rate=1.0, error_status=503)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        rid = (await expect_error(resp, 502, "upstream_unavailable"))["requestId"]
        expect_calls(sandbox, max_attempts, rid)
        audit.expect(requested(rid),
                     completed(rid, outcome="failed", status=502, upstream_status=503,
                               attempts=max_attempts, error="upstream_unavailable"))

    async def test_5xx_then_success_is_200(self, gateway: Any, sandbox: Any,
                                           audit: AuditTrail) -> None:
        set_faults(sandbox, fail_first=2, error_status=503)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        calls = expect_calls(sandbox, 3, rid)
        assert [c.status for c in calls] == [503, 503, 200]
        audit.expect(requested(rid), completed(rid, outcome="success", status=200,
                                               upstream_status=200, attempts=3))

    async def test_dropped_connections_are_upstream_unavailable(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        set_faults(sandbox, drop_rate=1.0)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        rid = (await expect_error(resp, 502, "upstream_unavailable"))["requestId"]
        calls = expect_calls(sandbox, 3, rid)
        assert [c.status for c in calls] == [0, 0, 0]  # never answered
        audit.expect(requested(rid),
                     completed(rid, outcome="failed", status=502, upstream_status=None,
                               attempts=3, error="upstream_unavailable"))

    async def test_closed_upstream_port_is_upstream_unavailable(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        with refusing_port() as port:
            gateway = await start_gateway(base_url=f"http://127.0.0.1:{port}")
            resp = await gateway.post(URL, json=BODY, headers=AUTH)
            rid = (await expect_error(resp, 502, "upstream_unavailable"))["requestId"]
        assert sandbox.calls == []
        audit.expect(requested(rid),
                     completed(rid, outcome="failed", status=502, upstream_status=None,
                               attempts=3, error="upstream_unavailable"))

    async def test_persistent_5xx_keeps_answering_502(self, start_gateway: Any,
                                                      sandbox: Any, audit: AuditTrail) -> None:
        """Also once a circuit breaker stops calling Kore.ai for a while."""
        gateway = await start_gateway(upstream={"max_attempts": 1})
        set_faults(sandbox, error_rate=1.0, error_status=503)
        for _ in range(7):
            resp = await gateway.post(URL, json=BODY, headers=AUTH)
            await expect_error(resp, 502, "upstream_unavailable")
        events = audit.expect_one_terminal_per_request()
        assert len(events) == 7
        went_upstream = [e for e in events.values() if e[0] == "deactivate.requested"]
        assert len(went_upstream) == len(sandbox.calls) >= 1


ODD_SUCCESS = [pytest.param("empty", 200, id="empty-200"),
               pytest.param("no_content", 204, id="204"),
               pytest.param("string_true", 200, id="success-string-true")]


class TestOddSuccessAnswers:
    """A 2xx without `{"success": true}` is not taken for a success: 502 at once (no retry:
    Kore.ai may well have closed the session) and audited as failed."""

    @pytest.mark.parametrize("mode, upstream_status", ODD_SUCCESS)
    async def test_simplified_route_is_502_and_audited(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, mode: str,
            upstream_status: int) -> None:
        set_faults(sandbox, odd_success=mode)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        error = await expect_error(resp, 502, "upstream_unavailable",
                                   names=f"answered {upstream_status} without success: true")
        rid = error["requestId"]
        [call] = expect_calls(sandbox, 1, rid)
        assert call.status == upstream_status
        audit.expect(requested(rid),
                     completed(rid, outcome="failed", status=502, upstream_status=upstream_status,
                               attempts=1, error="upstream_unavailable"))

    @pytest.mark.parametrize("mode, upstream_status", ODD_SUCCESS)
    async def test_kore_route_is_502_not_kores_2xx(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, mode: str,
            upstream_status: int) -> None:
        set_faults(sandbox, odd_success=mode)
        resp = await gateway.put(f"/api/public/bot/{BOT}/session", json=BODY, headers=AUTH)
        rid = (await expect_error(resp, 502, "upstream_unavailable"))["requestId"]
        expect_calls(sandbox, 1, rid)
        audit.expect(requested(rid, route=ROUTE_KORE),
                     completed(rid, outcome="failed", status=502, upstream_status=upstream_status,
                               attempts=1, error="upstream_unavailable", route=ROUTE_KORE))

    @pytest.mark.parametrize("mode, upstream_status", ODD_SUCCESS)
    async def test_batch_item_is_502(self, gateway: Any, sandbox: Any, audit: AuditTrail,
                                     mode: str, upstream_status: int) -> None:
        set_faults(sandbox, odd_success=mode)
        resp = await gateway.post("/v1/sessions/deactivate", headers={**AUTH, "X-Request-ID": "odd"},
                                  json={"items": [{"botId": BOT, "userId": "u-1"}]})
        assert resp.status == 200, await resp.text()
        [result] = (await resp.json())["results"]
        assert (result["status"], result["success"], result["error"]["code"]) == (
            502, False, "upstream_unavailable")
        audit.expect(requested("odd.0", route=ROUTE_BATCH),
                     completed("odd.0", outcome="failed", status=502,
                               upstream_status=upstream_status, attempts=1,
                               error="upstream_unavailable", route=ROUTE_BATCH))


class TestUpstreamTimeout:
    async def test_no_answer_within_the_deadline_is_upstream_timeout(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(upstream={"timeout_s": 0.3})
        set_faults(sandbox, latency_ms=800)
        started = time.monotonic()
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert time.monotonic() - started < 0.75  # the deadline, not Kore.ai's late answer
        rid = (await expect_error(resp, 504, "upstream_timeout"))["requestId"]
        expect_calls(sandbox, 1, rid)
        audit.expect(requested(rid),
                     completed(rid, outcome="failed", status=504, upstream_status=None,
                               attempts=1, error="upstream_timeout"))

    async def test_retries_stop_at_the_deadline(self, start_gateway: Any, sandbox: Any,
                                                audit: AuditTrail) -> None:
        gateway = await start_gateway(upstream={"timeout_s": 0.5, "max_attempts": 20},
                                      rate_limit={"enabled": False})
        set_faults(sandbox, error_rate=1.0, error_status=503, latency_ms=100)
        started = time.monotonic()
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert time.monotonic() - started < 0.9
        assert resp.status in (502, 504)
        code = "upstream_timeout" if resp.status == 504 else "upstream_unavailable"
        error = await expect_error(resp, resp.status, code)
        rid = error["requestId"]
        records = audit.expect(requested(rid), {"event": "deactivate.completed",
                                                "requestId": rid, "outcome": "failed"})
        assert 2 <= records[1]["attempts"] == len(sandbox.calls) < 20

    async def test_retry_close_to_the_deadline_is_not_rate_limited(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(upstream={"timeout_s": 0.5, "max_attempts": 20})
        set_faults(sandbox, error_rate=1.0, error_status=503, latency_ms=100)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert resp.status in (502, 504), await resp.text()
        records = audit.expect_chain()
        assert [r["event"] for r in records] == ["deactivate.requested",
                                                 "deactivate.completed"]


class TestGatewayRateLimit:
    async def test_spent_budget_is_rate_limited_and_nothing_sent(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(upstream={"timeout_s": 1},
                                      rate_limit={"windows": [{"calls": 2, "per_s": 60}]})
        served = [await gateway.post(URL, json=BODY, headers=AUTH) for _ in range(2)]
        assert [r.status for r in served] == [200, 200]
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        rid = (await expect_error(resp, 429, "rate_limited"))["requestId"]
        assert 55 <= retry_after(resp) <= 61  # 60 s + the pacing margin (SPACING_MARGIN_S)
        assert len(sandbox.calls) == 2
        ok = [(request_id(r)) for r in served]
        audit.expect(*[rec for r in ok for rec in (
                         requested(r), completed(r, outcome="success", status=200,
                                                 upstream_status=200, attempts=1))],
                     denied(rid, outcome="failed", status=429, error="rate_limited",
                            caller="crm-service", botId=BOT))

    async def test_unused_budget_never_refuses_a_short_deadline(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(upstream={"timeout_s": 0.2})
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        expect_calls(sandbox, 1, rid)
        audit.expect(requested(rid), completed(rid, outcome="success", status=200,
                                               upstream_status=200, attempts=1))

    async def test_budget_is_per_bot(self, start_gateway: Any, sandbox: Any) -> None:
        gateway = await start_gateway(upstream={"timeout_s": 1},
                                      rate_limit={"windows": [{"calls": 1, "per_s": 60}]})
        assert (await gateway.post(URL, json=BODY, headers=AUTH)).status == 200
        assert (await gateway.post(URL, json=BODY, headers=AUTH)).status == 429
        other = await gateway.post("/v1/bots/st-other/sessions/deactivate", json=BODY,
                                   headers=AUTH)
        assert other.status == 200
        assert [c.bot_id for c in sandbox.calls] == [BOT, "st-other"]

    async def test_call_waits_for_a_slot_within_the_deadline(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(rate_limit={"windows": [{"calls": 1, "per_s": 0.3}]})
        first = await gateway.post(URL, json=BODY, headers=AUTH)
        second = await gateway.post(URL, json=BODY, headers=AUTH)
        assert (first.status, second.status) == (200, 200)
        one, two = sandbox.calls
        assert two.at - one.at >= 0.25
        audit.expect(*[rec for r in (request_id(first), request_id(second)) for rec in (
            requested(r), completed(r, outcome="success", status=200, upstream_status=200,
                                    attempts=1))])

    async def test_budget_spent_during_retries_still_ends_with_one_completed_record(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(upstream={"timeout_s": 1},
                                      rate_limit={"windows": [{"calls": 2, "per_s": 60}]})
        set_faults(sandbox, error_rate=1.0, error_status=503)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        assert resp.status in (429, 502)
        rid = request_id(resp)
        expect_calls(sandbox, 2, rid)
        records = audit.expect_chain()
        assert [r["event"] for r in records] == ["deactivate.requested",
                                                 "deactivate.completed"]
        assert records[1]["attempts"] == 2 and records[1]["upstreamStatus"] == 503


class TestAuditUnavailable:
    async def test_unwritable_audit_fails_closed(self, tmp_path: Path, start_gateway: Any,
                                                 sandbox: Any) -> None:
        audit_dir = tmp_path / "audit"
        audit_dir.mkdir()
        (audit_dir / "deactivations.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
        gateway = await start_gateway()
        for method, path, body in [
                ("POST", URL, BODY),
                ("PUT", f"/api/public/bot/{BOT}/session", {"userId": "u-1"})]:
            resp = await gateway.request(method, path, json=body, headers=AUTH)
            await expect_error(resp, 503, "audit_unavailable")
        assert sandbox.calls == []
        assert (await gateway.get("/readyz")).status == 503

    async def test_unwritable_audit_fails_every_batch_item_closed(
            self, tmp_path: Path, start_gateway: Any, sandbox: Any) -> None:
        audit_dir = tmp_path / "audit"
        audit_dir.mkdir()
        (audit_dir / "deactivations.jsonl").symlink_to("/dev/full")
        gateway = await start_gateway()
        items = [{"botId": BOT, "userId": "u-0"}, {"botId": BOT, "userId": "u-1"}]
        resp = await gateway.post("/v1/sessions/deactivate", json={"items": items},
                                  headers=AUTH)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert [(r["status"], r["error"]["code"]) for r in body["results"]] == [
            (503, "audit_unavailable"), (503, "audit_unavailable")]
        assert body["summary"] == {"succeeded": 0, "failed": 2}
        assert sandbox.calls == []

    async def test_audit_directory_replaced_at_run_time_fails_closed(
            self, tmp_path: Path, start_gateway: Any, sandbox: Any) -> None:
        gateway = await start_gateway()
        first = await gateway.post(URL, json=BODY, headers=AUTH)
        assert first.status == 200
        audit_dir = tmp_path / "audit"
        moved = tmp_path / "audit-moved"
        os.rename(audit_dir, moved)
        audit_dir.write_text("not a directory")
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        await expect_error(resp, 503, "audit_unavailable")
        assert len(sandbox.calls) == 1  # only the first request went upstream
        rid = request_id(first)
        AuditTrail(moved / "deactivations.jsonl").expect(
            requested(rid), completed(rid, outcome="success", status=200, upstream_status=200,
                                      attempts=1))


    async def test_a_result_the_disk_refused_is_written_once_it_can_write(
            self, tmp_path: Path, start_gateway: Any, sandbox: Any) -> None:
        """The call reached Kore.ai, then the disk refused its terminal record: the caller gets
        503, and the record of that answer is kept and written when the log can write again
        (not left open until a restart)."""
        gateway = await start_gateway()
        set_faults(sandbox, latency_ms=400)
        log_file = tmp_path / "audit" / "deactivations.jsonl"
        saved = tmp_path / "saved.jsonl"
        call = asyncio.ensure_future(gateway.post(URL, json=BODY, headers=AUTH))
        await wait_for_calls(sandbox, 1)  # the requested record is durable, the PUT is out
        os.rename(log_file, saved)
        log_file.symlink_to("/dev/full")  # every write: ENOSPC
        rid = (await expect_error(await call, 503, "audit_unavailable"))["requestId"]
        assert [r["event"] for r in AuditTrail(saved).records()] == ["deactivate.requested"]
        log_file.unlink()
        os.rename(saved, log_file)
        deadline = time.monotonic() + 5
        while len(AuditTrail(log_file).records()) < 2:  # a readiness probe writes what was kept
            assert time.monotonic() < deadline, AuditTrail(log_file).records()
            assert (await gateway.get("/readyz")).status in (200, 503)
            await asyncio.sleep(0.05)
        AuditTrail(log_file).expect(
            requested(rid), completed(rid, outcome="failed", status=503, upstream_status=200,
                                      attempts=1, error="audit_unavailable"))
        assert (await gateway.get("/readyz")).status == 200

class TestOverloaded:
    async def test_beyond_max_in_flight_is_overloaded(self, start_gateway: Any, sandbox: Any,
                                                      audit: AuditTrail) -> None:
        gateway = await start_gateway(server={"max_in_flight": 1})
        set_faults(sandbox, latency_ms=500)
        first = asyncio.ensure_future(gateway.post(URL, json=BODY, headers=AUTH))
        await wait_for_calls(sandbox, 1)
        resp = await gateway.post(URL, json=BODY, headers=AUTH)
        shed = (await expect_error(resp, 503, "overloaded"))["requestId"]
        retry_after(resp)
        served = await first
        assert served.status == 200
        rid = request_id(served)
        expect_calls(sandbox, 1, rid)
        audit.expect(requested(rid),
                     denied(shed, outcome="failed", status=503, error="overloaded", botId=BOT),
                     completed(rid, outcome="success", status=200, upstream_status=200,
                               attempts=1))

    @pytest.mark.parametrize("method, path, body, route", [
        pytest.param("POST", URL, BODY, None, id="simplified"),
        pytest.param("PUT", f"/api/public/bot/{BOT}/session", BODY, ROUTE_KORE, id="kore"),
        pytest.param("POST", "/v1/sessions/deactivate",
                     {"items": [{"botId": BOT, "userId": "u-1"}]}, ROUTE_BATCH, id="batch"),
    ])
    async def test_draining_is_overloaded(self, gateway: Any, sandbox: Any, audit: AuditTrail,
                                          method: str, path: str, body: Any,
                                          route: str | None) -> None:
        gateway.app[RUNTIME].draining = True
        resp = await gateway.request(method, path, json=body, headers=AUTH)
        shed = (await expect_error(resp, 503, "overloaded"))["requestId"]
        retry_after(resp)
        assert sandbox.calls == []
        extra = {"route": route} if route else {}
        audit.expect(denied(shed, outcome="failed", status=503, error="overloaded", **extra))
