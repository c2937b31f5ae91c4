"""The three sides an integration test checks: the caller's response, what reached the
sandbox (Kore.ai), and the audit log. Plus a raw HTTP client for requests that an ordinary
client would normalize (percent-encoded dots, a missing Content-Type)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
from multidict import CIMultiDict

from gateway.audit.log import rotated_files, verify_files
from tests.conftest import CALLER_KEY, CLIENT_ID, CLIENT_SECRET, OTHER_KEY, SETTLE_S, read_records

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
# What the HTTP client may set by itself, plus the three headers the contract names.
UPSTREAM_HEADERS = frozenset({"host", "content-length", "user-agent", "accept",
                              "accept-encoding", "auth", "content-type", "x-request-id"})
ROUTE_SIMPLE = "POST /v1/bots/{botId}/sessions/deactivate"
ROUTE_BATCH = "POST /v1/sessions/deactivate"
ROUTE_KORE = "PUT /api/public/bot/{botId}/session"
APP = "sessions"


# --- the caller's side ---------------------------------------------------------------------

async def expect_error(resp: Any, status: int, code: str, *, names: str | None = None
                       ) -> dict[str, Any]:
    """The contract envelope with `status` and `code`; `names` must appear in the message."""
    text = await resp.text()
    assert resp.status == status, text
    assert "Traceback" not in text and 'File "' not in text
    body = json.loads(text)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "requestId"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["requestId"] == resp.headers["X-Request-ID"]
    assert resp.content_type == "application/json"
    if names is not None:
        assert names in error["message"], error
    if status == 401:
        assert resp.headers.get("WWW-Authenticate") == "Bearer"
    return dict(error)


def retry_after(resp: Any) -> int:
    """The Retry-After header as whole seconds (at least 1)."""
    value = int(resp.headers["Retry-After"])
    assert value >= 1
    return value


def request_id(resp: Any) -> str:
    value = resp.headers["X-Request-ID"]
    assert REQUEST_ID.fullmatch(value), value
    return str(value)


# --- what reached Kore.ai -----------------------------------------------------------------

def session_path(bot_id: str) -> str:
    return f"/api/public/bot/{quote(bot_id, safe='')}/session"


def upstream_body(user_id: str, channel: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"userId": user_id, "status": "inactive"}
    if channel is not None:
        body["channel"] = channel
    return body


def expect_upstream_call(call: Any, *, bot_id: str, user_id: str, request_id: str,
                         channel: str | None = None, ttl_s: int = 600) -> dict[str, Any]:
    """One PUT exactly as the contract's section 1 draws it; returns the JWT's claims."""
    assert call.method == "PUT"
    assert call.path == session_path(bot_id)
    assert call.bot_id == bot_id
    assert call.body == upstream_body(user_id, channel)
    headers = call.headers
    assert set(headers) <= UPSTREAM_HEADERS, sorted(set(headers) - UPSTREAM_HEADERS)
    assert headers["content-type"] == "application/json"  # exactly once: repeats are joined
    assert headers["x-request-id"] == request_id
    token = headers["auth"]
    assert "," not in token and token.count(".") == 2  # one JWT, sent once
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(token, CLIENT_SECRET, algorithms=["HS256"])
    assert claims["appId"] == CLIENT_ID and claims["sub"] == "kore-session-gateway"
    assert claims["exp"] - claims["iat"] == ttl_s
    return dict(claims)


# --- the audit log -------------------------------------------------------------------------

def requested(rid: str, route: str = ROUTE_SIMPLE, **fields: Any) -> dict[str, Any]:
    return {"event": "deactivate.requested", "requestId": rid, "route": route, "app": APP,
            **fields}


def completed(rid: str, *, outcome: str, status: int, upstream_status: int | None,
              attempts: int, error: str | None = None, route: str = ROUTE_SIMPLE,
              **fields: Any) -> dict[str, Any]:
    return {"event": "deactivate.completed", "requestId": rid, "route": route, "app": APP,
            "outcome": outcome, "status": status, "upstreamStatus": upstream_status,
            "attempts": attempts, "error": error, **fields}


def denied(rid: str, *, outcome: str, status: int, error: str, route: str = ROUTE_SIMPLE,
           **fields: Any) -> dict[str, Any]:
    return {"event": "deactivate.denied", "requestId": rid, "route": route, "app": None,
            "outcome": outcome, "status": status, "upstreamStatus": None, "attempts": 0,
            "error": error, **fields}


class AuditTrail:
    """The audit file of the gateway under test."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        """Every record, once each call that went upstream has its terminal record (written
        just after the answer, contract §3), or after a few seconds without."""
        records = read_records(self.path, settle_s=SETTLE_S)
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            for secret in (CLIENT_SECRET, CALLER_KEY, OTHER_KEY, "eyJ"):  # eyJ: any JWT
                assert secret not in text
        return records

    def expect(self, *expected: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Records matching `expected` in order (each a subset), chain and seq intact."""
        records = self.expect_chain()
        assert len(records) == len(expected), [(r["event"], r["requestId"]) for r in records]
        for record, want in zip(records, expected, strict=True):
            assert {k: record.get(k, "<missing>") for k in want} == dict(want), record
        return records

    def expect_by_request(self, expected: Mapping[str, Sequence[Mapping[str, Any]]]
                          ) -> list[dict[str, Any]]:
        """Like `expect`, but only the order within each request ID counts (concurrent items)."""
        records = self.expect_chain()
        grouped: dict[str, list[dict[str, Any]]] = {}
        for record in records:
            grouped.setdefault(record["requestId"], []).append(record)
        assert sorted(grouped) == sorted(expected)
        for rid, wants in expected.items():
            got = grouped[rid]
            assert len(got) == len(wants), got
            for record, want in zip(got, wants, strict=True):
                assert {k: record.get(k, "<missing>") for k in want} == dict(want), record
        return records

    def expect_one_terminal_per_request(self) -> dict[str, list[str]]:
        """Each request ID: requested → completed, or denied alone; returns the events."""
        events: dict[str, list[str]] = {}
        for record in self.expect_chain():
            events.setdefault(record["requestId"], []).append(record["event"])
        for rid, seen in events.items():
            assert seen in (["deactivate.requested", "deactivate.completed"],
                            ["deactivate.denied"]), (rid, seen)
        return events

    def expect_chain(self) -> list[dict[str, Any]]:
        records = self.records()
        assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
        assert all(TIMESTAMP.fullmatch(r["ts"]) for r in records)
        if records:
            report = verify_files(rotated_files(self.path))
            assert report.ok, report.error
        return records


# --- raw HTTP ------------------------------------------------------------------------------

@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    async def text(self) -> str:
        return self.body.decode("utf-8")

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip()


async def raw_http(port: int, method: str, target: str,
                   headers: Mapping[str, str] | Sequence[tuple[str, str]], body: bytes = b"",
                   *, content_length: bool = True) -> RawResponse:
    """One request written byte for byte: the target is sent exactly as given, and headers
    given as pairs may repeat. `content_length=False`: the caller frames the body itself.
    The interim answer to `Expect: 100-continue` is skipped."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in pairs]
    if content_length and (body or method in ("POST", "PUT")):
        lines.append(f"Content-Length: {len(body)}")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 100 "):
        head, _, rest = rest.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    length = int(parsed.get("Content-Length", len(rest)))
    return RawResponse(int(status_line.split()[1]), parsed, rest[:length])


def set_faults(sandbox: Any, **faults: Any) -> None:
    """Sets the in-process sandbox's fault knobs for the next calls."""
    for name, value in faults.items():
        setattr(sandbox.faults, name, value)
