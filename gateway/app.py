"""create_app(): the aiohttp application — AppKeys, middleware, handlers, cleanup_ctx.

Parses HTTP into the core's terms (`Ask`, `Caller`, `Deactivation`) and renders results and
errors as the contract's JSON; JWT, audit and upstream details live in their own modules.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from gateway.audit import AuditLog
from gateway.auth import Authenticator, Caller
from gateway.breaker import CircuitBreaker
from gateway.config import Config
from gateway.deactivation import ROUTE_BATCH, ROUTE_KORE, ROUTE_SIMPLE, Ask, Deactivator
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    UnsupportedMediaType,
    UpstreamRejected,
)
from gateway.ratelimit import MemoryRateLimiter, RateLimiter, Unlimited
from gateway.tokens import TokenCache
from gateway.upstream import KoreClient
from gateway.validation import Deactivation, Validator, parse_json

log = structlog.get_logger(__name__)

REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
READY_CACHE_S = 1.0  # readiness probes are cheap but not free: reuse a verdict this long


class Runtime:
    """Everything one process serves with; built at start-up, closed at shutdown."""

    def __init__(self, config: Config, *, worker: int = 0, workers: int = 1) -> None:
        self.config = config
        self.worker, self.workers = worker, workers
        self.auth = Authenticator(config.callers, config.server.auth)
        self.validator = Validator(config.upstream.bot_id_pattern)
        self.audit = AuditLog(audit_path(config, worker, workers),
                              hash_user_ids=config.audit.hash_user_ids,
                              max_bytes=config.audit.max_bytes, fsync=config.audit.fsync)
        self.tokens = TokenCache(config.apps)
        self.limiter = make_limiter(config, workers)
        self.client = KoreClient(config.upstream, self.tokens, self.limiter)
        self.breaker = CircuitBreaker(self.client.host,
                                      failures=config.upstream.breaker_failures,
                                      cooldown_s=config.upstream.breaker_cooldown_s)
        self.deactivator = Deactivator(audit=self.audit, tokens=self.tokens,
                                       limiter=self.limiter, client=self.client,
                                       breaker=self.breaker, timeout_s=config.upstream.timeout_s)
        self.in_flight = 0
        self.draining = False
        self._ready: tuple[float, bool, dict[str, Any]] | None = None

    async def start(self) -> None:
        self.audit.open()
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()
        await self.tokens.aclose()
        await self.limiter.aclose()
        await self.audit.close()

    def admit(self) -> None:
        """Counts a deactivation request in, or sheds it (draining / over max_in_flight)."""
        if self.draining:
            raise Overloaded("the gateway is shutting down; retry on another instance",
                             retry_after_s=1)
        if self.in_flight >= self.config.server.max_in_flight:
            raise Overloaded("the gateway is at its in-flight limit; retry shortly",
                             retry_after_s=1)
        self.in_flight += 1

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        if self._ready and now - self._ready[0] < READY_CACHE_S and not self.draining:
            return self._ready[1], self._ready[2]
        checks = {"config": True, "audit": await self.audit.probe(),
                  "token": self.tokens.check(), "draining": self.draining}
        ok = checks["audit"] and checks["token"] and not self.draining
        detail = {"status": "ready" if ok else "not_ready", "checks": checks,
                  "circuit": self.breaker.detail()}
        self._ready = (now, ok, detail)
        return ok, detail


def audit_path(config: Config, worker: int, workers: int) -> str:
    """With several workers each writes its own chain: `name-w{n}.jsonl`."""
    if workers <= 1:
        return config.audit.path
    path = Path(config.audit.path)
    return str(path.with_name(f"{path.stem}-w{worker}{path.suffix}"))


def make_limiter(config: Config, workers: int) -> RateLimiter:
    if not config.rate_limit.enabled:
        return Unlimited()
    return MemoryRateLimiter(config.rate_limit.windows, share=1 / workers)


RUNTIME = web.AppKey("runtime", Runtime)
REQUEST_ID = web.RequestKey("request_id", str)
CALLER = web.RequestKey("caller", str)


def runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


# --- middleware -------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id_of(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID", "")
    return given if REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ID, one access line per request, and every error as the contract envelope."""
    started = time.monotonic()
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        response = await _handle(request, handler, request_id)
        response.headers["X-Request-ID"] = request_id
        log.info("request", method=request.method, route=_route_of(request),
                 status=response.status, caller=request.get(CALLER),
                 duration_ms=round((time.monotonic() - started) * 1000, 3))
        return response
    finally:
        structlog.contextvars.unbind_contextvars("request_id")


async def _handle(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc, request_id)
    except web.HTTPException as exc:
        return error_response(_from_http(exc), request_id, allow=exc.headers.get("Allow"))
    except Exception:
        log.exception("request.unexpected_error", route=_route_of(request))
        err = GatewayError("an unexpected error occurred; it has been logged")
        return error_response(err, request_id)


