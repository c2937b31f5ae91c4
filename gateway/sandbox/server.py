"""A local emulator of the Kore.ai session API: the "upstream" of tests, the demo and benchmarks.

It verifies the JWT as Kore.ai would (its own PyJWT checks: `appId`, algorithm, signature,
`exp`, `iat`, and for a token with a `jti` the 1-hour cap and replay), checks path and body,
answers in Kore.ai's error shape `{"errors": [{"msg", "code"}]}`, records every call to a
session path and injects faults. Each emulated behaviour and its source is listed in
docs/kore.md. The JWT checks are `jwt.py`'s, the fault values `faults.py`'s and the
`kore-gateway sandbox` command `cli.py`'s; token minting is `gateway.kore.tokens`' and the
upstream client `gateway.kore.client`'s.

A call to a session path is handled in this order:

1. recorded in `calls` (status 0 until answered; it stays 0 when dropped);
2. any method but `PUT` → 405;
3. faults, in order: drop (connection closed, no answer) · latency · `reject_token_next` (401) ·
   `fail_first`, then `error_rate` (`error_status`) · `rate_429` · per-bot `limits` (sliding
   logs on `clock`, each window `limit_scale` times as long; only an accepted call counts);
   all of them only for the botIds matching a `bots` glob, when `bots` is given. Both rate
   faults answer as `limit_answer` says: 429 + Retry-After (`retry_after_header` verbatim,
   else `retry_after_s`, else for `limits` the honest wait), or Kore.ai's documented message
   without Retry-After; either on `limit_status`;
4. JWT from the `auth` header → 401 (`jwt.py`: Kore.ai's "Invalid SDK credentials" / code 4002
   for no token, an unknown `appId` or a bad signature; its jti messages);
5. body (`application/json` object: `userId`, `status` = "inactive", `channel`) → 400;
6. botId outside `known_bots` → 404;
7. 200 `{"success": true}`, or the odd 2xx of `odd_success` (an empty 200, a 204, or
   `{"success": "true"}`).

With `echo_token`, every error answer quotes the JWT it was sent, as a careless upstream might.

Token times (`exp`, `iat` ≤ 60 s ahead, `nbf`) and limit windows are read from `clock`, so tests
never sleep. `fail_first` and `reject_token_next` count down as they fire, so setting either at
run time means "the next N calls". Recorded headers (the `auth` JWT included, never a secret)
are looked up case-insensitively. Control routes (`/__sandbox/calls|faults|stats`, `/healthz`) let
tests in other processes read calls and stats and change faults.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from http import HTTPStatus
from typing import Any, NoReturn
from urllib.parse import unquote

from aiohttp import web

from gateway.sandbox.faults import KORE_RATE_LIMIT_MESSAGE, FaultError, Faults, checked_faults
from gateway.sandbox.jwt import (
    INVALID_CREDENTIALS,
    KORE_AUTH_CODE,
    SandboxApp,
    TokenChecker,
    TokenRejected,
)

__all__ = [
    "DEFAULT_KNOWN_BOTS",
    "DEFAULT_SESSION_PATH",
    "NOT_ANSWERED",
    "Faults",
    "Headers",
    "KoreSandbox",
    "RecordedCall",
    "SandboxApp",
    "compile_path",
]

DEFAULT_SESSION_PATH = "/api/public/bot/{botId}/session"
DEFAULT_KNOWN_BOTS = ("st-*",)
NOT_ANSWERED = 0  # RecordedCall.status while in flight, and for ever when dropped
BODY_FIELDS = frozenset({"userId", "status", "channel"})


class Headers(dict[str, str]):
    """Request headers under lower-cased names; lookups ignore case. Repeats are joined by ", "."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __setitem__(self, name: str, value: str) -> None:
        super().__setitem__(name.lower(), value)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(name.lower(), default)


@dataclass
class RecordedCall:
    """One call to a session path. `path` is as sent (percent-encoded); `bot_id` is decoded."""

    method: str
    path: str
    bot_id: str | None
    headers: dict[str, str]
    body: Any  # the parsed JSON, else the text, else None
    claims: dict[str, Any] | None  # set once the JWT is verified
    status: int
    at: float


class _KoreError(Exception):
    """An answer in Kore.ai's error shape; `code` is the HTTP status unless Kore.ai uses its
    own (4002 for credentials)."""

    def __init__(self, status: int, msg: str, headers: Mapping[str, str] | None = None,
                 code: int | None = None) -> None:
        super().__init__(msg)
        self.status, self.msg, self.headers = status, msg, headers
        self.code = status if code is None else code

    def response(self) -> web.Response:
        body = {"errors": [{"msg": self.msg, "code": self.code}]}
        return web.json_response(body, status=self.status, headers=self.headers)


