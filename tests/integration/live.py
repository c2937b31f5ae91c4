"""The real gateway (`server.make_runner`, as `serve` builds it) and the sandbox, served from a
background thread with its own event loop: for tests that drive raw sockets synchronously
(hypothesis) and for hostile clients that must not share the gateway's loop."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from benchmarks.ports import free_port
from gateway.config.model import Config
from gateway.http.app import RUNTIME, create_app
from gateway.http.runtime import Runtime
from gateway.http.server import make_runner
from gateway.sandbox.server import KoreSandbox, SandboxApp
from tests.conftest import CLIENT_ID, CLIENT_SECRET
from tests.integration.sides import AuditTrail

START_TIMEOUT_S = 15.0


@dataclass
class Live:
    port: int
    sandbox: KoreSandbox
    runtime: Runtime
    loop: asyncio.AbstractEventLoop

    @property
    def audit(self) -> AuditTrail:
        return AuditTrail(self.runtime.audit.path)

    def call(self, coro: Any, timeout_s: float = 10.0) -> Any:
        """Runs `coro` on the gateway's loop (to read or change state safely) and waits."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: held bound, not listening, while in use, so
    no other server (the gateway under test included) can be given it meanwhile, as a port
    merely found free could be."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@contextmanager
def live_gateway(make_config: Any, **tables: Any) -> Iterator[Live]:
    """`with live_gateway(make_config, server={…}) as live:` the gateway on `live.port`."""
    sandbox = KoreSandbox([SandboxApp(client_id=CLIENT_ID, key=CLIENT_SECRET)])
    sandbox_port, port = free_port(), free_port()
    server = {"listen": f"127.0.0.1:{port}", **tables.pop("server", {})}
    config: Config = make_config(f"http://127.0.0.1:{sandbox_port}", server=server, **tables)
    ready: list[Live] = []
    started, stop = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    async def serve() -> None:
        upstream = web.AppRunner(sandbox.create_app(), access_log=None)
        await upstream.setup()
        await web.TCPSite(upstream, "127.0.0.1", sandbox_port).start()
        app = create_app(config)
        runner = make_runner(app, config)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.append(Live(port, sandbox, app[RUNTIME], asyncio.get_running_loop()))
        started.set()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.02)
        finally:
            await runner.cleanup()
            await upstream.cleanup()

    def main() -> None:
        try:
            asyncio.run(serve())
        except Exception as exc:  # noqa: BLE001 (reported to the test thread)
            failures.append(exc)
            started.set()

    thread = threading.Thread(target=main, name="live-gateway", daemon=True)
    thread.start()
    if not started.wait(START_TIMEOUT_S) or failures:
        stop.set()
        raise AssertionError(f"live gateway did not start: {failures}")
    try:
        yield ready[0]
    finally:
        stop.set()
        thread.join(START_TIMEOUT_S)
        assert not thread.is_alive(), "live gateway did not stop"


@dataclass
class RawAnswer:
    status: int
    head: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def send_raw(port: int, data: bytes, timeout_s: float = 10.0) -> RawAnswer:
    """Writes `data` as is on a fresh connection and reads the answer until the server closes
    (send `Connection: close`). Status 0: closed without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    text = head.decode("latin-1")
    if not text.startswith("HTTP/1."):
        return RawAnswer(0, text, body)
    return RawAnswer(int(text.split()[1]), text, _dechunk(text, body))


def _dechunk(head: str, body: bytes) -> bytes:
    if "transfer-encoding: chunked" not in head.lower():
        return body
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out
