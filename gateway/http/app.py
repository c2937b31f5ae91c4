"""create_app(): the aiohttp application — AppKeys, middleware, handlers, cleanup_ctx.

Parses HTTP into the core's terms (`Ask`, `Caller`, `Deactivation`) and renders results and
errors as the contract's JSON; the parts a request uses are `runtime.py`'s `Runtime`, and JWT,
audit and upstream details live in their own modules.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_urldispatcher import _default_expect_handler

from gateway.auth import Caller
from gateway.config.model import Config, upstream_host
from gateway.config.tables import config_warnings
from gateway.deactivation import ROUTE_BATCH, ROUTE_KORE, ROUTE_SIMPLE, Ask
from gateway.errors import (
    GatewayError,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthenticated,
    UnsupportedMediaType,
    UpstreamRejected,
)
from gateway.http.connection import handler_options
from gateway.http.envelope import (
    REQUEST_ID_VAR,
    account,
    cut_short,
    error_response,
    from_http,
    json_answer,
    request_id_of,
)
from gateway.http.express import SIMPLE_PATH, ExpressLane
from gateway.http.forwarded import budget_key
from gateway.http.openapi import document as openapi_document
from gateway.http.runtime import Runtime
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import Metrics
from gateway.validation import Deactivation, parse_json

log = structlog.get_logger(__name__)

RUNTIME = web.AppKey("runtime", Runtime)
OPENAPI = web.AppKey("openapi", dict)  # {"config": built for, "body": its JSON bytes}
REQUEST_ID = web.RequestKey("request_id", str)
CALLER = web.RequestKey("caller", str)
CLOSE = web.RequestKey("close", bool)  # close the connection after this answer


def runtime(request: web.Request) -> Runtime:
    return request.app[RUNTIME]


# --- middleware -------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def authorization_of(request: web.Request) -> str | None:
    """The one Authorization header; repeated credentials are refused, never guessed between."""
    values = request.headers.getall("Authorization", [])
    if len(values) > 1:
        raise Unauthenticated("send exactly one Authorization header")
    return values[0] if values else None


@web.middleware
async def envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ID, one access line per request, and every error as the contract envelope."""
    started = time.monotonic()
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    request[CLOSE] = False  # set now: looking up a key the request lacks raises inside
    bound = REQUEST_ID_VAR.set(request_id)
    try:
        try:
            response = await handler(request)
        except GatewayError as exc:
            response = error_response(exc, request_id)
        except web.HTTPException as exc:
            response = error_response(from_http(exc), request_id, allow=exc.headers.get("Allow"))
        except Exception:
            log.exception("request.unexpected_error", route=_route_of(request))
            response = error_response(
                GatewayError("an unexpected error occurred; it has been logged"), request_id)
        account(request.app[RUNTIME], request, response, request_id, _route_of(request),
                request.get(CALLER), time.monotonic() - started, close=request[CLOSE])
        return response
    finally:
        REQUEST_ID_VAR.reset(bound)


