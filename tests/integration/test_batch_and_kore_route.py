"""The batch route and the Kore-compatible route over real HTTP: per-item results, item request
IDs and audit records; Kore.ai's own body and errors passed through, the caller's `auth` dropped."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest

from tests.conftest import BOT, CALLER_KEY, CLIENT_ID, CLIENT_SECRET, OTHER_KEY
from tests.integration.sides import (
    ROUTE_BATCH,
    ROUTE_KORE,
    AuditTrail,
    completed,
    denied,
    expect_error,
    expect_upstream_call,
    raw_http,
    request_id,
    requested,
    retry_after,
    set_faults,
)

BATCH = "/v1/sessions/deactivate"
KORE = f"/api/public/bot/{BOT}/session"
AUTH = {"Authorization": f"Bearer {CALLER_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}
RESULT_KEYS = {"index", "botId", "userId", "status", "success"}


def ok_item(rid: str, route: str = ROUTE_BATCH, **fields: Any) -> list[dict[str, Any]]:
    """The two records of one item (or request) that succeeded."""
    return [requested(rid, route=route, **fields),
            completed(rid, outcome="success", status=200, upstream_status=200, attempts=1,
                      route=route, **fields)]


def expect_result(result: dict[str, Any], index: int, status: int, code: str | None = None,
                  **fields: Any) -> None:
    """One entry of `results`: `error` is the envelope's inner object, only on failure."""
    assert result["index"] == index and result["status"] == status, result
    assert result["success"] is (code is None), result
    if code is None:
        assert set(result) == RESULT_KEYS, result
    else:
        assert set(result) == RESULT_KEYS | {"error"}, result
        assert set(result["error"]) == {"code", "message"}, result
        assert result["error"]["code"] == code and result["error"]["message"], result
    for name, value in fields.items():
        assert result[name] == value, result


def calls_by_request_id(sandbox: Any) -> dict[str, Any]:
    calls = {c.headers["x-request-id"]: c for c in sandbox.calls}
    assert len(calls) == len(sandbox.calls)
    return calls