def _route_of(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def _from_http(exc: web.HTTPException) -> GatewayError:
    if exc.status == 405:
        return MethodNotAllowed("this method is not allowed on this route")
    if exc.status == 413:
        return PayloadTooLarge("the body is larger than server.max_body_bytes")
    if exc.status == 404:
        return NotFound("no such route")
    error = InvalidRequest(exc.reason or "bad request")
    error.status = exc.status
    return error


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


# --- deactivation routes --------------------------------------------------------------------

async def read_json(request: web.Request, limit: int) -> Any:
    """The body as JSON, per the content-type and size rules."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as Content-Type: application/json")
    if request.charset and request.charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType("the body must be UTF-8 encoded JSON")
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes") from None
    return parse_json(raw)


Parse = Callable[[str, Any], Deactivation]


async def _admitted(request: web.Request, ask: Ask, parse: Parse) -> tuple[Caller, Deactivation]:
    """Authenticate, authorize and validate one single-item request; audit a refusal."""
    rt = runtime(request)
    try:
        caller = rt.auth.authenticate(request.headers.get("Authorization"))
        ask.caller = request[CALLER] = caller.name
        bot_id = rt.validator.bot_id(ask.bot_id)
        caller.authorize(bot_id)
        d = parse(bot_id, await read_json(request, rt.config.server.max_body_bytes))
        ask.learn(d)
        return caller, d
    except GatewayError as exc:
        await rt.deactivator.deny(ask, exc)
        raise


class InFlight:
    """`async with InFlight(rt, ask)`: counts the request, sheds it (audited) when full."""

    def __init__(self, rt: Runtime, ask: Ask) -> None:
        self.rt, self.ask = rt, ask

    async def __aenter__(self) -> None:
        try:
            self.rt.admit()
        except Overloaded as exc:
            await self.rt.deactivator.deny(self.ask, exc)
            raise

    async def __aexit__(self, *_: object) -> None:
        self.rt.in_flight -= 1


async def deactivate_simplified(request: web.Request) -> web.Response:
    rt = runtime(request)
    ask = Ask(request[REQUEST_ID], ROUTE_SIMPLE, bot_id=request.match_info["botId"])
    async with InFlight(rt, ask):
        caller, d = await _admitted(request, ask, rt.validator.simplified)
        await rt.deactivator.deactivate(ask, caller, d)
    return web.json_response({"success": True, "botId": d.bot_id, "userId": d.user_id,
                              "channel": d.channel, "requestId": ask.request_id})


async def deactivate_kore(request: web.Request) -> web.Response:
    """Kore.ai's own route and body; Kore.ai's 400/404 pass through as Kore.ai sent them."""
    rt = runtime(request)
    ask = Ask(request[REQUEST_ID], ROUTE_KORE, bot_id=request.match_info["botId"])
    async with InFlight(rt, ask):
        caller, d = await _admitted(request, ask, rt.validator.kore_compatible)
        try:
            body = await rt.deactivator.deactivate(ask, caller, d)
        except UpstreamRejected as exc:
            return kore_passthrough(exc)
    return web.json_response(body)


def kore_passthrough(exc: UpstreamRejected) -> web.Response:
    if isinstance(exc.upstream_body, dict | list):
        return web.json_response(exc.upstream_body, status=exc.status)
    return web.Response(text=str(exc.upstream_body or ""), status=exc.status)


async def deactivate_batch(request: web.Request) -> web.Response:
    rt = runtime(request)
    ask = Ask(request[REQUEST_ID], ROUTE_BATCH)
    async with InFlight(rt, ask):
        try:
            caller = rt.auth.authenticate(request.headers.get("Authorization"))
            ask.caller = request[CALLER] = caller.name
            items = batch_items(await read_json(request, rt.config.server.max_body_bytes),
                                rt.config.server.max_batch_items)
        except GatewayError as exc:
            await rt.deactivator.deny(ask, exc)
            raise
        results = await run_batch(rt, caller, ask, items)
    failed = sum(1 for r in results if not r["success"])
    return web.json_response({"results": results,
                              "summary": {"succeeded": len(results) - failed, "failed": failed}})


def batch_items(body: Any, limit: int) -> list[Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("body: must be a JSON object with an items list")
    unknown = sorted(set(body) - {"items"})
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: unknown field")
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise InvalidRequest("items: required, a non-empty list")
    if len(items) > limit:
        raise PayloadTooLarge(f"items: at most {limit} per batch (server.max_batch_items)")
    return items


async def run_batch(rt: Runtime, caller: Caller, batch: Ask, items: list[Any]
                    ) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(rt.config.server.batch_concurrency)

    async def one(index: int, item: Any) -> dict[str, Any]:
        async with gate:
            return await batch_item(rt, caller, batch, index, item)

    return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))


async def batch_item(rt: Runtime, caller: Caller, batch: Ask, index: int, item: Any
                     ) -> dict[str, Any]:
    ask = Ask(f"{batch.request_id}.{index}", ROUTE_BATCH, caller=caller.name)
    if isinstance(item, dict):
        ask.bot_id, ask.user_id, ask.channel = (item.get(k) for k in ("botId", "userId",
                                                                      "channel"))
    result: dict[str, Any] = {"index": index, "botId": ask.bot_id, "userId": ask.user_id}
    try:
        try:
            d = rt.validator.batch_item(item, index)
        except GatewayError as exc:
            await rt.deactivator.deny(ask, exc)
            raise
        ask.learn(d)
        await rt.deactivator.deactivate(ask, caller, d)
    except GatewayError as exc:
        return {**result, "status": exc.status, "success": False, "error": exc.as_dict()}
    return {**result, "status": 200, "success": True}


# --- health ---------------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ok, detail = await runtime(request).readiness()
    return web.json_response(detail, status=200 if ok else 503)


# --- assembly -------------------------------------------------------------------------------

def create_app(config: Config, *, worker: int = 0, workers: int = 1) -> web.Application:
    app = web.Application(middlewares=[envelope_middleware],
                          client_max_size=config.server.max_body_bytes)
    app[RUNTIME] = Runtime(config, worker=worker, workers=workers)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/bots/{botId}/sessions/deactivate", deactivate_simplified)
    app.router.add_post("/v1/sessions/deactivate", deactivate_batch)
    app.router.add_put("/api/public/bot/{botId}/session", deactivate_kore)
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    await rt.start()
    log.info("gateway.started", worker=rt.worker, audit=str(rt.audit.path),
             upstream=rt.config.upstream.base_url, apps=[a.name for a in rt.config.apps])
    yield
    await rt.close()
