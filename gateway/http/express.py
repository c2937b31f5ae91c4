"""The express lane: the simplified route's common case, served before aiohttp's router.

Most calls are a `POST /v1/bots/{botId}/sessions/deactivate` from a known caller, for a bot
it may touch, with a small plain JSON body that arrived with the head. `ExpressLane` serves
those in one coroutine: what the router, the envelope middleware and the route's handler
(`app.deactivate_simplified`) would do, in their order, calling the same functions: the
authenticator, the input rules, `Runtime.admit`, `Deactivator.deactivate` (the core: rate
limit, circuit, audit records, the PUT and its retries, and every refusal's record), and the
envelope's `error_response` and `account`. Every outcome is the general path's: the same
answers, records, metrics and log lines (tests/http/test_express.py serves each case both
ways and compares).

Why: the router's match, aiohttp's middleware chain and the layers between the request and
the core were about 50 Python calls of a deactivation's 430 and three more coroutines each of
its waits resumes. With the audit log's idle commit, the lane took about 9 % off the CPU time
of a deactivation and 0.05 ms off its paced p50 (docs/benchmarks/README.md, "The express lane
and the idle commit").

Anything else goes to aiohttp's own handling (`Application._handle`: the router, the
middleware, the handlers) before the lane has done anything that shows: another route or
method, an `Expect` or `Content-Encoding` header, a body not yet whole, not plain JSON or
not one the common case takes, no single `Authorization` header or a key that does not
authenticate, a bot the caller may not touch or that is not valid, a draining or full
gateway. Those requests take the general path as if the lane were not there (the body read
by the lane is read again from aiohttp's buffer).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.hdrs import AUTHORIZATION, CONTENT_ENCODING, EXPECT, X_FORWARDED_FOR

from gateway.deactivation import ROUTE_SIMPLE, Ask
from gateway.errors import GatewayError, Unauthenticated
from gateway.http.envelope import (
    REQUEST_ID_VAR,
    account,
    cut_short,
    error_response,
    json_answer,
    request_id_of,
)
from gateway.http.runtime import Runtime
from gateway.validation import plain_simplified

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The route's path as sent, with a botId the router would match as it stands: printable ASCII
# without `/`, `%` (no percent-decoding), `?` or `#` (no query string). Any other path, an
# encoded botId included, goes to the router.
SIMPLE_PATH = "/v1/bots/{botId}/sessions/deactivate"  # the route as registered, and its label
PATH = re.compile(r"/v1/bots/([!$&'()*+,.0-9:;=@A-Z_a-z~-]+)/sessions/deactivate")


class ExpressLane:
    """The API application's request handler: the common case here, the rest to `general`."""

    def __init__(self, rt: Runtime, general: Handler) -> None:
        self.rt = rt
        self.general = general
        self.served = 0  # requests the lane served itself (read by the tests)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        found = PATH.fullmatch(request.raw_path)
        if found is None or request.method != "POST":
            return await self.general(request)
        rt = self.rt
        server = rt.config.server
        headers = request.headers
        length = request.content_length
        if (rt.draining or rt.in_flight >= server.max_in_flight or length is None
                or length > server.max_body_bytes or EXPECT in headers
                or CONTENT_ENCODING in headers or not request.content.is_eof()
                or request.content_type != "application/json" or request.charset is not None):
            return await self.general(request)
        keys = headers.getall(AUTHORIZATION, ())
        bot_id = found.group(1)
        if len(keys) != 1 or not rt.validator.known_bot(bot_id):
            return await self.general(request)
        try:
            caller = rt.auth.authenticate(keys[0])
        except Unauthenticated:
            return await self.general(request)  # refused there, within the keyless budget
        if not caller.may_touch(bot_id):
            return await self.general(request)
        d = plain_simplified(bot_id, await request.read())  # whole: no wait
        if d is None:
            return await self.general(request)

        # From here on, as the envelope middleware and `deactivate_simplified` do it.
        self.served += 1
        request_id = request_id_of(request)
        bound = REQUEST_ID_VAR.set(request_id)
        try:
            ask = Ask(request_id, ROUTE_SIMPLE, started=started, caller=caller.name,
                      client=rt.proxies.client(request.remote,
                                               headers.getall(X_FORWARDED_FOR, ())),
                      bot_id=bot_id, user_id=d.user_id, channel=d.channel)
            task = asyncio.current_task()
            try:
                try:
                    rt.admit(task)
                except GatewayError as exc:  # (`Overloaded`: checked above; kept exact)
                    await rt.deactivator.deny(ask, exc)
                    raise
                try:
                    await rt.deactivator.deactivate(ask, caller, d)
                except GatewayError:
                    raise
                except BaseException as exc:  # cut short: as `deactivate_simplified` does
                    await rt.deactivator.abandon(ask, cut_short(exc))
                    raise
                finally:
                    rt.leave(task)
                response = json_answer({"success": True, "botId": bot_id,
                                        "userId": d.user_id, "channel": d.channel,
                                        "requestId": request_id})
            except GatewayError as exc:
                response = error_response(exc, request_id)
            except Exception:
                log.exception("request.unexpected_error", route=SIMPLE_PATH)  # as the middleware
                response = error_response(
                    GatewayError("an unexpected error occurred; it has been logged"), request_id)
            account(rt, request, response, request_id, SIMPLE_PATH, caller.name,
                    time.monotonic() - started)
            return response
        finally:
            REQUEST_ID_VAR.reset(bound)