class TestBatch:
    async def test_every_item_is_deactivated_and_audited_on_its_own(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        items = [{"botId": BOT, "userId": "u-0", "channel": "rtm"},
                 {"botId": "st-other", "userId": "u-1"}]
        resp = await gateway.post(BATCH, json={"items": items},
                                  headers={**AUTH, "X-Request-ID": "batch-1"})
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Request-ID"] == "batch-1"
        body = await resp.json()
        assert set(body) == {"results", "summary"}
        first, second = body["results"]
        expect_result(first, 0, 200, botId=BOT, userId="u-0")
        expect_result(second, 1, 200, botId="st-other", userId="u-1")
        assert body["summary"] == {"succeeded": 2, "failed": 0}
        calls = calls_by_request_id(sandbox)
        assert sorted(calls) == ["batch-1.0", "batch-1.1"]
        expect_upstream_call(calls["batch-1.0"], bot_id=BOT, user_id="u-0", channel="rtm",
                             request_id="batch-1.0")
        expect_upstream_call(calls["batch-1.1"], bot_id="st-other", user_id="u-1",
                             request_id="batch-1.1")
        audit.expect_by_request({  # a well-formed batch is audited through its items only
            "batch-1.0": ok_item("batch-1.0", botId=BOT, userId="u-0", channel="rtm",
                                 caller="crm-service"),
            "batch-1.1": ok_item("batch-1.1", botId="st-other", userId="u-1", channel=None),
        })

    async def test_generated_batch_id_prefixes_item_ids(self, gateway: Any, sandbox: Any,
                                                        audit: AuditTrail) -> None:
        items = [{"botId": BOT, "userId": f"u-{i}"} for i in range(3)]
        resp = await gateway.post(BATCH, json={"items": items}, headers=AUTH)
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        item_ids = [f"{rid}.{i}" for i in range(3)]
        assert sorted(calls_by_request_id(sandbox)) == item_ids
        audit.expect_by_request({i: ok_item(i) for i in item_ids})

    async def test_invalid_and_forbidden_items_do_not_fail_the_others(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        items: list[Any] = [
            {"botId": "st-own-a", "userId": "u-0"},
            {"botId": BOT, "userId": "u-1"},                       # outside the caller's globs
            {"botId": "st-own-b", "userId": ""},
            {"botId": "bad bot", "userId": "u-3"},
            {"botId": "st-own-c", "userId": "u-4", "extra": 1},
            "not an object",
            {"botId": "st-own-d", "userId": "u-6", "channel": "Bad channel"},
            {"botId": "..", "userId": "u-7"},
            {"userId": "u-8"},
            {"botId": "st-own-e", "userId": "u-9", "channel": "rtm"},
        ]
        resp = await gateway.post(BATCH, json={"items": items},
                                  headers={**OTHER, "X-Request-ID": "b"})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        results = body["results"]
        assert [r["index"] for r in results] == list(range(len(items)))
        expect_result(results[0], 0, 200, botId="st-own-a", userId="u-0")
        expect_result(results[1], 1, 403, "forbidden", botId=BOT, userId="u-1")
        for index, name in [(2, "userId"), (3, "botId"), (4, "extra"), (5, None),
                            (6, "channel"), (7, "botId"), (8, "botId")]:
            expect_result(results[index], index, 400, "invalid_request")
            if name is not None:
                assert name in results[index]["error"]["message"]
        expect_result(results[9], 9, 200, botId="st-own-e", userId="u-9")
        assert body["summary"] == {"succeeded": 2, "failed": 8}
        calls = calls_by_request_id(sandbox)
        assert sorted(calls) == ["b.0", "b.9"]
        expect_upstream_call(calls["b.9"], bot_id="st-own-e", user_id="u-9", channel="rtm",
                             request_id="b.9")
        rejected = {f"b.{i}": [denied(f"b.{i}", outcome="rejected", status=400,
                                      error="invalid_request", route=ROUTE_BATCH,
                                      caller="narrow-service")]
                    for i in (2, 3, 4, 5, 6, 7, 8)}
        audit.expect_by_request({
            "b.0": ok_item("b.0", caller="narrow-service"),
            "b.1": [denied("b.1", outcome="denied", status=403, error="forbidden",
                           route=ROUTE_BATCH, botId=BOT, userId="u-1")],
            **rejected,
            "b.9": ok_item("b.9", channel="rtm"),
        })

    @pytest.mark.parametrize("rest", [
        pytest.param({"userId": ""}, id="empty-user-id"),
        pytest.param({"userId": "u-1", "extra": 1}, id="unknown-field"),
        pytest.param({"userId": "u-1", "channel": "Bad channel"}, id="bad-channel"),
        pytest.param({}, id="no-user-id"),
    ])
    async def test_an_item_gets_the_status_it_would_get_alone(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, rest: dict[str, Any]) -> None:
        """A bot outside the caller's globs is a 403 before the rest of the item is read, as
        on the single route, where the botId is in the path."""
        single = await gateway.post(f"/v1/bots/{BOT}/sessions/deactivate", json=rest,
                                    headers={**OTHER, "X-Request-ID": "alone"})
        batch = await gateway.post(BATCH, json={"items": [{"botId": BOT, **rest}]},
                                   headers={**OTHER, "X-Request-ID": "in-batch"})
        assert batch.status == 200, await batch.text()
        [result] = (await batch.json())["results"]
        alone = (await single.json())["error"]["code"]
        assert (result["status"], result["error"]["code"]) == (single.status, alone) == (
            403, "forbidden")
        assert sandbox.calls == []
        records = {r["requestId"]: r for r in audit.records()}
        assert (records["in-batch.0"]["outcome"], records["in-batch.0"]["status"]) == (
            records["alone"]["outcome"], records["alone"]["status"]) == ("denied", 403)

    async def test_item_for_a_bot_without_app_is_not_configured(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(apps=[{"name": "sessions", "client_id": CLIENT_ID,
                                             "client_secret": CLIENT_SECRET,
                                             "bots": ["st-a*"]}])
        items = [{"botId": "st-a-1", "userId": "u-0"}, {"botId": "st-b-1", "userId": "u-1"}]
        resp = await gateway.post(BATCH, json={"items": items},
                                  headers={**AUTH, "X-Request-ID": "nc"})
        assert resp.status == 200, await resp.text()
        first, second = (await resp.json())["results"]
        expect_result(first, 0, 200)
        expect_result(second, 1, 403, "bot_not_configured")
        assert "st-b-1" in second["error"]["message"]
        assert sorted(calls_by_request_id(sandbox)) == ["nc.0"]
        audit.expect_by_request({
            "nc.0": ok_item("nc.0"),
            "nc.1": [denied("nc.1", outcome="denied", status=403, error="bot_not_configured",
                            route=ROUTE_BATCH, botId="st-b-1")],
        })

    async def test_item_upstream_outcomes_are_per_item(
            self, start_gateway: Any, make_sandbox: Any, audit: AuditTrail) -> None:
        kore = await make_sandbox(known_bots=("st-known-*",))
        gateway = await start_gateway(base_url=kore.url)
        items = [{"botId": "st-known-1", "userId": "u-0"},
                 {"botId": "st-unknown-1", "userId": "u-1"}]
        resp = await gateway.post(BATCH, json={"items": items},
                                  headers={**AUTH, "X-Request-ID": "up"})
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        expect_result(body["results"][0], 0, 200)
        expect_result(body["results"][1], 1, 404, "upstream_rejected")
        assert "Bot not found" in body["results"][1]["error"]["message"]
        assert body["summary"] == {"succeeded": 1, "failed": 1}
        calls = calls_by_request_id(kore)
        expect_upstream_call(calls["up.1"], bot_id="st-unknown-1", user_id="u-1",
                             request_id="up.1")
        audit.expect_by_request({
            "up.0": ok_item("up.0"),
            "up.1": [requested("up.1", route=ROUTE_BATCH),
                     completed("up.1", outcome="rejected", status=404, upstream_status=404,
                               attempts=1, error="upstream_rejected", route=ROUTE_BATCH)],
        })

    @pytest.mark.parametrize("raw", [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[]", id="array"),
        pytest.param(b"{}", id="no-items"),
        pytest.param(b'{"items": null}', id="null-items"),
        pytest.param(b'{"items": []}', id="empty-items"),
        pytest.param(b'{"items": "st-x"}', id="string-items"),
        pytest.param(b'{"items": {"botId": "st-x", "userId": "u"}}', id="object-items"),
        pytest.param(b'{"items": [{"botId": "st-x", "userId": "u"}], "extra": 1}',
                     id="unknown-top-level-key"),
    ])
    async def test_malformed_batch_fails_whole_with_one_denied_record(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, raw: bytes) -> None:
        resp = await gateway.post(BATCH, data=raw,
                                  headers={**AUTH, "Content-Type": "application/json"})
        rid = (await expect_error(resp, 400, "invalid_request"))["requestId"]
        assert sandbox.calls == []
        audit.expect(denied(rid, outcome="rejected", status=400, error="invalid_request",
                            route=ROUTE_BATCH, caller="crm-service"))

    async def test_too_many_items_is_payload_too_large(self, start_gateway: Any, sandbox: Any,
                                                       audit: AuditTrail) -> None:
        gateway = await start_gateway(server={"max_batch_items": 2})
        items = [{"botId": BOT, "userId": f"u-{i}"} for i in range(3)]
        resp = await gateway.post(BATCH, json={"items": items}, headers=AUTH)
        rid = (await expect_error(resp, 413, "payload_too_large"))["requestId"]
        assert sandbox.calls == []
        audit.expect(denied(rid, outcome="rejected", status=413, error="payload_too_large",
                            route=ROUTE_BATCH))
        served = await gateway.post(BATCH, json={"items": items[:2]}, headers=AUTH)
        assert served.status == 200 and len(sandbox.calls) == 2

    async def test_default_limit_is_1000_items(self, gateway: Any, sandbox: Any,
                                               audit: AuditTrail) -> None:
        items = [{"botId": BOT, "userId": str(i)} for i in range(1001)]
        resp = await gateway.post(BATCH, json={"items": items}, headers=AUTH)
        rid = (await expect_error(resp, 413, "payload_too_large"))["requestId"]
        assert sandbox.calls == []
        audit.expect(denied(rid, outcome="rejected", status=413, error="payload_too_large",
                            route=ROUTE_BATCH))

    async def test_unauthenticated_batch_has_one_denied_record(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        resp = await gateway.post(BATCH, json={"items": [{"botId": BOT, "userId": "u"}]})
        rid = (await expect_error(resp, 401, "unauthenticated"))["requestId"]
        assert sandbox.calls == []
        audit.expect(denied(rid, outcome="denied", status=401, error="unauthenticated",
                            route=ROUTE_BATCH, caller=None))

    @pytest.mark.parametrize("content_type, status, code", [
        pytest.param(None, 415, "unsupported_media_type", id="no-content-type"),
        pytest.param("text/plain", 415, "unsupported_media_type", id="text-plain"),
    ])
    async def test_batch_with_wrong_content_type_has_one_denied_record(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, content_type: str | None,
            status: int, code: str) -> None:
        headers = dict(AUTH) if content_type is None else {**AUTH, "Content-Type": content_type}
        resp = await raw_http(gateway.server.port, "POST", BATCH, headers,
                              json.dumps({"items": [{"botId": BOT, "userId": "u"}]}).encode())
        rid = (await expect_error(resp, status, code))["requestId"]
        assert sandbox.calls == []
        audit.expect(denied(rid, outcome="rejected", status=status, error=code,
                            route=ROUTE_BATCH))

    async def test_batch_body_over_max_has_one_denied_record(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(server={"max_body_bytes": 1024})
        items = [{"botId": BOT, "userId": "u" * 200} for _ in range(10)]
        resp = await gateway.post(BATCH, json={"items": items}, headers=AUTH)
        rid = (await expect_error(resp, 413, "payload_too_large"))["requestId"]
        assert sandbox.calls == []
        audit.expect(denied(rid, outcome="rejected", status=413, error="payload_too_large",
                            route=ROUTE_BATCH))


REAL_CHANNELS = ["ivrVoice", "ivrInst-6ad846f2-75b0-55a1-8029-aab86de09817", "rtm", "msteams",
                 "twiliovoice", "web-sdk", "emailConnect"]


class TestKoreChannelsReachKoreUnchanged:
    """Kore.ai's own channel spellings (camelCase, hyphens, webhook instance IDs) go through
    every route as given, case kept."""

    async def test_batch_items_keep_their_channel(self, gateway: Any, sandbox: Any,
                                                 audit: AuditTrail) -> None:
        items = [{"botId": BOT, "userId": f"u-{i}", "channel": c}
                 for i, c in enumerate(REAL_CHANNELS)]
        resp = await gateway.post(BATCH, json={"items": items},
                                  headers={**AUTH, "X-Request-ID": "ch"})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["summary"] == {"succeeded": len(items), "failed": 0}
        calls = calls_by_request_id(sandbox)
        for i, channel in enumerate(REAL_CHANNELS):
            expect_upstream_call(calls[f"ch.{i}"], bot_id=BOT, user_id=f"u-{i}",
                                 channel=channel, request_id=f"ch.{i}")
        audit.expect_by_request({f"ch.{i}": ok_item(f"ch.{i}", userId=f"u-{i}", channel=c,
                                                   caller="crm-service")
                                 for i, c in enumerate(REAL_CHANNELS)})

    @pytest.mark.parametrize("channel", REAL_CHANNELS)
    async def test_kore_route_keeps_the_channel(self, gateway: Any, sandbox: Any,
                                                audit: AuditTrail, channel: str) -> None:
        body = {"userId": "u-1", "status": "inactive", "channel": channel}
        resp = await gateway.put(KORE, json=body, headers=AUTH)
        assert resp.status == 200, await resp.text()
        [call] = sandbox.calls
        assert call.body == body  # byte for byte what Kore.ai's own client would have sent
        audit.expect(*ok_item(request_id(resp), route=ROUTE_KORE, botId=BOT, userId="u-1",
                              channel=channel, caller="crm-service"))


class TestKoreCompatibleRoute:
    @pytest.mark.parametrize("body, channel", [
        pytest.param({"userId": "u-1", "status": "inactive", "channel": "rtm"}, "rtm",
                     id="full-kore-body"),
        pytest.param({"userId": "u-1", "status": "inactive"}, None, id="no-channel"),
        pytest.param({"userId": "u-1"}, None, id="no-status"),
    ])
    async def test_success_returns_kores_own_body(self, gateway: Any, sandbox: Any,
                                                  audit: AuditTrail, body: dict[str, Any],
                                                  channel: str | None) -> None:
        resp = await gateway.put(KORE, json=body, headers=AUTH)
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"success": True}
        rid = request_id(resp)
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=BOT, user_id="u-1", channel=channel, request_id=rid)
        audit.expect(*ok_item(rid, route=ROUTE_KORE, botId=BOT, userId="u-1",
                              channel=channel, caller="crm-service"))

    @pytest.mark.parametrize("status", [
        pytest.param("active", id="active"),
        pytest.param("INACTIVE", id="upper-case"),
        pytest.param("", id="empty"),
        pytest.param(None, id="null"),
        pytest.param(0, id="number"),
        pytest.param(False, id="boolean"),
        pytest.param(["inactive"], id="list"),
    ])
    async def test_status_other_than_inactive_is_rejected(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, status: Any) -> None:
        resp = await gateway.put(KORE, json={"userId": "u-1", "status": status}, headers=AUTH)
        rid = (await expect_error(resp, 400, "invalid_request", names="status"))["requestId"]
        assert sandbox.calls == []
        audit.expect(denied(rid, outcome="rejected", status=400, error="invalid_request",
                            route=ROUTE_KORE, botId=BOT))

    async def test_callers_own_auth_header_is_dropped(self, gateway: Any, sandbox: Any,
                                                      audit: AuditTrail) -> None:
        callers_jwt = jwt.encode({"appId": CLIENT_ID, "sub": "someone-else"},
                                 "another-secret-entirely-0123456789", algorithm="HS256")
        resp = await gateway.put(KORE, json={"userId": "u-1", "status": "inactive"},
                                 headers={**AUTH, "auth": callers_jwt, "Cookie": "k=v"})
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        [call] = sandbox.calls
        claims = expect_upstream_call(call, bot_id=BOT, user_id="u-1", request_id=rid)
        assert call.headers["auth"] != callers_jwt and claims["sub"] == "kore-session-gateway"
        assert "cookie" not in call.headers and "authorization" not in call.headers
        audit.expect(*ok_item(rid, route=ROUTE_KORE))

    async def test_kore_404_is_passed_through_with_its_body(
            self, start_gateway: Any, make_sandbox: Any, audit: AuditTrail) -> None:
        kore = await make_sandbox(known_bots=("st-known-*",))
        gateway = await start_gateway(base_url=kore.url)
        resp = await gateway.put("/api/public/bot/st-unknown-1/session",
                                 json={"userId": "u-1", "status": "inactive"}, headers=AUTH)
        assert resp.status == 404
        assert await resp.json() == {"errors": [{"msg": "Bot not found", "code": 404}]}
        rid = request_id(resp)
        [call] = kore.calls
        expect_upstream_call(call, bot_id="st-unknown-1", user_id="u-1", request_id=rid)
        audit.expect(requested(rid, route=ROUTE_KORE),
                     completed(rid, outcome="rejected", status=404, upstream_status=404,
                               attempts=1, error="upstream_rejected", route=ROUTE_KORE))

    async def test_kore_400_is_passed_through_with_its_body(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        set_faults(sandbox, error_rate=1.0, error_status=400)
        resp = await gateway.put(KORE, json={"userId": "u-1"}, headers=AUTH)
        assert resp.status == 400
        assert await resp.json() == {"errors": [{"msg": "Bad Request", "code": 400}]}
        rid = request_id(resp)
        assert len(sandbox.calls) == 1
        audit.expect(requested(rid, route=ROUTE_KORE),
                     completed(rid, outcome="rejected", status=400, upstream_status=400,
                               attempts=1, error="upstream_rejected", route=ROUTE_KORE))

    @pytest.mark.parametrize("faults, status, code, calls", [
        pytest.param({"error_rate": 1.0, "error_status": 503}, 502, "upstream_unavailable", 3,
                     id="5xx"),
        pytest.param({"reject_token_next": 100}, 502, "upstream_auth_failed", 2, id="401"),
        pytest.param({"rate_429": 1.0, "retry_after_s": 0}, 429, "rate_limited", 3, id="429"),
    ])
    async def test_other_upstream_outcomes_use_the_envelope(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, faults: dict[str, Any],
            status: int, code: str, calls: int) -> None:
        set_faults(sandbox, **faults)
        resp = await gateway.put(KORE, json={"userId": "u-1"}, headers=AUTH)
        rid = (await expect_error(resp, status, code))["requestId"]
        if status == 429:
            retry_after(resp)
        assert len(sandbox.calls) == calls
        audit.expect(requested(rid, route=ROUTE_KORE),
                     completed(rid, outcome="failed", status=status,
                               upstream_status=sandbox.calls[-1].status, attempts=calls,
                               error=code, route=ROUTE_KORE))

    @pytest.mark.parametrize("headers, body, status, code, outcome", [
        pytest.param({}, {"userId": "u-1"}, 401, "unauthenticated", "denied", id="no-key"),
        pytest.param({"auth": CALLER_KEY}, {"userId": "u-1"}, 401, "unauthenticated",
                     "denied", id="key-in-kore-auth-header"),
        pytest.param(OTHER, {"userId": "u-1"}, 403, "forbidden", "denied", id="forbidden"),
        pytest.param(AUTH, {"userId": ""}, 400, "invalid_request", "rejected",
                     id="empty-user-id"),
        pytest.param(AUTH, {"userId": "u-1", "extra": 1}, 400, "invalid_request", "rejected",
                     id="unknown-field"),
    ])
    async def test_gateways_own_errors_use_the_envelope(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, headers: dict[str, str],
            body: dict[str, Any], status: int, code: str, outcome: str) -> None:
        resp = await gateway.put(KORE, json=body, headers=headers)
        rid = (await expect_error(resp, status, code))["requestId"]
        assert sandbox.calls == []
        audit.expect(denied(rid, outcome=outcome, status=status, error=code, route=ROUTE_KORE))

    async def test_wrong_content_type_uses_the_envelope(self, gateway: Any, sandbox: Any,
                                                        audit: AuditTrail) -> None:
        resp = await raw_http(gateway.server.port, "PUT", KORE,
                              {**AUTH, "Content-Type": "text/plain"}, b'{"userId":"u-1"}')
        rid = (await expect_error(resp, 415, "unsupported_media_type"))["requestId"]
        assert sandbox.calls == []
        audit.expect(denied(rid, outcome="rejected", status=415,
                            error="unsupported_media_type", route=ROUTE_KORE))
