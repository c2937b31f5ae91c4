"""What every API request gets, whichever way it is served: its request ID, the contract's
error envelope, and its account (the `X-Request-ID` header, the request metrics and one access
line). `app.envelope_middleware` applies them around aiohttp's handlers; the express lane
(`express.py`) applies the same functions itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import os
import re
from typing import Any

import structlog
from aiohttp import web

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
)
from gateway.http.runtime import Runtime
from gateway.jsoncodec import compact
from gateway.logs import Throttle, access, skip_note

throttle = Throttle(per_s=20)

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
JSON_TYPE = {"Content-Type": "application/json; charset=utf-8"}

# structlog's own context variable for `request_id` (what `bind_contextvars(request_id=…)`
# sets), bound in a throwaway context: the request's server sets and resets it directly, one
# step each.
REQUEST_ID_VAR = contextvars.Context().run(
    structlog.contextvars.bind_contextvars, request_id=None)["request_id"].var


def request_id_of(request: web.BaseRequest) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if REQUEST_ID_PATTERN.fullmatch(given) else os.urandom(16).hex()


def error_response(error: GatewayError, request_id: str, *,
                   allow: str | None = None) -> web.Response:
    body = {"error": {**error.as_dict(), "requestId": request_id}}
    response = web.json_response(body, status=error.status)
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    if allow:
        response.headers["Allow"] = allow
    return response


def json_answer(body: Any, status: int = 200) -> web.Response:
    """A JSON answer encoded by orjson (`jsoncodec.compact`: the standard library's bytes
    where orjson's could differ), with json_response's content type."""
    return web.Response(body=compact(body), status=status, headers=JSON_TYPE)


def account(rt: Runtime, request: web.BaseRequest, response: web.StreamResponse,
            request_id: str, route: str, caller: str | None, seconds: float, *,
            close: bool = False) -> None:
    """A request's answer is ready: its `X-Request-ID`, the connection closed when it must
    be, the request metrics and its access line."""
    response.headers["X-Request-ID"] = request_id
    status = response.status
    if status == 408 or rt.draining or close:
        response.force_close()  # a half-read body, or clients should move to another instance
    rt.metrics.request(route, status, caller, seconds)
    # A keyless flood must not flood the log either: its lines are throttled.
    skipped = 0 if status != 401 else throttle("request.unauthenticated")
    if skipped is not None:
        access("request", method=request.method, route=route, status=status,
               caller=caller, duration_ms=round(seconds * 1000, 3), **skip_note(skipped))


def from_http(exc: web.HTTPException) -> GatewayError:
    if exc.status == 405:
        return MethodNotAllowed("this method is not allowed on this route")
    if exc.status == 413:
        return PayloadTooLarge("the body is larger than server.max_body_bytes")
    if exc.status == 404:
        return NotFound("no such route")
    error = InvalidRequest(exc.reason or "bad request")
    error.status = exc.status
    return error


def cut_short(exc: BaseException) -> GatewayError:
    """What the audit says of a request ended by something other than a GatewayError."""
    if isinstance(exc, asyncio.CancelledError):
        return Overloaded("the gateway shut down before this request finished; retry it")
    if isinstance(exc, web.HTTPException):
        return from_http(exc)
    return GatewayError("an unexpected error occurred; it has been logged")
