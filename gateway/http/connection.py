"""Caller connections: the limits and timeouts that apply before a request reaches a handler.

aiohttp bounds the request line, each header and the number of headers, but it has no timeout
for a request head that arrives slowly: a client trickling its headers one byte at a time
would hold its connection until the keep-alive timer. `GuardedRequestHandler` closes such a
connection once its head is not complete `server.client_timeout_s` after its first byte (or
after the connection opened), with a 408 in the contract's envelope. A slow *body* is bounded
by `app.read_json`. Nothing here knows about deactivations.

The guard reads three attributes of aiohttp's `RequestHandler` (`_messages`, `_waiter`,
`_request_count`); tests/integration/test_hostile_input.py fails if an aiohttp upgrade moves them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.config.model import ServerConfig

log = structlog.get_logger(__name__)

KEEPALIVE_S = 75.0  # an idle kept-alive connection: longer than common load-balancer idle times
LINGER_S = 2.0  # after an early answer (413, 408), unread body bytes are drained this long


def handler_options(server: ServerConfig) -> dict[str, Any]:
    """aiohttp's per-connection settings from `[server]`."""
    return {"max_line_size": server.max_header_bytes, "max_field_size": server.max_header_bytes,
            "max_headers": server.max_headers, "keepalive_timeout": KEEPALIVE_S,
            "lingering_time": LINGER_S}


def timeout_answer(timeout_s: float) -> bytes:
    """A complete HTTP/1.1 408 in the contract's envelope; the connection closes after it."""
    request_id = uuid.uuid4().hex
    body = json.dumps({"error": {
        "code": "request_timeout", "requestId": request_id,
        "message": f"the request head did not arrive within {timeout_s:g} s "
                   "(server.client_timeout_s)"}}).encode()
    head = ("HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler plus a deadline on each request head.

    The timer starts when the connection opens and whenever the first byte of a new request
    arrives while the connection waits for one; a complete head stops it. Idle time between
    kept-alive requests is the keep-alive timer's business, not this one's.
    """

    def __init__(self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages:  # a complete request head is queued for its handler
            self._disarm_head_timer()
        elif self._head_timer is None and self._awaiting_head():
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _awaiting_head(self) -> bool:
        """No complete head queued, and none handled yet or the handler loop waits for one
        (not while a handler runs or an unread body is drained after an early answer)."""
        if self._messages:
            return False
        waiting = self._waiter is not None and not self._waiter.done()
        return self._request_count == 0 or waiting

    def _arm_head_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or not self._awaiting_head():
            return
        log.warning("client.head_timeout", peer=str(transport.get_extra_info("peername")),
                    timeout_s=self._head_timeout_s)
        transport.write(timeout_answer(self._head_timeout_s))
        self.force_close()  # closes once the answer is flushed


class GuardedServer(web.Server):
    """aiohttp's low-level server whose connections get `GuardedRequestHandler`."""

    def __init__(self, base: web.Server, *, head_timeout_s: float, **handler_kwargs: Any) -> None:
        super().__init__(base.request_handler, request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation, **handler_kwargs)
        self.head_timeout_s = head_timeout_s
        self.handler_kwargs = handler_kwargs

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, head_timeout_s=self.head_timeout_s,
                                     loop=asyncio.get_running_loop(), **self.handler_kwargs)


class GatewayRunner(web.AppRunner):
    """An `AppRunner` applying `[server]`'s header limits and slow-client timeouts."""

    def __init__(self, app: web.Application, server: ServerConfig, **kwargs: Any) -> None:
        """`kwargs`: the runner's own options (`shutdown_timeout`, `handle_signals`)."""
        super().__init__(app, access_log=None, **handler_options(server), **kwargs)
        self.server_config = server

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's start-up
        return GuardedServer(base, head_timeout_s=self.server_config.client_timeout_s,
                             access_log=None, **handler_options(self.server_config))
