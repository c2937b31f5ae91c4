"""Hostile callers against the real gateway as `serve` runs it (`server.make_runner`): slow
heads and bodies are cut off, header limits hold, any byte sequence in a path segment is either
refused or percent-encoded into one upstream segment, and hostile JSON is refused cleanly."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import BOT, CALLER_KEY
from tests.integration.live import Live, live_gateway, send_raw
from tests.integration.sides import AuditTrail

AUTH = f"Bearer {CALLER_KEY}"
CLIENT_TIMEOUT_S = 0.5
URL = f"/v1/bots/{BOT}/sessions/deactivate"


def request_bytes(method: str, target: str, headers: Sequence[tuple[str, str]] = (),
                  body: bytes | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
             *(f"{name}: {value}" for name, value in headers)]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def deactivation(body: bytes, *, target: str = URL, method: str = "POST",
                 extra: Sequence[tuple[str, str]] = ()) -> bytes:
    headers = [("Authorization", AUTH), ("Content-Type", "application/json"), *extra]
    return request_bytes(method, target, headers, body)


@pytest.fixture
def live(make_config: Any) -> Iterator[Live]:
    with live_gateway(make_config, server={"client_timeout_s": CLIENT_TIMEOUT_S,
                                           "max_headers": 16, "max_header_bytes": 1024}) as gw:
        yield gw


async def read_until_closed(reader: asyncio.StreamReader, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout=limit_s)
    return data, time.monotonic() - started


async def trickle(writer: asyncio.StreamWriter, pieces: Iterator[bytes], every_s: float) -> None:
    """Sends one piece every `every_s` until the server hangs up."""
    for piece in pieces:
        await asyncio.sleep(every_s)
        if writer.is_closing():
            return
        try:
            writer.write(piece)
            await writer.drain()
        except ConnectionError:
            return


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def endless(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


def envelope(data: bytes) -> dict[str, Any]:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert b"connection: close" in head.lower()
    error: dict[str, Any] = json.loads(body)["error"]
    return error


class TestSlowClients:
    async def test_trickled_head_is_cut_off_with_408(self, live: Live) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        sender = asyncio.ensure_future(trickle(writer, endless(b"X-Slow: 1\r\n"), 0.1))
        try:
            data, took = await read_until_closed(reader, limit_s=10)
        finally:
            sender.cancel()
            writer.close()
        error = envelope(data)
        assert error["code"] == "request_timeout" and "client_timeout_s" in error["message"]
        assert CLIENT_TIMEOUT_S * 0.8 <= took < CLIENT_TIMEOUT_S + 3
        assert live.sandbox.calls == []

    async def test_after_the_408_the_gateway_half_closes_and_drains(self, live: Live) -> None:
        """A client still sending when its 408 goes out reads the answer and a clean end (a
        FIN), never a reset: what it sends afterwards is read and dropped, not refused."""
        sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
        try:
            sock.sendall(f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
            data = await asyncio.to_thread(_read_to_eof, sock)
            assert envelope(data)["code"] == "request_timeout"
            for _ in range(2):  # after the answer and its FIN: a closed socket would reset
                sock.sendall(b"X-Late: 1\r\n" * 100)  # the first, and the second would fail
                await asyncio.sleep(0.2)
            assert sock.recv(1) == b""  # still the clean end
        finally:
            sock.close()

    async def test_silent_connection_is_closed(self, live: Live) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        try:
            data, took = await read_until_closed(reader, limit_s=10)
        finally:
            writer.close()
        assert envelope(data)["code"] == "request_timeout"
        assert took < CLIENT_TIMEOUT_S + 3

    async def test_slow_but_timely_head_and_idle_keep_alive_are_served(self, live: Live) -> None:
        """The deadline runs from a head's first byte: idle time between requests is not in it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        try:
            for _ in range(2):
                for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"\r\n"):
                    writer.write(piece)
                    await asyncio.sleep(CLIENT_TIMEOUT_S / 10)
                status = await reader.readline()
                assert status.startswith(b"HTTP/1.1 200"), status
                length = 0
                while (line := await reader.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                await asyncio.sleep(CLIENT_TIMEOUT_S * 2)  # idle on a kept-alive connection
        finally:
            writer.close()

    async def test_trickled_body_is_cut_off_with_408_and_audited(self, live: Live,
                                                                 tmp_path: Path) -> None:
        head = deactivation(b"", extra=[("X-Request-ID", "slow-body")]).replace(
            b"Content-Length: 0", b"Content-Length: 40")
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(head + b'{"userId"')
        sender = asyncio.ensure_future(trickle(writer, endless(b" "), 0.1))
        try:
            data, took = await read_until_closed(reader, limit_s=10)
        finally:
            sender.cancel()
            writer.close()
        error = envelope(data)
        assert (error["code"], error["requestId"]) == ("request_timeout", "slow-body")
        assert took < CLIENT_TIMEOUT_S + 5  # the timeout, then at most the lingering drain
        assert live.sandbox.calls == []
        [record] = AuditTrail(tmp_path / "audit" / "deactivations.jsonl").expect_chain()
        assert {k: record[k] for k in ("event", "requestId", "outcome", "status", "error")} == {
            "event": "deactivate.denied", "requestId": "slow-body", "outcome": "failed",
            "status": 408, "error": "request_timeout"}


class TestHeaderLimits:
    @pytest.mark.parametrize(("headers", "target"), [
        pytest.param([(f"X-H{i}", "v") for i in range(20)], URL, id="too-many-headers"),
        pytest.param([("X-Big", "v" * 1100)], URL, id="header-too-long"),
        pytest.param([], URL + "?" + "q" * 1100, id="request-line-too-long"),
    ])
    def test_over_the_limits_is_refused_before_any_handler(
            self, live: Live, tmp_path: Path, headers: list[tuple[str, str]],
            target: str) -> None:
        answer = send_raw(live.port, deactivation(b'{"userId":"u-1"}', target=target,
                                                  extra=headers))
        assert answer.status in (400, 431), answer.head
        assert live.sandbox.calls == []
        assert not (tmp_path / "audit" / "deactivations.jsonl").read_bytes()

    def test_just_within_the_limits_is_served(self, live: Live) -> None:
        extra = [(f"X-H{i}", "v") for i in range(10)] + [("X-Big", "v" * 900)]
        answer = send_raw(live.port, deactivation(b'{"userId":"u-1"}', extra=extra))
        assert answer.status == 200, answer.body
        assert len(live.sandbox.calls) == 1

    async def test_limits_apply_to_any_runner_of_the_app(self, start_gateway: Any,
                                                         sandbox: Any) -> None:
        """`create_app` carries them (handler_args), so test servers enforce them too."""
        gateway = await start_gateway(server={"max_headers": 16})
        headers = {f"X-H{i}": "v" for i in range(20)}
        resp = await gateway.get("/healthz", headers=headers)
        assert resp.status == 400


class TestHostileJson:
    @pytest.mark.parametrize("body", [
        pytest.param(b"[" * 100_000, id="deep-array"),
        pytest.param(b'{"a":' * 50_000 + b"1" + b"}" * 50_000, id="deep-object-over-limit"),
        pytest.param(b'{"userId": 1e999}', id="float-overflow"),
        pytest.param(b'{"userId": -1e999}', id="negative-float-overflow"),
        pytest.param(b'{"userId": ' + b"9" * 5000 + b"}", id="5000-digit-int"),
        pytest.param(b'{"userId": "' + b"x" * 60_000 + b'"}', id="huge-string"),
        pytest.param(b'{"userId": "\\ud800"}', id="lone-surrogate"),
        pytest.param(b'{"userId": "u", "' + b"k" * 30_000 + b'": 1}', id="huge-key"),
        pytest.param(b'{"userId": "u", "channel": [' + b"0," * 20_000 + b"0]}", id="long-list"),
    ])
    def test_refused_cleanly(self, live: Live, tmp_path: Path, body: bytes) -> None:
        started = time.monotonic()
        answer = send_raw(live.port, deactivation(body))
        assert answer.status in (400, 413), answer.head
        assert answer.json()["error"]["code"] in ("invalid_request", "payload_too_large")
        assert time.monotonic() - started < 5
        assert live.sandbox.calls == []
        AuditTrail(tmp_path / "audit" / "deactivations.jsonl").expect_chain()

    def test_overflowing_number_in_a_batch_is_refused_not_echoed(self, live: Live) -> None:
        """1e999 would be echoed back as `Infinity`, which is not JSON."""
        body = b'{"items": [{"botId": 1e999, "userId": "u-1"}]}'
        answer = send_raw(live.port, deactivation(body, target="/v1/sessions/deactivate"))
        assert answer.status == 400, answer.body
        assert b"Infinity" not in answer.body
        assert "number too large" in answer.json()["error"]["message"]

    def test_batch_item_with_an_unencodable_bot_id_fails_alone(self, live: Live,
                                                               tmp_path: Path) -> None:
        body = b'{"items": [{"botId": "st-\\udfff", "userId": "u-1"}, ' \
               b'{"botId": "' + BOT.encode() + b'", "userId": "u-2"}]}'
        answer = send_raw(live.port, deactivation(body, target="/v1/sessions/deactivate"))
        assert answer.status == 200, answer.body
        results = answer.json()["results"]
        assert [r["status"] for r in results] == [400, 200]
        records = AuditTrail(tmp_path / "audit" / "deactivations.jsonl").expect_chain()
        assert records[0]["botId"] == "st-\\udfff"  # kept, as its escape


class TestContentEncoding:
    @pytest.mark.parametrize("target", [URL, "/v1/sessions/deactivate",
                                        f"/api/public/bot/{BOT}/session"])
    @pytest.mark.parametrize("encoding", ["gzip", "deflate"])
    def test_a_body_not_in_its_content_encoding_is_refused_not_a_500(
            self, live: Live, tmp_path: Path, target: str, encoding: str) -> None:
        method = "PUT" if target.startswith("/api/") else "POST"
        answer = send_raw(live.port, deactivation(
            b'{"userId":"u-1"}', target=target, method=method,
            extra=[("Content-Encoding", encoding), ("X-Request-ID", "not-gzip")]))
        assert answer.status == 400, answer.head
        error = answer.json()["error"]
        assert (error["code"], error["requestId"]) == ("invalid_request", "not-gzip")
        assert "Content-Encoding" in error["message"]
        assert live.sandbox.calls == []
        [record] = AuditTrail(tmp_path / "audit" / "deactivations.jsonl").expect_chain()
        assert (record["event"], record["outcome"], record["status"]) == (
            "deactivate.denied", "rejected", 400)

    def test_a_body_in_its_content_encoding_is_served(self, live: Live) -> None:
        body = gzip.compress(b'{"userId":"u-1"}')
        answer = send_raw(live.port, deactivation(body, extra=[("Content-Encoding", "gzip")]))
        assert answer.status == 200, answer.body
        assert len(live.sandbox.calls) == 1


class TestExpect:
    def test_an_unknown_expectation_is_ignored_and_the_request_served(
            self, live: Live, tmp_path: Path) -> None:
        """Not aiohttp's bare 417, which comes without envelope, request ID or record."""
        answer = send_raw(live.port, deactivation(b'{"userId":"u-1"}', extra=[
            ("Expect", "something-else"), ("X-Request-ID", "expects")]))
        assert answer.status == 200, answer.head
        assert "x-request-id: expects" in answer.head.lower()
        assert len(live.sandbox.calls) == 1
        records = AuditTrail(tmp_path / "audit" / "deactivations.jsonl").expect_chain()
        assert [r["event"] for r in records] == ["deactivate.requested", "deactivate.completed"]
        probe = send_raw(live.port, request_bytes("GET", "/healthz", [("Expect", "x")]))
        assert probe.status == 200 and "x-request-id" in probe.head.lower()

    @pytest.mark.parametrize(("method", "target", "status", "code"), [
        ("GET", "/nope", 404, "not_found"),
        ("DELETE", URL, 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
    ])
    def test_an_unknown_expectation_where_no_route_takes_the_request(
            self, live: Live, method: str, target: str, status: int, code: str) -> None:
        """The 404 or 405 the request gets without the header, not aiohttp's bare 417."""
        answer = send_raw(live.port, request_bytes(method, target, [
            ("Expect", "something-else"), ("X-Request-ID", "unmatched")]))
        assert answer.status == status, answer.head
        assert "x-request-id: unmatched" in answer.head.lower()
        assert (answer.json()["error"]["code"], answer.json()["error"]["requestId"]) == (
            code, "unmatched")

    async def test_100_continue_is_answered_before_the_body(self, live: Live) -> None:
        body = b'{"userId":"u-1"}'
        head = deactivation(body, extra=[("Expect", "100-continue")])[:-len(body)]
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        try:
            writer.write(head)
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
            writer.write(body)
            data, _ = await read_until_closed(reader, limit_s=10)
        finally:
            writer.close()
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert len(live.sandbox.calls) == 1


ANY_BOT_ID = r"^(?s:.){1,300}$"  # lets every decoded segment reach the encoder


class TestPathSegments:
    @settings(max_examples=120, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(raw=st.binary(min_size=1, max_size=24), kore_route=st.booleans(),
           prefixed=st.booleans())
    def test_any_bytes_are_refused_or_sent_as_one_encoded_segment(
            self, permissive: Live, raw: bytes, kore_route: bool, prefixed: bool) -> None:
        raw = b"st-" + raw if prefixed else raw  # inside the caller's and the app's globs
        segment = quote(raw, safe="")
        method, target = (("PUT", f"/api/public/bot/{segment}/session") if kore_route
                          else ("POST", f"/v1/bots/{segment}/sessions/deactivate"))
        rid = f"seg-{raw.hex()}-{int(kore_route)}"[:128]
        before = len(permissive.sandbox.calls)
        answer = send_raw(permissive.port, deactivation(
            b'{"userId":"u-1"}', target=target, method=method, extra=[("X-Request-ID", rid)]))
        assert answer.status in (200, 400, 403, 404), (answer.status, answer.body)
        calls = [c for c in permissive.sandbox.calls[before:]
                 if c.headers.get("x-request-id") == rid]
        if answer.status != 200:
            assert calls == []
            return
        [call] = calls
        assert call.bot_id is not None
        assert call.path == f"/api/public/bot/{quote(call.bot_id, safe='')}/session"
        [requested] = [r for r in permissive.audit.records()
                       if r["requestId"] == rid and r["event"] == "deactivate.requested"]
        assert call.bot_id == requested["botId"]  # Kore.ai got exactly what was checked


@pytest.fixture
def permissive(make_config: Any) -> Iterator[Live]:
    with live_gateway(make_config, upstream={"bot_id_pattern": ANY_BOT_ID},
                      rate_limit={"enabled": False}) as gw:
        yield gw
