"""The inbound API over real HTTP: caller authentication, request IDs and every input rule,
each checked on the caller's response, at the sandbox and in the audit log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from gateway.config.loader import load_config
from tests.conftest import (
    BOT,
    CALLER_KEY,
    CLIENT_ID,
    CLIENT_SECRET,
    OTHER_KEY,
    base_settings,
    write_config,
)
from tests.integration.sides import (
    ROUTE_KORE,
    ROUTE_SIMPLE,
    AuditTrail,
    completed,
    denied,
    expect_error,
    expect_upstream_call,
    raw_http,
    request_id,
    requested,
)

URL = f"/v1/bots/{BOT}/sessions/deactivate"
AUTH = {"Authorization": f"Bearer {CALLER_KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
ANY_BOT_ID = r"^.{1,200}$"  # a pattern that lets everything through to the fixed rules


def simple_url(bot_id: str) -> str:
    return f"/v1/bots/{quote(bot_id, safe='')}/sessions/deactivate"


def success(rid: str, **fields: Any) -> list[dict[str, Any]]:
    """The two records of one successful call."""
    return [requested(rid, **fields),
            completed(rid, outcome="success", status=200, upstream_status=200, attempts=1,
                      **fields)]


async def expect_refused(resp: Any, sandbox: Any, audit: AuditTrail, status: int, code: str,
                         *, outcome: str = "rejected", names: str | None = None,
                         **fields: Any) -> dict[str, Any]:
    """A request stopped at the gateway: envelope, nothing upstream, one denied record."""
    error = await expect_error(resp, status, code, names=names)
    assert sandbox.calls == []
    audit.expect(denied(error["requestId"], outcome=outcome, status=status, error=code,
                        **fields))
    return error


class TestCallerAuthentication:
    @pytest.mark.parametrize("headers", [
        pytest.param({}, id="missing"),
        pytest.param({"Authorization": "Bearer kgw_unknown_key"}, id="unknown-key"),
        pytest.param({"Authorization": "Bearer "}, id="empty-key"),
        pytest.param({"Authorization": "Bearer"}, id="scheme-only"),
        pytest.param({"Authorization": f"Basic {CALLER_KEY}"}, id="basic-scheme"),
        pytest.param({"Authorization": CALLER_KEY}, id="no-scheme"),
        pytest.param({"Authorization": f"Bearer {CALLER_KEY}x"}, id="key-with-suffix"),
        pytest.param({"Authorization": f"Bearer {CALLER_KEY} {CALLER_KEY}"}, id="two-keys"),
        pytest.param({"auth": CALLER_KEY}, id="key-in-kore-auth-header"),
        pytest.param({"X-API-Key": CALLER_KEY}, id="key-in-other-header"),
    ])
    async def test_request_without_a_valid_key_is_unauthenticated(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, headers: dict[str, str]) -> None:
        resp = await gateway.post(URL, json={"userId": "u-1"}, headers=headers)
        await expect_refused(resp, sandbox, audit, 401, "unauthenticated", outcome="denied",
                             caller=None, botId=BOT)

    async def test_non_ascii_authorization_is_unauthenticated(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        body = b'{"userId":"u-1"}'
        resp = await raw_http(gateway.server.port, "POST", URL,
                              {"Authorization": "Bearer kl\u00fcssel",
                               "Content-Type": "application/json"}, body)
        await expect_refused(resp, sandbox, audit, 401, "unauthenticated", outcome="denied")

    async def test_bearer_scheme_is_case_insensitive(self, gateway: Any, sandbox: Any) -> None:
        resp = await gateway.post(URL, json={"userId": "u-1"},
                                  headers={"Authorization": f"bearer {CALLER_KEY}"})
        assert resp.status == 200, await resp.text()
        assert len(sandbox.calls) == 1

    async def test_bot_outside_callers_globs_is_forbidden(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        resp = await gateway.post(URL, json={"userId": "u-1"},
                                  headers={"Authorization": f"Bearer {OTHER_KEY}"})
        await expect_refused(resp, sandbox, audit, 403, "forbidden", outcome="denied",
                             caller="narrow-service", botId=BOT)

    async def test_bot_inside_callers_globs_is_allowed(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        resp = await gateway.post("/v1/bots/st-own-1/sessions/deactivate",
                                  json={"userId": "u-1"},
                                  headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id="st-own-1", user_id="u-1", request_id=rid)
        audit.expect(*success(rid, caller="narrow-service", botId="st-own-1"))

    async def test_bot_without_an_app_is_not_configured_and_named(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        gateway = await start_gateway(apps=[{"name": "sessions", "client_id": CLIENT_ID,
                                             "client_secret": CLIENT_SECRET,
                                             "bots": ["st-a*"]}])
        refused = await gateway.post("/v1/bots/st-b-1/sessions/deactivate",
                                     json={"userId": "u-1"}, headers=AUTH)
        error = await expect_error(refused, 403, "bot_not_configured", names="st-b-1")
        assert sandbox.calls == []
        served = await gateway.post("/v1/bots/st-a-1/sessions/deactivate",
                                    json={"userId": "u-1"}, headers=AUTH)
        assert served.status == 200, await served.text()
        rid = request_id(served)
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id="st-a-1", user_id="u-1", request_id=rid)
        audit.expect(denied(error["requestId"], outcome="denied", status=403,
                            error="bot_not_configured", caller="crm-service", botId="st-b-1"),
                     *success(rid, botId="st-a-1"))


class TestAuthNone:
    """`server.auth = "none"` on loopback: no key needed, the caller is "local"."""

    @pytest.fixture
    async def local_gateway(self, tmp_path: Path, sandbox: Any, gateway_for: Any) -> Any:
        settings = base_settings(tmp_path, sandbox.url)
        settings["server"]["auth"] = "none"
        del settings["callers"]  # may be omitted with auth = "none"
        return await gateway_for(load_config(write_config(tmp_path, settings)))

    async def test_request_without_key_is_served_as_local(
            self, local_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        resp = await local_gateway.post(URL, json={"userId": "u-1", "channel": "rtm"})
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=BOT, user_id="u-1", channel="rtm", request_id=rid)
        audit.expect(*success(rid, caller="local", botId=BOT, userId="u-1", channel="rtm"))

    async def test_callers_own_credentials_are_not_forwarded(
            self, local_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        resp = await local_gateway.put(f"/api/public/bot/{BOT}/session",
                                       json={"userId": "u-1", "status": "inactive"},
                                       headers={"Authorization": "Bearer anything",
                                                "auth": "callers-own-jwt",
                                                "Cookie": "session=abc"})
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"success": True}
        rid = request_id(resp)
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=BOT, user_id="u-1", request_id=rid)
        audit.expect(*[{**r, "route": ROUTE_KORE} for r in success(rid, caller="local")])


class TestRequestIds:
    @pytest.mark.parametrize("given", [
        pytest.param("r-1", id="short"),
        pytest.param("A.b_c:d-e", id="every-allowed-punctuation"),
        pytest.param("7", id="one-char"),
        pytest.param("x" * 128, id="128-chars"),
    ])
    async def test_valid_id_is_kept_end_to_end(self, gateway: Any, sandbox: Any,
                                               audit: AuditTrail, given: str) -> None:
        resp = await gateway.post(URL, json={"userId": "u-1"},
                                  headers={**AUTH, "X-Request-ID": given})
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Request-ID"] == given
        assert (await resp.json())["requestId"] == given
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=BOT, user_id="u-1", request_id=given)
        audit.expect(*success(given))

    @pytest.mark.parametrize("given", [
        pytest.param("x" * 129, id="129-chars"),
        pytest.param("x" * 4000, id="4000-chars"),
        pytest.param("has space", id="space"),
        pytest.param("slash/es", id="slash"),
        pytest.param("semi;colon", id="semicolon"),
        pytest.param("quote\"d", id="quote"),
        pytest.param("per%cent", id="percent"),
        pytest.param("caf\u00e9", id="non-ascii"),
    ])
    async def test_invalid_id_is_replaced_end_to_end(self, gateway: Any, sandbox: Any,
                                                     audit: AuditTrail, given: str) -> None:
        resp = await raw_http(gateway.server.port, "POST", URL,
                              {**JSON_AUTH, "X-Request-ID": given}, b'{"userId":"u-1"}')
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        assert rid != given
        assert json.loads(await resp.text())["requestId"] == rid
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=BOT, user_id="u-1", request_id=rid)
        audit.expect(*success(rid))

    async def test_missing_id_is_generated_fresh_each_time(self, gateway: Any,
                                                           audit: AuditTrail) -> None:
        first = await gateway.post(URL, json={"userId": "u-1"}, headers=AUTH)
        second = await gateway.post(URL, json={"userId": "u-1"}, headers=AUTH)
        assert first.status == second.status == 200
        assert request_id(first) != request_id(second)
        audit.expect(*success(request_id(first)), *success(request_id(second)))

    @pytest.mark.parametrize("method, path", [
        pytest.param("GET", "/healthz", id="healthz"),
        pytest.param("GET", "/readyz", id="readyz"),
        pytest.param("GET", "/metrics", id="metrics"),
        pytest.param("GET", "/openapi.json", id="openapi"),
        pytest.param("GET", "/nope", id="not-found"),
        pytest.param("DELETE", URL, id="method-not-allowed"),
    ])
    async def test_every_response_carries_the_id(self, gateway: Any, method: str,
                                                 path: str) -> None:
        kept = await gateway.request(method, path, headers={"X-Request-ID": "any-1"})
        assert kept.headers["X-Request-ID"] == "any-1"
        fresh = await gateway.request(method, path)
        request_id(fresh)

    async def test_empty_id_is_replaced(self, gateway: Any, sandbox: Any) -> None:
        resp = await raw_http(gateway.server.port, "POST", URL,
                              {**JSON_AUTH, "X-Request-ID": ""}, b'{"userId":"u-1"}')
        assert resp.status == 200
        rid = request_id(resp)
        assert sandbox.calls[0].headers["x-request-id"] == rid

    async def test_error_response_carries_the_given_id(self, gateway: Any, sandbox: Any,
                                                       audit: AuditTrail) -> None:
        resp = await gateway.post(URL, json={"userId": "u-1"}, headers={"X-Request-ID": "e-1"})
        error = await expect_refused(resp, sandbox, audit, 401, "unauthenticated",
                                     outcome="denied")
        assert error["requestId"] == "e-1"


class TestBotIdRules:
    @pytest.mark.parametrize("bot_id", [
        pytest.param("st-bad_bot", id="underscore"),
        pytest.param("st-", id="empty-suffix"),
        pytest.param("xx-abc", id="wrong-prefix"),
        pytest.param("ST-abc", id="upper-case-prefix"),
        pytest.param("st-" + "a" * 101, id="101-char-suffix"),
        pytest.param("st-a.b", id="dot"),
        pytest.param("st-a b", id="space"),
        pytest.param("st-\u00e9", id="non-ascii"),
        pytest.param("st-a/b", id="encoded-slash"),
        pytest.param("st-a\n", id="trailing-newline"),
    ])
    async def test_bot_id_outside_pattern_is_invalid(self, gateway: Any, sandbox: Any,
                                                     audit: AuditTrail, bot_id: str) -> None:
        resp = await raw_http(gateway.server.port, "POST", simple_url(bot_id), JSON_AUTH,
                              b'{"userId":"u-1"}')
        await expect_refused(resp, sandbox, audit, 400, "invalid_request", names="botId",
                             botId=bot_id)

    async def test_longest_bot_id_in_pattern_is_served(self, gateway: Any, sandbox: Any) -> None:
        bot_id = "st-" + "a" * 100
        resp = await gateway.post(simple_url(bot_id), json={"userId": "u-1"}, headers=AUTH)
        assert resp.status == 200, await resp.text()
        expect_upstream_call(sandbox.calls[0], bot_id=bot_id, user_id="u-1",
                             request_id=request_id(resp))

    @pytest.mark.parametrize("method, template", [
        pytest.param("POST", "/v1/bots/{}/sessions/deactivate", id="simplified"),
        pytest.param("PUT", "/api/public/bot/{}/session", id="kore-compatible"),
    ])
    @pytest.mark.parametrize("segment", [
        pytest.param(".", id="dot"),
        pytest.param("..", id="dot-dot"),
        pytest.param("%2E", id="encoded-dot"),
        pytest.param("%2E%2E", id="encoded-dot-dot"),
        pytest.param("%2e%2e", id="encoded-dot-dot-lower"),
        pytest.param(".%2E", id="half-encoded-dot-dot"),
    ])
    async def test_dot_segments_are_rejected_whatever_the_pattern(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail, method: str,
            template: str, segment: str) -> None:
        gateway = await start_gateway(upstream={"bot_id_pattern": ANY_BOT_ID})
        resp = await raw_http(gateway.server.port, method, template.format(segment),
                              JSON_AUTH, b'{"userId":"u-1"}')
        route = ROUTE_KORE if method == "PUT" else ROUTE_SIMPLE
        await expect_refused(resp, sandbox, audit, 400, "invalid_request", names="botId",
                             route=route)

    @pytest.mark.parametrize("method, template", [
        pytest.param("POST", "/v1/bots/{}/sessions/deactivate", id="simplified"),
        pytest.param("PUT", "/api/public/bot/{}/session", id="kore-compatible"),
    ])
    @pytest.mark.parametrize("bot_id", [
        pytest.param("st-a/b", id="slash"),
        pytest.param("st-a/../../x", id="slash-dot-dot"),
        pytest.param("st-a?x=1", id="question-mark"),
        pytest.param("st-a#frag", id="hash"),
        pytest.param("st-100%", id="percent"),
    ])
    async def test_bot_id_never_adds_an_upstream_path_segment(
            self, start_gateway: Any, sandbox: Any, audit: AuditTrail, method: str,
            template: str, bot_id: str) -> None:
        gateway = await start_gateway(upstream={"bot_id_pattern": ANY_BOT_ID})
        resp = await raw_http(gateway.server.port, method,
                              template.format(quote(bot_id, safe="")), JSON_AUTH,
                              b'{"userId":"u-1"}')
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=bot_id, user_id="u-1", request_id=rid)
        assert call.path.count("/") == "/api/public/bot/{botId}/session".count("/")
        route = ROUTE_KORE if method == "PUT" else ROUTE_SIMPLE
        audit.expect(*[{**r, "route": route} for r in success(rid, botId=bot_id)])


class TestUserIdRules:
    @pytest.mark.parametrize("body", [
        pytest.param({}, id="missing"),
        pytest.param({"userId": ""}, id="empty"),
        pytest.param({"userId": "u" * 257}, id="257-chars"),
        pytest.param({"userId": "\U0001F464" * 257}, id="257-astral-chars"),
        pytest.param({"userId": "a\x00b"}, id="c0-nul"),
        pytest.param({"userId": "a\tb"}, id="c0-tab"),
        pytest.param({"userId": "a\nb"}, id="c0-newline"),
        pytest.param({"userId": "u-1\r"}, id="c0-trailing-cr"),
        pytest.param({"userId": "a\x1fb"}, id="c0-unit-separator"),
        pytest.param({"userId": "a\x7fb"}, id="del"),
        pytest.param({"userId": "a\x80b"}, id="c1-first"),
        pytest.param({"userId": "a\x85b"}, id="c1-next-line"),
        pytest.param({"userId": "a\x9fb"}, id="c1-last"),
        pytest.param({"userId": 123}, id="number"),
        pytest.param({"userId": None}, id="null"),
        pytest.param({"userId": True}, id="boolean"),
        pytest.param({"userId": ["u-1"]}, id="list"),
        pytest.param({"userId": {"id": "u-1"}}, id="object"),
    ])
    async def test_invalid_user_id_is_rejected(self, gateway: Any, sandbox: Any,
                                               audit: AuditTrail, body: dict[str, Any]) -> None:
        resp = await gateway.post(URL, json=body, headers=AUTH)
        await expect_refused(resp, sandbox, audit, 400, "invalid_request", names="userId",
                             caller="crm-service", botId=BOT)

    async def test_lone_surrogate_user_id_is_rejected(self, gateway: Any, sandbox: Any,
                                                      audit: AuditTrail) -> None:
        resp = await gateway.post(URL, data=b'{"userId": "a\\ud800b"}',
                                  headers=JSON_AUTH)
        await expect_refused(resp, sandbox, audit, 400, "invalid_request", names="userId")

    @pytest.mark.parametrize("user_id", [
        pytest.param("u", id="one-char"),
        pytest.param("u" * 256, id="256-chars"),
        pytest.param("\U0001F464" * 256, id="256-astral-chars"),
        pytest.param("\uc720\uc800-\u30e6\u30fc\u30b6\u30fc-\u7528\u6237", id="cjk"),
        pytest.param("j\u00fcrgen m\u00fcller", id="latin-with-space"),
        pytest.param("a\u00a0b\u200bc\u2028d", id="nbsp-zwsp-line-separator"),
        pytest.param("quote\"back\\slash", id="json-escapes"),
    ])
    async def test_valid_user_id_reaches_kore_unchanged(self, gateway: Any, sandbox: Any,
                                                        audit: AuditTrail, user_id: str) -> None:
        resp = await gateway.post(URL, json={"userId": user_id}, headers=AUTH)
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        assert await resp.json() == {"success": True, "botId": BOT, "userId": user_id,
                                     "channel": None, "requestId": rid}
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=BOT, user_id=user_id, request_id=rid)
        audit.expect(*success(rid, userId=user_id))


class TestChannelRules:
    @pytest.mark.parametrize("channel", [
        pytest.param("rtm", id="rtm"),
        pytest.param("a", id="one-char"),
        pytest.param("msteams_1", id="underscore-digit"),
        pytest.param("c" * 64, id="64-chars"),
        pytest.param("ivrVoice", id="camel-case"),
        pytest.param("RTM", id="upper-case"),
        pytest.param("web-sdk", id="hyphen"),
        pytest.param("ivrInst-6ad846f2-75b0-55a1-8029-aab86de09817", id="webhook-instance"),
    ])
    async def test_valid_channel_is_sent_upstream(self, gateway: Any, sandbox: Any,
                                                  audit: AuditTrail, channel: str) -> None:
        resp = await gateway.post(URL, json={"userId": "u-1", "channel": channel},
                                  headers=AUTH)
        assert resp.status == 200, await resp.text()
        rid = request_id(resp)
        assert (await resp.json())["channel"] == channel
        [call] = sandbox.calls
        expect_upstream_call(call, bot_id=BOT, user_id="u-1", channel=channel, request_id=rid)
        audit.expect(*success(rid, channel=channel))

    async def test_channel_is_omitted_upstream_when_not_given(
            self, gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        resp = await gateway.post(URL, json={"userId": "u-1"}, headers=AUTH)
        assert resp.status == 200
        assert (await resp.json())["channel"] is None
        [call] = sandbox.calls
        assert "channel" not in call.body
        audit.expect(*success(request_id(resp), channel=None))

    @pytest.mark.parametrize("channel", [
        pytest.param("", id="empty"),
        pytest.param("c" * 65, id="65-chars"),
        pytest.param("ivr.voice", id="dot"),
        pytest.param("ivr/voice", id="slash"),
        pytest.param("ch an", id="space"),
        pytest.param("\u00e7", id="non-ascii"),
        pytest.param("rtm\n", id="trailing-newline"),
        pytest.param(5, id="number"),
        pytest.param(["rtm"], id="list"),
        pytest.param(True, id="boolean"),
    ])
    async def test_invalid_channel_is_rejected(self, gateway: Any, sandbox: Any,
                                               audit: AuditTrail, channel: Any) -> None:
        resp = await gateway.post(URL, json={"userId": "u-1", "channel": channel},
                                  headers=AUTH)
        await expect_refused(resp, sandbox, audit, 400, "invalid_request", names="channel")


class TestUnknownFields:
    @pytest.mark.parametrize("body, field", [
        pytest.param({"userId": "u-1", "foo": 1}, "foo", id="foo"),
        pytest.param({"userId": "u-1", "status": "inactive"}, "status",
                     id="kore-status-on-simplified-route"),
        pytest.param({"userId": "u-1", "botId": BOT}, "botId", id="botId-in-body"),
        pytest.param({"userId": "u-1", "UserId": "u-2"}, "UserId", id="case-variant"),
        pytest.param({"userId": "u-1", "channel": "rtm", "extra": None}, "extra",
                     id="null-valued"),
    ])
    async def test_unknown_field_is_rejected_by_name(self, gateway: Any, sandbox: Any,
                                                     audit: AuditTrail, body: dict[str, Any],
                                                     field: str) -> None:
        resp = await gateway.post(URL, json=body, headers=AUTH)
        await expect_refused(resp, sandbox, audit, 400, "invalid_request", names=field)


def padded(size: int) -> bytes:
    """A valid body of exactly `size` bytes (JSON allows trailing whitespace)."""
    body = b'{"userId":"u-1"}'
    return body + b" " * (size - len(body))


async def chunks_of(data: bytes, size: int = 256) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


class TestBodySize:
    LIMIT = 1024

    @pytest.fixture
    async def small_gateway(self, start_gateway: Any) -> Any:
        return await start_gateway(server={"max_body_bytes": self.LIMIT})

    async def test_body_over_max_is_payload_too_large(self, small_gateway: Any, sandbox: Any,
                                                      audit: AuditTrail) -> None:
        resp = await small_gateway.post(URL, data=padded(self.LIMIT + 1), headers=JSON_AUTH)
        await expect_refused(resp, sandbox, audit, 413, "payload_too_large")

    async def test_body_of_exactly_max_is_served(self, small_gateway: Any, sandbox: Any,
                                                 audit: AuditTrail) -> None:
        resp = await small_gateway.post(URL, data=padded(self.LIMIT), headers=JSON_AUTH)
        assert resp.status == 200, await resp.text()
        expect_upstream_call(sandbox.calls[0], bot_id=BOT, user_id="u-1",
                             request_id=request_id(resp))
        audit.expect(*success(request_id(resp)))

    async def test_chunked_body_over_max_is_payload_too_large(
            self, small_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
        resp = await small_gateway.post(URL, data=chunks_of(padded(self.LIMIT * 4)),
                                        headers=JSON_AUTH)
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in resp.request_info.headers
        await expect_refused(resp, sandbox, audit, 413, "payload_too_large")

    async def test_chunked_body_under_max_is_served(self, small_gateway: Any, sandbox: Any,
                                                    audit: AuditTrail) -> None:
        resp = await small_gateway.post(URL, data=chunks_of(padded(self.LIMIT), 100),
                                        headers=JSON_AUTH)
        assert resp.status == 200, await resp.text()
        assert len(sandbox.calls) == 1
        audit.expect(*success(request_id(resp)))

    async def test_default_limit_is_64_kib(self, gateway: Any, sandbox: Any,
                                           audit: AuditTrail) -> None:
        resp = await gateway.post(URL, data=padded(65536 + 1), headers=JSON_AUTH)
        await expect_refused(resp, sandbox, audit, 413, "payload_too_large")


class TestBodyFormat:
    @pytest.mark.parametrize("raw", [
        pytest.param(b"not json", id="text"),
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated-object"),
        pytest.param(b'{"userId": "u-1"', id="unclosed"),
        pytest.param(b'{"userId": "u-1",}', id="trailing-comma"),
        pytest.param(b"{'userId': 'u-1'}", id="single-quotes"),
        pytest.param(b'{"userId": "\xff\xfe"}', id="invalid-utf8"),
        pytest.param(b'{"userId": NaN}', id="nan"),
        pytest.param(b'{"userId": Infinity}', id="infinity"),
        pytest.param(b'{"userId": "u-1"} {"userId": "u-2"}', id="two-documents"),
        pytest.param(b'[{"userId": "u-1"}]', id="array"),
        pytest.param(b'"u-1"', id="string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="deep-nesting"),
        pytest.param(b'{"userId": ' + b"9" * 5000 + b"}", id="huge-integer"),
    ])
    async def test_body_that_is_not_a_json_object_is_invalid(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, raw: bytes) -> None:
        resp = await gateway.post(URL, data=raw, headers=JSON_AUTH)
        await expect_refused(resp, sandbox, audit, 400, "invalid_request")

    @pytest.mark.parametrize("content_type", [
        pytest.param(None, id="missing"),
        pytest.param("text/plain", id="text-plain"),
        pytest.param("application/x-www-form-urlencoded", id="form"),
        pytest.param("multipart/form-data; boundary=x", id="multipart"),
        pytest.param("application/jsonx", id="json-prefix"),
        pytest.param("application/json; charset=latin-1", id="json-not-utf8"),
    ])
    async def test_missing_or_wrong_content_type_is_unsupported(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, content_type: str | None
            ) -> None:
        headers = dict(AUTH) if content_type is None else {**AUTH, "Content-Type": content_type}
        resp = await raw_http(gateway.server.port, "POST", URL, headers, b'{"userId":"u-1"}')
        await expect_refused(resp, sandbox, audit, 415, "unsupported_media_type")

    @pytest.mark.parametrize("content_type", [
        pytest.param("application/json; charset=utf-8", id="utf8-charset"),
        pytest.param("application/json; charset=UTF-8", id="utf8-charset-upper"),
        pytest.param("Application/JSON", id="mixed-case"),
    ])
    async def test_json_content_type_variants_are_served(
            self, gateway: Any, sandbox: Any, audit: AuditTrail, content_type: str) -> None:
        resp = await raw_http(gateway.server.port, "POST", URL,
                              {**AUTH, "Content-Type": content_type}, b'{"userId":"u-1"}')
        assert resp.status == 200, await resp.text()
        assert len(sandbox.calls) == 1
        audit.expect(*success(request_id(resp)))


class TestRoutesAndMethods:
    @pytest.mark.parametrize("method, path", [
        pytest.param("GET", "/", id="root"),
        pytest.param("GET", "/nope", id="unknown"),
        pytest.param("POST", "/v1/bots/st-x/sessions", id="missing-deactivate"),
        pytest.param("POST", "/v1/bots/st-x/sessions/deactivate/more", id="extra-segment"),
        pytest.param("PUT", "/api/public/st-x/sessions", id="kore-sample-curl-path"),
        pytest.param("POST", "/v1/bots//sessions/deactivate", id="empty-bot-segment"),
    ])
    async def test_unknown_route_is_404_envelope(self, gateway: Any, sandbox: Any,
                                                 audit: AuditTrail, method: str,
                                                 path: str) -> None:
        resp = await raw_http(gateway.server.port, method, path, JSON_AUTH,
                              b'{"userId":"u-1"}')
        await expect_error(resp, 404, "not_found")
        assert sandbox.calls == []
        assert audit.expect_chain() == []

    @pytest.mark.parametrize("method, path", [
        pytest.param("GET", URL, id="get-simplified"),
        pytest.param("PUT", URL, id="put-simplified"),
        pytest.param("DELETE", URL, id="delete-simplified"),
        pytest.param("GET", "/v1/sessions/deactivate", id="get-batch"),
        pytest.param("PATCH", "/v1/sessions/deactivate", id="patch-batch"),
        pytest.param("POST", f"/api/public/bot/{BOT}/session", id="post-kore"),
        pytest.param("GET", f"/api/public/bot/{BOT}/session", id="get-kore"),
        pytest.param("POST", "/healthz", id="post-healthz"),
    ])
    async def test_wrong_method_is_405_envelope(self, gateway: Any, sandbox: Any,
                                                audit: AuditTrail, method: str,
                                                path: str) -> None:
        resp = await raw_http(gateway.server.port, method, path, JSON_AUTH,
                              b'{"userId":"u-1"}')
        await expect_error(resp, 405, "method_not_allowed")
        assert resp.headers.get("Allow")
        assert sandbox.calls == []
        assert all(r["event"] == "deactivate.denied" for r in audit.expect_chain())

    async def test_unknown_method_is_refused_without_a_500(self, gateway: Any, sandbox: Any,
                                                           audit: AuditTrail) -> None:
        """The HTTP library refuses an unregistered method itself, with its own plain 400."""
        resp = await raw_http(gateway.server.port, "FOO", URL, JSON_AUTH, b'{"userId":"u-1"}')
        assert resp.status in (400, 405, 501)
        assert "Traceback" not in await resp.text()
        assert sandbox.calls == []
        assert audit.expect_chain() == []
