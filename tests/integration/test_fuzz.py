"""Hypothesis drives raw HTTP at every route of the real gateway (as `serve` builds it): no
answer is a 5xx other than the contract's 502/503/504, every JSON error is the envelope, and
afterwards the audit chain verifies with exactly one terminal record per request."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from typing import Any
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.audit.keyless import SUPPRESSED_EVENT
from tests.conftest import BOT, CALLER_KEY, OTHER_KEY
from tests.integration.live import Live, live_gateway, send_raw

MAX_EXAMPLES = 250
TERMINAL = {"deactivate.completed", "deactivate.denied"}
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

bot_ids = st.one_of(st.just(BOT), st.just("st-own-1"), st.sampled_from([".", "..", "%2E%2E"]),
                    st.text(max_size=12).map(lambda t: quote(t, safe="")),
                    st.binary(min_size=1, max_size=8).map(lambda b: quote(b, safe="")))
paths = st.one_of(
    bot_ids.map(lambda b: f"/v1/bots/{b}/sessions/deactivate"),
    bot_ids.map(lambda b: f"/api/public/bot/{b}/session"),
    st.sampled_from(["/v1/sessions/deactivate", "/healthz", "/readyz", "/metrics",
                     "/openapi.json", "/", "/v1/bots//sessions/deactivate", "/v1/bots",
                     "/api/public/bot/%2F/session", "/v1/sessions/deactivate/"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(
        lambda t: "/" + quote(t, safe="/?=&%")),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
user_ids = st.one_of(st.just("u-1"), st.text(max_size=300), st.integers(), st.none())
kore_channels = st.sampled_from(["rtm", "ivrVoice", "msteams", "web-sdk",
                                 "ivrInst-6ad846f2-75b0-55a1-8029-aab86de09817"])
single_bodies = st.fixed_dictionaries(
    {"userId": user_ids},
    optional={"channel": st.one_of(kore_channels, st.text(max_size=70), st.integers()),
              "status": st.sampled_from(["inactive", "active", ""]),
              "extra": json_values})
batch_bodies = st.fixed_dictionaries({"items": st.lists(
    st.fixed_dictionaries({"botId": st.one_of(st.just(BOT), st.text(max_size=10)),
                           "userId": user_ids},
                          optional={"channel": kore_channels}) | json_values,
    max_size=5)}, optional={"more": json_values})
bodies = st.one_of(
    single_bodies.map(lambda b: json.dumps(b).encode()),
    batch_bodies.map(lambda b: json.dumps(b).encode()),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "replace")),
    st.binary(max_size=200),
    st.none(),
)
authorizations = st.one_of(st.none(), st.sampled_from([
    f"Bearer {CALLER_KEY}", f"Bearer {CALLER_KEY}", f"Bearer {OTHER_KEY}", "Bearer nope",
    f"bearer {CALLER_KEY}", "Basic dXNlcjpwYXNz", "Bearer", ""]),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40))
content_types = st.one_of(st.none(), st.sampled_from([
    "application/json", "application/json; charset=utf-8", "application/json; charset=latin-1",
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
    "application/json; charset=\"utf-8\"", "*/*", ""]))
header_names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789"),
                       min_size=1, max_size=12).filter(
    lambda n: n.lower() not in ("content-length", "transfer-encoding", "host", "connection",
                                "expect", "upgrade", "content-encoding"))
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


ROUTES = [("POST", "/v1/bots/{}/sessions/deactivate"), ("PUT", "/api/public/bot/{}/session"),
          ("POST", "/v1/sessions/deactivate")]


@st.composite
def well_formed(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]], bytes | None, bool]:
    """A deactivation request that is right but for what the strategies below vary."""
    method, template = draw(st.sampled_from(ROUTES))
    headers = [("Authorization", draw(st.sampled_from([f"Bearer {CALLER_KEY}"] * 3
                                                      + [f"Bearer {OTHER_KEY}"]))),
               ("Content-Type", draw(st.sampled_from(["application/json"] * 3
                                                     + ["application/json; charset=utf-8"])))]
    batch = template.endswith("/v1/sessions/deactivate")
    body = draw(batch_bodies if batch else single_bodies)
    return method, template.format(draw(bot_ids)), headers, json.dumps(body).encode(), \
        draw(st.booleans())


@st.composite
def anything(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]], bytes | None, bool]:
    method = draw(st.sampled_from(["POST", "POST", "PUT", "GET", "DELETE", "PATCH", "HEAD",
                                   "OPTIONS"]))
    headers: list[tuple[str, str]] = []
    for name, value in (("Authorization", draw(authorizations)),
                        ("Content-Type", draw(content_types))):
        if value is not None:
            headers.append((name, value))
    headers += draw(st.lists(st.tuples(header_names, header_values), max_size=4))
    return method, draw(paths), headers, draw(bodies), draw(st.booleans())


requests = st.one_of(well_formed(), well_formed(), anything())
request_ids = st.one_of(st.none(), header_values)


def unique_id(given: str | None, n: int) -> str | None:
    """Every request its own ID, valid or not, so the audit can be checked per request."""
    if given is None:
        return None
    return f"fz{n}-{given}"[:128] if REQUEST_ID.fullmatch(given) else f"{given}\x01{n}"


def encode(method: str, target: str, headers: list[tuple[str, str]], body: bytes | None,
           chunked: bool, rid: str | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if rid is not None:
        lines.append(f"X-Request-ID: {rid}")
    payload = b""
    if body is not None and chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                           for part in (body[:7], body[7:]) if part) + b"0\r\n\r\n"
    elif body is not None:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def check_answer(live: Live, method: str, status: int, head: str, body: bytes) -> None:
    assert status != 0, "the connection closed without an answer"
    assert status < 500 or status in (502, 503, 504), (status, body)
    assert b"Traceback" not in body
    if status >= 400 and method != "HEAD" and "application/json" in head.lower():
        error = json.loads(body)["error"]
        assert set(error) == {"code", "message", "requestId"}, error
        assert error["code"] != "internal_error"


def check_audit(live: Live) -> int:
    """Chain intact; per request ID one terminal record, and requested only before completed.
    (Keyless denials past `audit.max_unauthenticated_per_s` in a second are counted in a summary
    record, which has no request ID.)"""
    by_request: dict[str, list[str]] = defaultdict(list)
    for record in live.audit.expect_chain():
        if record["event"] == SUPPRESSED_EVENT:
            assert record["count"] > 0 and "requestId" not in record, record
            continue
        by_request[record["requestId"]].append(record["event"])
    for rid, events in by_request.items():
        assert sum(e in TERMINAL for e in events) == 1, (rid, events)
        if "deactivate.requested" in events:
            assert events == ["deactivate.requested", "deactivate.completed"], (rid, events)
    return len(by_request)


def test_no_request_gets_a_5xx_or_breaks_the_audit(make_config: Any) -> None:
    with live_gateway(make_config) as live:
        sent: Counter[str] = Counter()

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(request=requests, rid=request_ids)
        def fuzz(request: tuple[str, str, list[tuple[str, str]], bytes | None, bool],
                 rid: str | None) -> None:
            method, target, headers, body, chunked = request
            sent["requests"] += 1
            answer = send_raw(live.port, encode(method, target, headers, body, chunked,
                                                unique_id(rid, sent["requests"])))
            check_answer(live, method, answer.status, answer.head, answer.body)
            sent[str(answer.status)] += 1

        fuzz()
        assert sent["200"] and sent["400"] and sent["401"] and sent["404"], sent
        assert check_audit(live) > 0
        assert live.sandbox.calls, "nothing reached Kore.ai: the routes were not exercised"
