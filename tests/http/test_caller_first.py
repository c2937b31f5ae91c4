"""After an answer is written, the worker gives up its CPU once, and only then does its
bookkeeping (`connection.let_the_caller_run`): served by the real connection handler
(`GatewayRunner`) on a loopback port, read by a raw socket."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gateway.config.model import ServerConfig
from gateway.http import connection
from gateway.http.connection import GatewayRunner

REQUEST = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
BODY = b'{"pong":true}'


RELEASE = web.AppKey("release", asyncio.Event)


async def ping(_request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def slow(request: web.Request) -> web.Response:
    await request.app[RELEASE].wait()
    return web.Response(body=BODY, content_type="application/json")


@pytest.fixture
def app() -> web.Application:
    app = web.Application()
    app[RELEASE] = asyncio.Event()
    app.router.add_get("/ping", ping)
    app.router.add_get("/slow", slow)
    return app


@pytest.fixture
async def port(app: web.Application) -> AsyncIterator[int]:
    runner = GatewayRunner(app, ServerConfig())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None and site._server.sockets
    try:
        yield site._server.sockets[0].getsockname()[1]
    finally:
        await runner.cleanup()


class Yields:
    """Stands in for `sched_yield`: at each call, what the caller could already read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.readable: list[bytes] = []

    def __call__(self) -> None:
        try:
            self.readable.append(self.sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            self.readable.append(b"")


async def exchange(port: int, data: bytes, answers: int, monkeypatch: Any,
                   wait_s: float = 0.0) -> Yields:
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    yields = Yields(sock)
    monkeypatch.setattr(connection, "_sched_yield", yields)
    try:
        await loop.sock_sendall(sock, data)
        async with asyncio.timeout(5):
            await asyncio.sleep(wait_s)
            while not yields.readable:  # nothing read meanwhile: each peek sees every answer
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)  # (no later yield for these answers)
            received = b""
            while received.count(BODY) < answers:
                received += await loop.sock_recv(sock, 65536)
        return yields
    finally:
        sock.close()


async def test_the_worker_yields_once_an_answer_is_readable_by_its_caller(
        port: int, monkeypatch: Any) -> None:
    yields = await exchange(port, REQUEST, 1, monkeypatch)
    assert len(yields.readable) == 1
    readable = yields.readable[0]
    assert readable.startswith(b"HTTP/1.1 200 ") and readable.endswith(BODY)  # the whole answer


async def test_pipelined_requests_are_answered_before_the_one_yield(
        port: int, monkeypatch: Any) -> None:
    yields = await exchange(port, REQUEST * 2, 2, monkeypatch)
    assert len(yields.readable) == 1  # none after the first: the second was waiting
    assert yields.readable[0].count(BODY) == 2


async def test_no_yield_while_another_connection_has_a_request_in_hand(
        app: web.Application, port: int, monkeypatch: Any) -> None:
    loop = asyncio.get_running_loop()
    busy = socket.create_connection(("127.0.0.1", port))
    busy.setblocking(False)
    try:
        await loop.sock_sendall(busy, REQUEST.replace(b"/ping", b"/slow"))
        await asyncio.sleep(0.05)  # its handler now waits
        quiet = asyncio.create_task(exchange(port, REQUEST, 1, monkeypatch, wait_s=0.3))
        await asyncio.sleep(0.2)
        app[RELEASE].set()  # the slow one is answered: then nothing else is in hand
        yields = await quiet
        assert len(yields.readable) == 1  # after the slow answer only, not after the ping's
        async with asyncio.timeout(5):
            assert BODY in await loop.sock_recv(busy, 65536)
    finally:
        busy.close()


def test_without_sched_yield_nothing_is_called(monkeypatch: Any) -> None:
    monkeypatch.setattr(connection, "_sched_yield", None)
    connection.let_the_caller_run()  # (a platform without it: no error)