def _route_of(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


# --- deactivation routes --------------------------------------------------------------------

async def read_json(request: web.Request, limit: int, timeout_s: float) -> Any:
    """The body as JSON, per the content-type and size rules, delivered within `timeout_s`."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as Content-Type: application/json")
    if request.charset and request.charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType("the body must be UTF-8 encoded JSON")
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    try:
        if request.content.is_eof():  # the whole body came with the head: nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(timeout_s):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes") from None
    except RequestPayloadError:
        # A Content-Encoding the body is not in, or a broken chunked encoding.
        raise InvalidRequest("body: could not be read as sent (its Content-Encoding or "
                             "chunked encoding is invalid)") from None
    except TimeoutError:
        # A client trickling its body would hold a request slot for ever.
        raise RequestTimeout(f"the body did not arrive within {timeout_s:g} s "
                             "(server.client_timeout_s)") from None
    return parse_json(raw)


Parse = Callable[[str, Any], Deactivation]


def new_ask(rt: Runtime, request: web.Request, route: str, bot_id: Any = None) -> Ask:
    """The ask of one request, with who knocked (`client`, see `forwarded.py`)."""
    client = rt.proxies.client(request.remote, request.headers.getall("X-Forwarded-For", ()))
    return Ask(request[REQUEST_ID], route, bot_id=bot_id, client=client)


async def authenticated(rt: Runtime, request: web.Request, ask: Ask) -> Caller:
    """The caller, before anything counts against `max_in_flight`; a keyless request is
    refused here, within its own budget (`keyless.py`), and audited as one (`audit/keyless.py`)."""
    try:
        caller = rt.auth.authenticate(authorization_of(request))
    except Unauthenticated as exc:
        await refuse_keyless(rt, request, ask, exc)
        raise
    ask.caller = request[CALLER] = caller.name
    return caller


async def refuse_keyless(rt: Runtime, request: web.Request, ask: Ask,
                         error: Unauthenticated) -> None:
    hold = rt.keyless.hold_s(budget_key(ask.client or ""))
    held = hold > 0 and rt.keyless.enter()
    if hold > 0:
        rt.metrics.unauthenticated_held()
        if not held:
            request[CLOSE] = True  # the share is full: answer now, make the client reconnect
    try:
        if held:
            await asyncio.sleep(hold)
    finally:
        if held:
            rt.keyless.leave()
        await rt.deactivator.deny(ask, error)  # even when cut short: one record per request


async def _admitted(rt: Runtime, request: web.Request, ask: Ask, caller: Caller,
                    parse: Parse) -> Deactivation:
    """Authorize and validate one single-item request; audit a refusal."""
    try:
        try:
            bot_id = rt.validator.bot_id(ask.bot_id)
            caller.authorize(bot_id)
        except GatewayError:
            await learn_what_was_asked(rt, request, ask)
            raise
        body = await read_json(request, rt.config.server.max_body_bytes,
                               rt.config.server.client_timeout_s)
        if isinstance(body, dict):  # a refusal still records what was asked
            ask.user_id, ask.channel = body.get("userId"), body.get("channel")
        d = parse(bot_id, body)
        ask.learn(d)
        return d
    except GatewayError as exc:
        await rt.deactivator.deny(ask, exc)
        raise


async def learn_what_was_asked(rt: Runtime, request: web.Request, ask: Ask) -> None:
    """A caller refused for its bot still has the userId and channel it sent recorded."""
    try:
        body = await read_json(request, rt.config.server.max_body_bytes,
                               rt.config.server.client_timeout_s)
    except GatewayError:
        return  # the refusal stands; what could not be read is not recorded
    if isinstance(body, dict):
        ask.user_id, ask.channel = body.get("userId"), body.get("channel")


class InFlight:
    """`async with InFlight(rt, ask)`: counts the request, sheds it (audited) when full."""

    def __init__(self, rt: Runtime, ask: Ask) -> None:
        self.rt, self.ask = rt, ask
        self.task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> None:
        self.task = asyncio.current_task()
        try:
            self.rt.admit(self.task)
        except Overloaded as exc:
            await self.rt.deactivator.deny(self.ask, exc)
            raise

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        try:
            if exc is not None and not isinstance(exc, GatewayError):
                await self.rt.deactivator.abandon(self.ask, cut_short(exc))
        finally:
            self.rt.leave(self.task)


async def deactivate_simplified(request: web.Request) -> web.Response:
    """The simplified route as aiohttp's router serves it: the requests the express lane
    (`express.py`) leaves to the general path, which decides and audits each of them."""
    rt = runtime(request)
    ask = new_ask(rt, request, ROUTE_SIMPLE, bot_id=request.match_info["botId"])
    caller = await authenticated(rt, request, ask)
    async with InFlight(rt, ask):
        d = await _admitted(rt, request, ask, caller, rt.validator.simplified)
        await rt.deactivator.deactivate(ask, caller, d)
    return json_answer({"success": True, "botId": d.bot_id, "userId": d.user_id,
                        "channel": d.channel, "requestId": ask.request_id})


async def deactivate_kore(request: web.Request) -> web.Response:
    """Kore.ai's own route and body; Kore.ai's 400/404 pass through as Kore.ai sent them."""
    rt = runtime(request)
    ask = new_ask(rt, request, ROUTE_KORE, bot_id=request.match_info["botId"])
    caller = await authenticated(rt, request, ask)
    async with InFlight(rt, ask):
        d = await _admitted(rt, request, ask, caller, rt.validator.kore_compatible)
        try:
            body = await rt.deactivator.deactivate(ask, caller, d)
        except UpstreamRejected as exc:
            return kore_passthrough(exc)
    return web.json_response(body, status=ask.trace.upstream_status or 200)  # Kore.ai's own


def kore_passthrough(exc: UpstreamRejected) -> web.Response:
    if isinstance(exc.upstream_body, dict | list):
        return web.json_response(exc.upstream_body, status=exc.status)
    return web.Response(text=str(exc.upstream_body or ""), status=exc.status)


async def deactivate_batch(request: web.Request) -> web.Response:
    rt = runtime(request)
    ask = new_ask(rt, request, ROUTE_BATCH)
    caller = await authenticated(rt, request, ask)
    async with InFlight(rt, ask):
        try:
            items = batch_items(await read_json(request, rt.config.server.max_body_bytes,
                                                rt.config.server.client_timeout_s),
                                rt.config.server.max_batch_items)
        except GatewayError as exc:
            await rt.deactivator.deny(ask, exc)
            raise
        ask.settled = True  # a well-formed batch is audited through its items only
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
        ask = item_ask(batch, caller, index, item)
        try:
            async with gate:
                return await batch_item(rt, caller, ask, index, item)
        except asyncio.CancelledError as exc:  # a shutdown: items not yet started too
            await rt.deactivator.abandon(ask, cut_short(exc))
            raise

    return list(await asyncio.gather(*(one(i, item) for i, item in enumerate(items))))


def item_ask(batch: Ask, caller: Caller, index: int, item: Any) -> Ask:
    ask = Ask(f"{batch.request_id}.{index}", ROUTE_BATCH, caller=caller.name,
              client=batch.client)
    if isinstance(item, dict):
        ask.bot_id, ask.user_id, ask.channel = (item.get(k) for k in ("botId", "userId",
                                                                      "channel"))
    return ask


async def batch_item(rt: Runtime, caller: Caller, ask: Ask, index: int, item: Any
                     ) -> dict[str, Any]:
    result: dict[str, Any] = {"index": index, "botId": ask.bot_id, "userId": ask.user_id}
    try:
        try:
            d = rt.validator.batch_item(item, index, caller.authorize)
        except GatewayError as exc:
            await rt.deactivator.deny(ask, exc)
            raise
        ask.learn(d)
        await rt.deactivator.deactivate(ask, caller, d)
    except GatewayError as exc:
        return {**result, "status": exc.status, "success": False, "error": exc.as_dict()}
    except Exception as exc:  # a bug fails its item alone, still with one record
        log.exception("batch.item_unexpected_error", request_id=ask.request_id)
        error = cut_short(exc)
        await rt.deactivator.abandon(ask, error)
        return {**result, "status": error.status, "success": False, "error": error.as_dict()}
    return {**result, "status": 200, "success": True}


# --- health ---------------------------------------------------------------------------------

async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ok, detail = await runtime(request).readiness()
    return web.json_response(detail, status=200 if ok else 503)


async def metrics_text(request: web.Request) -> web.Response:
    """Prometheus text format; with several workers, the sum over all of them."""
    runtime(request).audit_disk_free()  # refreshed when scraped
    body = runtime(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi_json(request: web.Request) -> web.Response:
    """Built once per config: it takes milliseconds, and anyone may ask for it."""
    config, cache = runtime(request).config, request.app[OPENAPI]
    if cache.get("config") is not config:
        cache["body"] = json.dumps(openapi_document(config), ensure_ascii=False).encode()
        cache["config"] = config
    return web.Response(body=cache["body"], content_type="application/json", charset="utf-8")


# --- assembly -------------------------------------------------------------------------------

async def unmatched_expectation(request: web.BaseRequest) -> web.StreamResponse:
    """A request no route takes, with an `Expect` other than 100-continue: the 404 or 405 it
    gets without that header, in the envelope (`connection.GuardedRequestHandler`)."""
    assert isinstance(request, web.Request)
    refused = request.match_info.http_exception or web.HTTPExpectationFailed()

    async def refuse(_: web.Request) -> web.StreamResponse:
        raise refused

    return await envelope_middleware(request, refuse)


async def expect_handler(request: web.Request) -> None:
    """`Expect: 100-continue` is answered as aiohttp answers it; any other expectation is
    ignored (RFC 9110 lets a server answer 417, but aiohttp's 417 comes before the middleware:
    no envelope, no request ID, and no audit record for a deactivation)."""
    if request.headers.get("Expect", "").lower() == "100-continue":
        await _default_expect_handler(request)


def create_app(config: Config, *, worker: int = 0, workers: int = 1,
               metrics: Metrics | None = None) -> web.Application:
    app = web.Application(middlewares=[envelope_middleware],
                          client_max_size=config.server.max_body_bytes,
                          handler_args=handler_options(config.server))
    app[RUNTIME] = Runtime(config, worker=worker, workers=workers, metrics=metrics)
    app[OPENAPI] = {}
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post(SIMPLE_PATH, deactivate_simplified,
                        expect_handler=expect_handler)
    app.router.add_post("/v1/sessions/deactivate", deactivate_batch,
                        expect_handler=expect_handler)
    app.router.add_put("/api/public/bot/{botId}/session", deactivate_kore,
                       expect_handler=expect_handler)
    _operations_routes(app, metrics=not config.server.admin_listen)
    # Every server of this application (`serve`'s runner, a test server) asks `_handle` for
    # each request: the express lane answers the common case, and hands aiohttp's own
    # `_handle` (router, middleware, handlers) everything else.
    app._handle = ExpressLane(app[RUNTIME], app._handle)  # type: ignore[method-assign]
    return app


def create_admin_app(rt: Runtime) -> web.Application:
    """The `server.admin_listen` application: probes, metrics and the OpenAPI document only,
    served from the runtime of the API application (which starts and closes it)."""
    app = web.Application(middlewares=[envelope_middleware], client_max_size=1024,
                          handler_args=handler_options(rt.config.server))
    app[RUNTIME] = rt
    app[OPENAPI] = {}
    _operations_routes(app, metrics=True)
    return app


def _operations_routes(app: web.Application, *, metrics: bool) -> None:
    app.router.add_get("/healthz", healthz, allow_head=True, expect_handler=expect_handler)
    app.router.add_get("/readyz", readyz, allow_head=True, expect_handler=expect_handler)
    if metrics:  # with an admin listener, /metrics is served there only
        app.router.add_get("/metrics", metrics_text, expect_handler=expect_handler)
    app.router.add_get("/openapi.json", openapi_json, expect_handler=expect_handler)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    await rt.start()
    log.info("gateway.started", worker=rt.worker, audit=str(rt.audit.path),
             upstream=upstream_host(rt.config.upstream.base_url),
             apps=[a.name for a in rt.config.apps])
    if rt.worker == 0:  # once per start, not once per worker
        for warning in config_warnings(rt.config):
            log.warning("config.warning", file=rt.config.source, key=warning.key,
                        message=warning.message)
    yield
    await rt.close()