def _unauthorized(rejected: TokenRejected) -> _KoreError:
    return _KoreError(401, rejected.msg, code=rejected.code)


def _bad_request(msg: str) -> _KoreError:
    return _KoreError(400, msg)


def _rate_limited(faults: Faults, retry_after_s: float) -> _KoreError:
    """A refusal for the rate limit, as `faults.limit_answer` says."""
    if faults.limit_answer == "kore":
        return _KoreError(faults.limit_status, KORE_RATE_LIMIT_MESSAGE)
    retry = faults.retry_after_header
    if retry is None:
        retry = str(max(0, math.ceil(retry_after_s)))
    return _KoreError(faults.limit_status, "Too Many Requests", {"Retry-After": retry})


class KoreSandbox:
    """The emulator's state (apps, recorded calls, faults, windows) and its aiohttp routes."""

    def __init__(
        self,
        apps: Sequence[SandboxApp],
        *,
        enforce_jti: bool = False,
        session_paths: Sequence[str] = (DEFAULT_SESSION_PATH,),
        known_bots: Sequence[str] = DEFAULT_KNOWN_BOTS,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tokens = TokenChecker(apps, enforce_jti=enforce_jti, clock=clock)
        self._paths = [compile_path(template) for template in session_paths]
        self._known_bots = tuple(known_bots)
        self._clock = clock
        self._windows: dict[tuple[str, int, float], deque[float]] = {}
        self._by_status: Counter[int] = Counter()
        self._rng = random.Random()
        self.calls: list[RecordedCall] = []
        self.faults = faults if faults is not None else Faults()

    @property
    def faults(self) -> Faults:
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults
        self._rng.seed(faults.seed)
        self._windows.clear()

    def set_apps(self, apps: Sequence[SandboxApp]) -> None:
        """Replaces the credentials accepted, as when a Kore.ai app's secret is regenerated."""
        self._tokens.set_apps(apps)

    def create_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/__sandbox/calls", self._get_calls)
        app.router.add_delete("/__sandbox/calls", self._delete_calls)
        app.router.add_get("/__sandbox/faults", self._get_faults)
        app.router.add_put("/__sandbox/faults", self._put_faults)
        app.router.add_get("/__sandbox/stats", self._get_stats)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    def stats(self) -> dict[str, Any]:
        """Answered calls by status, dropped ones apart; `upstream_429` counts every 429 sent."""
        answered = {str(s): n for s, n in sorted(self._by_status.items()) if s != NOT_ANSWERED}
        return {
            "total": sum(self._by_status.values()),
            "by_status": answered,
            "dropped": self._by_status[NOT_ANSWERED],
            "upstream_429": self._by_status[429],
        }

    # --- session calls -------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        bot_id = self._match(request.rel_url.raw_path)
        if bot_id is None:
            return _KoreError(404, "Not found").response()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:  # answered in Kore.ai's shape like the rest
            return _KoreError(413, "Request Entity Too Large").response()
        call = self._record(request, bot_id, raw)
        try:
            await self._handle(request, call, raw)
            response = _success(self._faults.odd_success)
        except _KoreError as error:
            if self._faults.echo_token and "auth" in call.headers:
                error.msg = f"{error.msg} (auth: {call.headers['auth']})"
            response = error.response()
        self._finish(call, response.status)
        return response

    def _record(self, request: web.Request, bot_id: str, raw: bytes) -> RecordedCall:
        call = RecordedCall(
            method=request.method,
            path=request.rel_url.raw_path,
            bot_id=bot_id,
            headers=_headers(request),
            body=_body_for_record(raw),
            claims=None,
            status=NOT_ANSWERED,
            at=self._clock(),
        )
        self.calls.append(call)
        return call

    def _match(self, raw_path: str) -> str | None:
        for pattern in self._paths:
            if found := pattern.fullmatch(raw_path):
                return unquote(found["botId"])
        return None

    async def _handle(self, request: web.Request, call: RecordedCall, raw: bytes) -> None:
        if request.method != "PUT":
            raise _KoreError(405, "Method Not Allowed", {"Allow": "PUT"})
        windows = await self._apply_faults(request, call)
        try:
            call.claims = self._tokens.check(request.headers.get("auth"))
        except TokenRejected as rejected:
            raise _unauthorized(rejected) from None
        _check_body(request.content_type, raw)
        if not any(fnmatchcase(call.bot_id or "", glob) for glob in self._known_bots):
            raise _KoreError(404, "Bot not found")
        now = self._clock()
        for window in windows:  # only an accepted call counts in the limits' windows
            window.append(now)

    def _finish(self, call: RecordedCall, status: int) -> None:
        call.status = status
        self._by_status[status] += 1

    # --- faults --------------------------------------------------------------------------

    async def _apply_faults(self, request: web.Request, call: RecordedCall
                            ) -> list[deque[float]]:
        """Raises the fault that fires, if one does; returns the `limits` windows the call
        counts in once it is accepted."""
        faults = self._faults
        if faults.bots and not any(fnmatchcase(call.bot_id or "", g) for g in faults.bots):
            return []
        if self._roll(faults.drop_rate):
            self._finish(call, NOT_ANSWERED)
            _drop(request)
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.reject_token_next > 0:
            faults.reject_token_next -= 1
            raise _unauthorized(TokenRejected(INVALID_CREDENTIALS, KORE_AUTH_CODE))
        if faults.fail_first > 0:
            faults.fail_first -= 1
            raise _KoreError(faults.error_status, _reason(faults.error_status))
        if self._roll(faults.error_rate):
            raise _KoreError(faults.error_status, _reason(faults.error_status))
        if self._roll(faults.rate_429):
            raise _rate_limited(faults, faults.retry_after_s)
        return self._check_limits(call.bot_id or "")

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def _check_limits(self, bot_id: str) -> list[deque[float]]:
        """Sliding-window log per bot and window: an accepted call counts for `per_s` seconds
        (a call refused for any reason, the limit's included, counts in none)."""
        now = self._clock()
        scale = self._faults.limit_scale
        limits = [(calls, per_s * scale) for calls, per_s in self._faults.limits]
        windows = [self._window(bot_id, calls, per_s, now) for calls, per_s in limits]
        waits = [
            window[len(window) - calls] + per_s - now
            for (calls, per_s), window in zip(limits, windows, strict=True)
            if len(window) >= calls
        ]
        if waits:
            raise _rate_limited(self._faults, max(waits))
        return windows

    def _window(self, bot_id: str, calls: int, per_s: float, now: float) -> deque[float]:
        window = self._windows.setdefault((bot_id, calls, per_s), deque())
        while window and window[0] <= now - per_s:
            window.popleft()
        return window

    # --- control routes ------------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _get_calls(self, request: web.Request) -> web.Response:
        return web.json_response([dataclasses.asdict(call) for call in self.calls])

    async def _delete_calls(self, request: web.Request) -> web.Response:
        self.calls.clear()
        self._by_status.clear()
        return web.Response(status=204)

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(dataclasses.asdict(self._faults))

    async def _put_faults(self, request: web.Request) -> web.Response:
        try:
            patch = await request.json()
            changes = checked_faults(patch)
        except FaultError as error:
            return _bad_request(str(error)).response()
        except ValueError:
            return _bad_request("body: must be a JSON object").response()
        for name, value in changes.items():
            setattr(self._faults, name, value)
        if "seed" in changes:
            self._rng.seed(self._faults.seed)
        if "limits" in changes or "limit_scale" in changes:
            self._windows.clear()
        return web.json_response(dataclasses.asdict(self._faults))

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())


