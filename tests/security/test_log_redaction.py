"""No key, secret or JWT in any output (issue 11, finding 3): every malformed-header case, sent
over a raw socket to a real `serve` process, with aiohttp's C parser and its Python one; then
every byte the process printed to stdout and stderr is searched."""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.auth import hash_key
from tests.conftest import BOT, CALLER_KEY, CLIENT_SECRET, base_settings
from tests.security.served import Served

PLAIN_KEY = "plainkey" + secrets.token_hex(16)  # a valid key without the kgw_ prefix
TOKEN = jwt.encode({"appId": "cs-leak", "sub": "x"}, "k" * 32, algorithm="HS256")
JWT_SHAPE = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
TARGET = f"/v1/bots/{BOT}/sessions/deactivate"
K = PLAIN_KEY.encode()


def head(*lines: bytes, line: bytes = b"POST " + TARGET.encode() + b" HTTP/1.1") -> bytes:
    body = b'{"userId":"u-1"}'
    return b"\r\n".join([line, b"Host: gw", b"Connection: close", *lines,
                         b"Content-Type: application/json",
                         b"Content-Length: %d" % len(body), b"", b""]) + body


# (id, the bytes sent): each one carries the key (or a JWT) where a parser trips over it.
CASES = [
    ("value-ends-in-cr", head(b"Authorization: Bearer " + K + b"\r")),
    ("bare-lf-line-end", head(b"Authorization: Bearer " + K + b"\nX-Next: 1")),
    ("nul-in-value", head(b"Authorization: Bearer " + K[:6] + b"\x00" + K[6:])),
    ("del-in-value", head(b"Authorization: Bearer " + K + b"\x7f")),
    ("control-char-in-value", head(b"Authorization: Bearer " + K + b"\x01\x1b")),
    ("non-ascii-in-value", head(b"Authorization: Bearer " + K + b"\xff\xfe")),
    ("no-scheme-and-nul", head(b"Authorization: " + K + b"\x00")),
    ("header-value-too-long", head(b"Authorization: Bearer " + K + b"x" * 9000)),
    ("head-too-large", head(*[b"X-Pad-%d: %s %s" % (i, K, b"p" * 6000) for i in range(3)],
                            b"Authorization: Bearer " + K)),
    ("folded-continuation", head(b"Authorization: Bearer", b" " + K)),
    ("space-in-header-name", head(b"Authorization " + K + b": Bearer " + K)),
    ("key-as-header-name", head(K + b"\x00: v", b"Authorization: Bearer " + K)),
    ("colon-less-line", head(b"Authorization Bearer " + K)),
    ("bad-request-line", head(line=b"POST " + TARGET.encode() + b"?key=" + K + b" HTTP/1.1 x")),
    ("key-as-method", head(line=K + b" " + TARGET.encode() + b" HTTP/1.1")),
    ("bad-version", head(line=b"GET /?k=" + K + b" HTTP/9.9")),
    ("request-line-too-long", head(line=b"GET /?k=" + K + b"x" * 9000 + b" HTTP/1.1")),
    ("nul-in-target", head(line=b"GET /" + K + b"\x00 HTTP/1.1")),
    ("content-length-is-the-key", head(b"Authorization: Bearer " + K, b"Content-Length: " + K)),
    ("host-with-key-and-cr", head(b"Host: " + K + b"\r", b"Authorization: Bearer " + K)),
    ("jwt-with-cr", head(b"Authorization: Bearer " + TOKEN.encode() + b"\r")),
    ("jwt-in-cookie-with-nul", head(b"Cookie: session=" + TOKEN.encode() + b"\x00")),
    ("two-authorization-headers", head(b"Authorization: Bearer " + K,
                                       b"Authorization: Bearer " + K)),
    ("tls-hello-lookalike", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + K + b"\r\n\r\n"),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + K),
]


def chunked_with_key_in_a_bad_chunk() -> bytes:
    """A keyed call whose chunked body breaks inside the handler, the key in the bad line."""
    return (f"POST {TARGET} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CALLER_KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n"
            ).encode() + b"zz" + K + b"\r\n{}\r\n0\r\n\r\n"


def exchange(port: int, data: bytes) -> bytes:
    """Sends `data` on a fresh connection; whatever comes back before the close (or 3 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # refused half-way: what matters is what the gateway printed
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError:
            pass
    return b"".join(chunks)


@pytest.mark.parametrize("parser", [
    pytest.param({}, id="c-parser"),
    pytest.param({"AIOHTTP_NO_EXTENSIONS": "1"}, id="python-parser"),
])
async def test_no_secret_in_any_output_for_any_malformed_header(
        sandbox: Any, tmp_path: Path, parser: dict[str, str]) -> None:
    callers = [*base_settings(tmp_path)["callers"],
               {"name": "plain", "key_sha256": hash_key(PLAIN_KEY), "bots": ["st-*"]}]
    gateway = await Served(tmp_path, sandbox.url, env=parser, callers=callers,
                           logging={"level": "debug", "format": "json"}).start()
    answers = {}
    try:
        for name, data in [*CASES, ("bad-chunk", chunked_with_key_in_a_bad_chunk())]:
            answers[name] = await asyncio.to_thread(exchange, gateway.port, data)
        alive = await asyncio.to_thread(exchange, gateway.port,
                                        head(b"Authorization: Bearer " + K))
    finally:
        assert gateway.stop() == 0
    output = gateway.output()
    assert b"HTTP/1.1 200" in alive, alive  # the gateway came through all of it
    for secret in (PLAIN_KEY, CALLER_KEY, CLIENT_SECRET, TOKEN):
        assert secret.encode() not in output, secret
    assert not JWT_SHAPE.search(output)
    assert b"http.bad_request" in output  # the refusals were logged, without the bytes
    for name, answer in answers.items():
        assert K not in answer and TOKEN.encode() not in answer, name
        assert not answer.startswith(b"HTTP/1.1 500") and b" 500 " not in answer[:16], name
