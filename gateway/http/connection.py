"""Caller connections: the limits and timeouts that apply before a request reaches a handler.

aiohttp bounds the request line, each header and the number of headers, but it has no timeout
for a request head that arrives slowly: a client trickling its headers one byte at a time
would hold its connection until the keep-alive timer. `GuardedRequestHandler` closes such a
connection once its head is not complete `server.client_timeout_s` after its first byte (or
after the connection opened), with a 408 in the contract's envelope. A slow *body* is bounded
by `app.read_json`. Nothing here knows about deactivations.

It also bounds what a connection may hold: how many connections are open (`gate.py`), a
small send buffer in the process, at most `MAX_PIPELINED` parsed requests waiting behind the one being
served, and a write deadline (`server.write_timeout_s`): a client that stops reading its
answers is cut off once the answer has not moved for that long. A request aiohttp's parser
refuses (a malformed or over-long line or header) gets a 400 in the contract's envelope and
one log line naming the error's kind, never the bytes that were sent: those may be a key.

Once an answer is written and no connection of the worker has a request in hand, the worker
gives up its CPU once (`let_the_caller_run`): the caller, which the answer just woke, then
runs before the worker's bookkeeping of that answer (docs/choices.md).

The guard relies on aiohttp's `RequestHandler` internals `_messages`, `_waiter`,
`_request_count`, `_max_msg_queue_size`, `_msg_queue_resume_size`, `_parser` (rebuilt with a
smaller queue) and `_ErrInfo` (how a refused request is queued);
tests/integration/test_hostile_input.py and tests/security/ fail if an aiohttp upgrade moves them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http import HttpRequestParser, RawRequestMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from gateway.config.model import ServerConfig
from gateway.http.forwarded import TrustedProxies, budget_key, parse_address
from gateway.http.gate import QUIET_S, ConnectionGate
from gateway.logs import Throttle, skip_note
from gateway.metrics import Metrics

log = structlog.get_logger(__name__)
throttle = Throttle()  # one client can cause these lines; a flood of them must not flood the log

LINGER_S = 2.0  # after an early answer (413, 408, 431, 400), what the client still sends is drained this long
# Parsed requests a connection may have queued for its handler: reading pauses at this many.
# Two, not one: with one, every request paused reading as it was parsed and resumed it when
# its handler took it (two epoll changes and a second pass of the parser each request); with
# two, a client that waits for each answer never pauses, and a pipelining one has at most two
# parsed requests queued behind the one being served.
MAX_PIPELINED = 2
WRITE_HIGH_WATER = 16 * 1024  # bytes buffered in the process before writing counts as stuck
RECEIVE_BUFFER_BYTES = 16 * 1024  # the kernel's receive buffer of a client socket (doubled)
SEND_BUFFER_BYTES = 64 * 1024  # … and its send buffer: not the 4 MB it may grow to
_sched_yield: Callable[[], None] | None = getattr(os, "sched_yield", None)  # (POSIX)


def let_the_caller_run() -> None:
    """Gives up this worker's CPU once, right after an answer was written.

    Writing to a local caller (loopback: a sidecar's service, a probe) wakes it, and Linux
    tends to queue the woken task on the writer's own CPU, expecting the writer to sleep soon
    (a synchronous wake-up). The worker does not sleep yet: its bookkeeping of the answer
    follows (the access line, the hand-off of the terminal record's fsync, the metrics), and
    the caller would wait for all of it. One `sched_yield` lets the caller run first; with
    nothing else runnable on this CPU it returns at once. Measured at 200 req/s: from the
    answer written to the caller holding it, 0.14–0.17 → 0.07–0.10 ms
    (docs/benchmarks/README.md, "Round 21")."""
    if _sched_yield is not None:
        _sched_yield()


def handler_options(server: ServerConfig) -> dict[str, Any]:
    """aiohttp's per-connection settings from `[server]`."""
    return {"max_line_size": server.max_header_bytes, "max_field_size": server.max_header_bytes,
            "max_headers": server.max_headers, "keepalive_timeout": server.keepalive_timeout_s,
            "lingering_time": LINGER_S}


class HeadTooLarge(HttpProcessingError):
    """A request head past `server.max_head_bytes`."""

    code = 431


def _head_size(message: RawRequestMessage) -> int:
    return len(message.path) + sum(len(name) + len(value) + 4
                                   for name, value in message.raw_headers)


def raw_answer(status: int, reason: str, code: str, message: str, *,
               retry_after_s: int | None = None) -> bytes:
    """A complete HTTP/1.1 answer in the contract's envelope; the connection closes after it."""
    request_id = uuid.uuid4().hex
    body = json.dumps({"error": {"code": code, "message": message,
                                 "requestId": request_id}}).encode()
    retry = f"Retry-After: {retry_after_s}\r\n" if retry_after_s is not None else ""
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: {request_id}\r\n{retry}"
            "Connection: close\r\n\r\n")
    return head.encode("ascii") + body


def timeout_answer(timeout_s: float) -> bytes:
    return raw_answer(408, "Request Timeout", "request_timeout",
                      f"the request head did not arrive within {timeout_s:g} s "
                      "(server.client_timeout_s)")


def refusal_answer(limit: str) -> bytes:
    return raw_answer(503, "Service Unavailable", "overloaded",
                      f"too many open connections (server.{limit}); retry shortly",
                      retry_after_s=1)


def parse_error_response(exc: BaseException | None, status: int) -> web.Response:
    """What a request aiohttp's parser refused gets: the envelope, none of the bytes sent."""
    code = exc.code if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500 else status
    kind = type(exc).__name__ if exc is not None else "error"
    message = exc.message if isinstance(exc, HeadTooLarge) else (
        f"the request could not be read as HTTP ({kind}): a malformed or over-long request "
        "line or header")
    body = {"error": {"code": "invalid_request" if code < 500 else "internal_error",
                      "message": message,
                      "requestId": uuid.uuid4().hex}}
    response = web.json_response(body, status=code)
    response.headers["X-Request-ID"] = body["error"]["requestId"]
    response.force_close()
    return response


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler plus a deadline on each request head.

    The timer starts when the connection opens and whenever the first byte of a new request
    arrives while the connection waits for one; a complete head stops it. Idle time between
    kept-alive requests is the keep-alive timer's business, not this one's.
    """

    def __init__(self, manager: GuardedServer, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0  # loop time of the last bytes received
        self._head_bytes = 0  # of the request head being received
        self._unparsed_bytes = 0  # received since the last complete head (bodies included)
        self._head_refused = False
        self._unreadable = False  # a request aiohttp's parser refused (or a 431) is answered
        self._linger_timer: asyncio.TimerHandle | None = None  # set while lingering (408, 4xx)
        self._max_msg_queue_size = MAX_PIPELINED
        self._msg_queue_resume_size = MAX_PIPELINED // 2
        # aiohttp's parser emits up to 32 requests from one read before it pauses: built again
        # so that it stops after the few this handler will queue.
        self._parser = HttpRequestParser(
            self, kwargs["loop"], kwargs.get("read_bufsize", DEFAULT_CHUNK_SIZE),
            max_line_size=self.max_line_size, max_field_size=self.max_field_size,
            max_headers=self.max_headers, payload_exception=RequestPayloadError,
            auto_decompress=kwargs.get("auto_decompress", True),
            max_msg_queue_size=MAX_PIPELINED)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._last_data = asyncio.get_running_loop().time()
        refused = self._guard.admit(self, transport)
        if refused is not None:
            transport.write(refusal_answer(refused))  # type: ignore[attr-defined]
            self.force_close()
            return
        _bound_buffers(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:  # answered and half-closed: what comes is dropped
            return
        if self._head_refused:  # the connection closes after its 431; nothing more is read
            if self.transport is not None:
                self.transport.pause_reading()
            return
        queued = len(self._messages)
        super().data_received(data)
        if data:
            self._last_data = self._loop.time()
            self._unparsed_bytes += len(data)
        if len(self._messages) > queued:  # a complete request head is queued for its handler
            # A head is never longer than its bytes: with no more bytes than the limit since
            # the last complete head, none of the heads just parsed can be over it.
            if self._unparsed_bytes > self._guard.max_head_bytes:
                self._check_heads(queued)  # it may have arrived in pieces while another was served
            self._head_bytes = 0
            self._unparsed_bytes = len(data)  # a next head may have begun in these bytes
            self._disarm_head_timer()
            self._guard.gate.busy(self)  # (not `idle` first: it would be undone at once)
            return
        if data:
            self._guard.gate.idle(self)  # activity: to the back of the eviction line
        if not self._awaiting_head():
            return
        self._head_bytes += len(data)
        if self._head_bytes > self._guard.max_head_bytes:
            self._refuse_head(len(self._messages))
        elif self._head_timer is None:
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        self._disarm_head_timer()
        self._disarm_write_timer()
        self._guard.gate.release(self)
        super().connection_lost(exc)

    async def finish_response(self, request: Any, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        if resp.status == 417 and isinstance(resp, web.HTTPExpectationFailed) and (
                self._guard.unmet_expectation is not None):
            # aiohttp's bare 417 for an `Expect` other than 100-continue on a request no route
            # takes (a route's own expect handler runs otherwise), raised before any middleware.
            resp = await self._guard.unmet_expectation(request)
        answered = await super().finish_response(request, resp, start_time)
        if self._unreadable and self.transport is not None:
            # The rest of an unreadable request may still be on its way: dropped, not left
            # unread, which would reset the connection and could lose the answer for it.
            self.transport.resume_reading()
            self._linger(self.transport)
        elif not self._messages:  # (a pipelined request behind it is answered first)
            gate = self._guard.gate
            gate.idle(self)
            if gate.all_idle():  # (under load, the other requests' turns are not given away)
                let_the_caller_run()
        return answered

    # -- the gate's view: an idle connection may be closed to make room -------------------------

    def evictable(self) -> bool:
        loop = asyncio.get_running_loop()
        waiting = self._waiter is not None and not self._waiter.done()
        return waiting and not self._messages and loop.time() - self._last_data >= QUIET_S

    def evict(self) -> None:
        self.force_close()

    # -- a client that does not read its answers -------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        loop = asyncio.get_running_loop()
        self._write_timer = loop.call_later(self._guard.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self._disarm_write_timer()
        super().resume_writing()

    def _disarm_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        transport = self.transport
        if transport is None:
            return
        if (skipped := throttle("client.write_timeout")) is not None:
            log.warning("client.write_timeout", peer=_peer_host(transport),
                        timeout_s=self._guard.write_timeout_s, **skip_note(skipped))
        self._guard.metrics.connection_closed("write_timeout")
        _reset(transport)  # what is buffered for it is dropped with it

    # -- what aiohttp itself refuses, and what it would log ----------------------------------

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own error answer, without the request's bytes in the answer or the log."""
        if status >= 500 and exc is not None:
            self.log_exception("http.unhandled_error", exc_info=exc)
        elif (skipped := throttle("http.bad_request")) is not None:
            log.warning("http.bad_request", status=status, peer=request.remote,
                        error=type(exc).__name__ if exc is not None else None,
                        **skip_note(skipped))
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already being sent")
        self._unreadable = status < 500  # a 400 or 431 of the parser's: linger after it
        return parse_error_response(exc, status)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's "Unhandled exception" lines, as one structured line whose traceback is
        redacted like any other (`logs.py`)."""
        exc_info = kw.get("exc_info", True)
        log.error("http.unhandled_error", where=str(args[0]) if args else None,
                  exc_info=exc_info)

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

    def _check_heads(self, first: int) -> None:
        for index in range(first, len(self._messages)):
            message = self._messages[index][0]
            if isinstance(message, RawRequestMessage) and _head_size(message) > (
                    self._guard.max_head_bytes):
                self._refuse_head(index)
                return

    def _refuse_head(self, index: int) -> None:
        """From request `index` of the queue on, one 431 in their place (then the connection
        closes): a head past `server.max_head_bytes`, parsed, pins several times that."""
        self._disarm_head_timer()
        self._head_refused = True
        while len(self._messages) > index:
            self._messages.pop()
        error = HeadTooLarge(message=f"the request head is larger than "
                             f"{self._guard.max_head_bytes} bytes (server.max_head_bytes)")
        self._messages.append((_ErrInfo(status=431, exc=error, message=error.message),
                               EMPTY_PAYLOAD))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if self.transport is not None:
            self.transport.pause_reading()
        self._guard.metrics.connection_closed("head_too_large")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or not self._awaiting_head():
            return
        if (skipped := throttle("client.head_timeout")) is not None:
            log.warning("client.head_timeout", peer=_peer_host(transport),
                        timeout_s=self._head_timeout_s, **skip_note(skipped))
        self._guard.metrics.connection_closed("head_timeout")
        transport.write(timeout_answer(self._head_timeout_s))
        self._linger(transport)

    def _linger(self, transport: asyncio.BaseTransport) -> None:
        """Half-closes after the answer and drops what the client still sends, for up to
        `LINGER_S`, then closes (nginx's lingering close). Closing a socket with unread bytes
        would send a reset, which can reach a client that is still sending before it has read
        its answer, and lose the answer for it."""
        if not transport.can_write_eof():  # type: ignore[attr-defined]
            self.force_close()
            return
        self._force_close = True  # the handler loop ends; the transport stays open to drain
        if self._waiter is not None:
            self._waiter.cancel()
        transport.write_eof()  # type: ignore[attr-defined]  # a FIN once the answer is out
        self._linger_timer = self._loop.call_later(LINGER_S, self._end_linger)

    def _end_linger(self) -> None:
        self._linger_timer = None
        self.force_close()


def _peer_host(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


def _bound_buffers(transport: asyncio.BaseTransport) -> None:
    """Small buffers for each client socket: a client that stops reading pins little memory,
    in the process or in the kernel (which counts against the same container limit), and
    writing pauses soon, which starts the write deadline. A small receive buffer bounds
    what one read brings in (kept, unparsed, while reading is paused)."""
    try:
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
    except (AttributeError, NotImplementedError, OSError):
        pass  # not a TCP transport with flow control


def _reset(transport: asyncio.BaseTransport) -> None:
    """Closes with a reset: a plain close would leave the unread answer queued in the kernel
    (FIN-WAIT-1) for minutes, as long as the client keeps its window shut."""
    sock = transport.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    transport.abort()  # type: ignore[attr-defined]


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class GuardedServer(web.Server):
    """aiohttp's low-level server whose connections get `GuardedRequestHandler`, counted by a
    `ConnectionGate`."""

    def __init__(self, base: web.Server, *, server: ServerConfig, max_connections: int,
                 metrics: Metrics | None = None, unmet_expectation: Handler | None = None,
                 **handler_kwargs: Any) -> None:
        super().__init__(base.request_handler, request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation, **handler_kwargs)
        self.unmet_expectation = unmet_expectation
        self.head_timeout_s = server.client_timeout_s
        self.write_timeout_s = server.write_timeout_s
        self.max_head_bytes = server.max_head_bytes
        self.metrics = metrics if metrics is not None else Metrics()
        self.gate = ConnectionGate(max_connections, server.max_connections_per_client,
                                   self.metrics)
        self.proxies = TrustedProxies(server.trusted_proxies)
        self.handler_kwargs = handler_kwargs

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, head_timeout_s=self.head_timeout_s,
                                     loop=asyncio.get_running_loop(), **self.handler_kwargs)

    def admit(self, conn: GuardedRequestHandler, transport: asyncio.BaseTransport) -> str | None:
        """None when `conn` may stay open, else the limit that refuses it (counted, logged
        once a second at most by the metric, not per connection)."""
        host = _peer_host(transport)
        address = parse_address(host) if host else None
        key = None if self.proxies.trusts(address) else budget_key(str(address or host))
        refused = self.gate.admit(conn, key)
        if refused is not None:
            self.metrics.connection_closed(refused)
        return refused


class GatewayRunner(web.AppRunner):
    """An `AppRunner` applying `[server]`'s connection limits and slow-client timeouts."""

    def __init__(self, app: web.Application, server: ServerConfig, *,
                 max_connections: int | None = None, metrics: Metrics | None = None,
                 unmet_expectation: Handler | None = None, **kwargs: Any) -> None:
        """`max_connections`: `server.max_connections` unless lowered (`gate.fd_capped`);
        `unmet_expectation`: answers a request no route takes whose `Expect` aiohttp refuses
        (`GuardedRequestHandler.finish_response`); `kwargs`: the runner's own options
        (`shutdown_timeout`, `handle_signals`)."""
        super().__init__(app, access_log=None, **handler_options(server), **kwargs)
        self.server_config = server
        self.max_connections = max_connections or server.max_connections
        self.metrics = metrics
        self.unmet_expectation = unmet_expectation

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's start-up
        return GuardedServer(base, server=self.server_config,
                             max_connections=self.max_connections, metrics=self.metrics,
                             unmet_expectation=self.unmet_expectation,
                             access_log=None, **handler_options(self.server_config))