def compile_path(template: str) -> re.Pattern[str]:
    before, found, after = template.partition("{botId}")
    if not template.startswith("/") or not found or "{" in before + after:
        raise ValueError(f"session path {template!r}: must start with / and hold {{botId}} once")
    return re.compile(re.escape(before) + "(?P<botId>[^/]+)" + re.escape(after))


def _headers(request: web.Request) -> Headers:
    headers = Headers()
    for name, value in request.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _body_for_record(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _drop(request: web.Request) -> NoReturn:
    """Close the connection without an answer, as a crashed upstream or a proxy would."""
    if request.transport is not None:
        request.transport.close()
    # aiohttp treats a cancelled handler as a client gone away: no response, no 500, no log line.
    raise asyncio.CancelledError


def _success(odd: str) -> web.Response:
    """Kore.ai's `{"success": true}`, or the odd 2xx the `odd_success` fault asks for."""
    if odd == "empty":
        return web.Response(status=200, content_type="application/json")
    if odd == "no_content":
        return web.Response(status=204)
    if odd == "string_true":
        return web.json_response({"success": "true"})
    return web.json_response({"success": True})


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _check_body(content_type: str, raw: bytes) -> None:
    if content_type != "application/json":
        raise _bad_request("Content-Type: must be application/json")
    try:
        body = json.loads(raw)
    except ValueError:
        raise _bad_request("body: must be valid JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("body: must be a JSON object")
    if unknown := sorted(set(body) - BODY_FIELDS):
        raise _bad_request(f"{unknown[0]}: unknown field")
    if not isinstance(body.get("userId"), str) or not body["userId"]:
        raise _bad_request("userId: required, a non-empty string")
    if body.get("status", "inactive") != "inactive":
        raise _bad_request('status: must be "inactive"')
    if not isinstance(body.get("channel", ""), str):
        raise _bad_request("channel: must be a string")
