"""A local emulator of the Kore.ai session API: the "upstream" of tests, the demo and benchmarks.

It verifies the JWT as Kore.ai would (its own PyJWT checks: `appId`, algorithm, signature,
`exp`, `iat`, optional `jti` replay), checks path and body, answers in Kore.ai's error shape
`{"errors": [{"msg", "code"}]}`, records every call to a session path and injects faults.
It leaves token minting to `tokens.py` and the upstream client to `upstream.py`.

A call to a session path is handled in this order:

1. recorded in `calls` (status 0 until answered; it stays 0 when dropped);
2. any method but `PUT` → 405;
3. faults, in order: drop (connection closed, no answer) · latency · `reject_token_next` (401) ·
   `fail_first`, then `error_rate` (`error_status`) · `rate_429` (429 + Retry-After) ·
   per-bot `limits` (sliding windows on `clock`; 429 + the honest Retry-After);
4. JWT from the `auth` header → 401;
5. body (`application/json` object: `userId`, `status` = "inactive", `channel`) → 400;
6. botId outside `known_bots` → 404;
7. 200 `{"success": true}`.

Token times (`exp`, `iat` ≤ 60 s ahead, `nbf`) and limit windows are read from `clock`, so tests
never sleep. `fail_first` and `reject_token_next` count down as they fire, so setting either at
run time means "the next N calls". Recorded headers (the `auth` JWT included, never a secret)
are looked up case-insensitively. Control routes (`/__sandbox/calls|faults|stats`, `/healthz`) let
tests in other processes read calls and stats and change faults.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import math
import random
import re
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn
from urllib.parse import unquote

import jwt
from aiohttp import web
from cachetools import TLRUCache
from cryptography.hazmat.primitives import serialization

if TYPE_CHECKING:
    from gateway.config import KoreApp

DEFAULT_SESSION_PATH = "/api/public/bot/{botId}/session"
DEFAULT_KNOWN_BOTS = ("st-*",)
DEFAULT_LISTEN = "127.0.0.1:9090"
MAX_IAT_SKEW_S = 60.0  # Kore.ai accepts a token issued at most this far in its future
MAX_REMEMBERED_JTIS = 100_000  # bounded replay memory; the least recently seen go first
NOT_ANSWERED = 0  # RecordedCall.status while in flight, and for ever when dropped
ALGORITHMS = ("HS256", "HS512", "RS256", "RS512")
BODY_FIELDS = frozenset({"userId", "status", "channel"})


@dataclass
class SandboxApp:
    """Credentials Kore.ai knows: HS* → the client secret; RS* → the PEM public key."""

    client_id: str
    key: str = field(repr=False)
    algorithm: str = "HS256"

    @classmethod
    def from_kore_app(cls, app: KoreApp) -> SandboxApp:
        if app.algorithm.startswith("HS"):
            if app.client_secret is None:
                raise ValueError(f"app {app.name!r}: {app.algorithm} needs a client secret")
            return cls(app.client_id, app.client_secret.reveal(), app.algorithm)
        if app.private_key is None:
            raise ValueError(f"app {app.name!r}: {app.algorithm} needs a private key")
        return cls(app.client_id, _public_pem(app.private_key.reveal()), app.algorithm)


def _public_pem(private_pem: str) -> str:
    private_key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@dataclass
class Faults:
    """Injected faults; every default is "no fault". Mutable at run time."""

    latency_ms: float = 0.0
    error_status: int = 500  # the status of fail_first and error_rate
    error_rate: float = 0.0
    fail_first: int = 0  # counts down as it fires
    rate_429: float = 0.0
    retry_after_s: float = 1.0  # sent with rate_429, rounded up to whole seconds
    drop_rate: float = 0.0
    reject_token_next: int = 0  # counts down as it fires
    limits: list[tuple[int, float]] = field(default_factory=list)  # per bot: (calls, per_s)
    seed: int | None = None


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


class _Verifier(NamedTuple):
    algorithm: str
    key: Any  # bytes for HS*, a loaded public key for RS*


class _KoreError(Exception):
    """An answer in Kore.ai's error shape."""

    def __init__(self, status: int, msg: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(msg)
        self.status, self.msg, self.headers = status, msg, headers

    def response(self) -> web.Response:
        body = {"errors": [{"msg": self.msg, "code": self.status}]}
        return web.json_response(body, status=self.status, headers=self.headers)


def _unauthorized(msg: str) -> _KoreError:
    return _KoreError(401, msg)


def _bad_request(msg: str) -> _KoreError:
    return _KoreError(400, msg)


def _too_many_requests(retry_after_s: float) -> _KoreError:
    seconds = max(0, math.ceil(retry_after_s))
    return _KoreError(429, "Too Many Requests", {"Retry-After": str(seconds)})


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
        self._verifiers = {app.client_id: _verifier(app) for app in apps}
        self._enforce_jti = enforce_jti
        self._paths = [_compile_path(template) for template in session_paths]
        self._known_bots = tuple(known_bots)
        self._clock = clock
        self._seen_jtis: TLRUCache[tuple[str, str], float] = TLRUCache(
            MAX_REMEMBERED_JTIS, _jti_expiry, timer=clock
        )
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
        self._verifiers = {app.client_id: _verifier(app) for app in apps}

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
        raw = await request.read()
        call = self._record(request, bot_id, raw)
        try:
            await self._handle(request, call, raw)
            response = web.json_response({"success": True})
        except _KoreError as error:
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
        await self._apply_faults(request, call)
        call.claims = self._verify_token(request.headers.get("auth"))
        _check_body(request.content_type, raw)
        if not any(fnmatchcase(call.bot_id or "", glob) for glob in self._known_bots):
            raise _KoreError(404, "Bot not found")

    def _finish(self, call: RecordedCall, status: int) -> None:
        call.status = status
        self._by_status[status] += 1

    # --- faults --------------------------------------------------------------------------

    async def _apply_faults(self, request: web.Request, call: RecordedCall) -> None:
        faults = self._faults
        if self._roll(faults.drop_rate):
            self._finish(call, NOT_ANSWERED)
            _drop(request)
        if faults.latency_ms > 0:
            await asyncio.sleep(faults.latency_ms / 1000)
        if faults.reject_token_next > 0:
            faults.reject_token_next -= 1
            raise _unauthorized("Invalid token")
        if faults.fail_first > 0:
            faults.fail_first -= 1
            raise _KoreError(faults.error_status, _reason(faults.error_status))
        if self._roll(faults.error_rate):
            raise _KoreError(faults.error_status, _reason(faults.error_status))
        if self._roll(faults.rate_429):
            raise _too_many_requests(faults.retry_after_s)
        self._check_limits(call.bot_id or "")

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def _check_limits(self, bot_id: str) -> None:
        """Sliding-window log per bot and window: a call counts for `per_s` seconds."""
        now = self._clock()
        limits = list(self._faults.limits)
        windows = [self._window(bot_id, calls, per_s, now) for calls, per_s in limits]
        waits = [
            window[len(window) - calls] + per_s - now
            for (calls, per_s), window in zip(limits, windows, strict=True)
            if len(window) >= calls
        ]
        if waits:
            raise _too_many_requests(max(waits))
        for window in windows:
            window.append(now)

    def _window(self, bot_id: str, calls: int, per_s: float, now: float) -> deque[float]:
        window = self._windows.setdefault((bot_id, calls, per_s), deque())
        while window and window[0] <= now - per_s:
            window.popleft()
        return window

    # --- the JWT -------------------------------------------------------------------------

    def _verify_token(self, token: str | None) -> dict[str, Any]:
        if not token:
            raise _unauthorized("Missing auth header")
        try:
            header = jwt.get_unverified_header(token)
            app_id = jwt.decode(token, options={"verify_signature": False}).get("appId")
        except jwt.PyJWTError:
            raise _unauthorized("Invalid token") from None
        if not isinstance(app_id, str) or app_id not in self._verifiers:
            raise _unauthorized("Unknown appId")
        verifier = self._verifiers[app_id]
        if header.get("alg") != verifier.algorithm:
            raise _unauthorized("Algorithm mismatch")
        claims = _decode(token, verifier)
        self._check_times(claims)
        if self._enforce_jti:
            self._check_jti(app_id, claims)
        return claims

    def _check_times(self, claims: dict[str, Any]) -> None:
        now = self._clock()
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf", 0)
        if not all(_is_number(value) for value in (exp, iat, nbf)):
            raise _unauthorized("Invalid exp, iat or nbf claim")
        if exp <= now:
            raise _unauthorized("Token expired")
        if iat > now + MAX_IAT_SKEW_S:
            raise _unauthorized("Token issued in the future")
        if nbf > now:
            raise _unauthorized("Token not yet valid")

    def _check_jti(self, app_id: str, claims: dict[str, Any]) -> None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _unauthorized("Missing claim: jti")
        if (app_id, jti) in self._seen_jtis:
            raise _unauthorized("JTI already used")
        self._seen_jtis[(app_id, jti)] = float(claims["exp"])

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
            changes = _checked_faults(patch)
        except _KoreError as error:
            return error.response()
        except ValueError:
            return _bad_request("body: must be a JSON object").response()
        for name, value in changes.items():
            setattr(self._faults, name, value)
        if "seed" in changes:
            self._rng.seed(self._faults.seed)
        if "limits" in changes:
            self._windows.clear()
        return web.json_response(dataclasses.asdict(self._faults))

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())


def _verifier(app: SandboxApp) -> _Verifier:
    if app.algorithm not in ALGORITHMS:
        raise ValueError(f"app {app.client_id!r}: algorithm must be one of {ALGORITHMS}")
    if app.algorithm.startswith("HS"):
        return _Verifier(app.algorithm, app.key.encode())
    try:
        return _Verifier(app.algorithm, serialization.load_pem_public_key(app.key.encode()))
    except ValueError:
        raise ValueError(f"app {app.client_id!r}: key is not a PEM public key") from None


def _compile_path(template: str) -> re.Pattern[str]:
    before, found, after = template.partition("{botId}")
    if not template.startswith("/") or not found or "{" in before + after:
        raise ValueError(f"session path {template!r}: must start with / and hold {{botId}} once")
    return re.compile(re.escape(before) + "(?P<botId>[^/]+)" + re.escape(after))


def _jti_expiry(_key: tuple[str, str], exp: float, _now: float) -> float:
    return exp


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


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _decode(token: str, verifier: _Verifier) -> dict[str, Any]:
    # Time claims are checked on the sandbox clock (`_check_times`), not PyJWT's.
    options = {
        "require": ["exp", "iat"],
        "verify_exp": False,
        "verify_iat": False,
        "verify_nbf": False,
        "verify_aud": False,
    }
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            verifier.key,
            algorithms=[verifier.algorithm],
            options=options,  # type: ignore[arg-type]
        )
    except jwt.MissingRequiredClaimError as error:
        raise _unauthorized(f"Missing claim: {error.claim}") from None
    except jwt.InvalidSignatureError:
        raise _unauthorized("Invalid signature") from None
    except jwt.PyJWTError:
        raise _unauthorized("Invalid token") from None
    return claims


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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


# --- fault values: shared by PUT /__sandbox/faults and the CLI flags -------------------------


def _number(low: float, high: float = math.inf) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise TypeError("must be a number")
        number = float(value)
        if not (math.isfinite(number) and low <= number <= high):
            raise ValueError(f"must be a number from {low:g} to {high:g}")
        return number

    return check


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("must be an integer")
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be an integer from {low} to {high}")
        return number

    return check


def _seed(value: Any) -> int | None:
    return None if value is None else _integer(-(2**63), 2**63 - 1)(value)


def _limit(item: Any) -> tuple[int, float]:
    """One window: "CALLS/PER_S", [calls, per_s] or {"calls": …, "per_s": …}."""
    if isinstance(item, str) and "/" in item:
        calls, _, per_s = item.partition("/")
    elif isinstance(item, Mapping) and set(item) == {"calls", "per_s"}:
        calls, per_s = item["calls"], item["per_s"]
    elif isinstance(item, list | tuple) and len(item) == 2:
        calls, per_s = item
    else:
        raise ValueError("a limit is CALLS/PER_S, [calls, per_s] or {calls, per_s}")
    return _integer(1, 10**9)(calls), _number(0.001)(per_s)


def _limits(value: Any) -> list[tuple[int, float]]:
    if not isinstance(value, list):
        raise TypeError("must be a list of limits")
    return [_limit(item) for item in value]


_RATE = _number(0.0, 1.0)
_FAULT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "latency_ms": _number(0.0),
    "error_status": _integer(400, 599),
    "error_rate": _RATE,
    "fail_first": _integer(0, 10**9),
    "rate_429": _RATE,
    "retry_after_s": _number(0.0),
    "drop_rate": _RATE,
    "reject_token_next": _integer(0, 10**9),
    "limits": _limits,
    "seed": _seed,
}


def _checked_faults(patch: Any) -> dict[str, Any]:
    """A partial update of `Faults`, every value checked; nothing is applied on an error."""
    if not isinstance(patch, dict):
        raise _bad_request("body: must be a JSON object")
    checked = {}
    for name, value in patch.items():
        if name not in _FAULT_CHECKS:
            raise _bad_request(f"{name}: unknown field")
        try:
            checked[name] = _FAULT_CHECKS[name](value)
        except (TypeError, ValueError) as error:
            raise _bad_request(f"{name}: {error}") from None
    return checked


# --- command line ----------------------------------------------------------------------------

_FAULT_FLAGS = {
    "latency_ms": "milliseconds added before answering each call",
    "error_status": "status of --fail-first and --error-rate answers (default 500)",
    "error_rate": "fraction of calls answered with --error-status",
    "fail_first": "the first N calls are answered with --error-status",
    "rate_429": "fraction of calls answered 429 with Retry-After",
    "retry_after_s": "Retry-After sent with --rate-429 (default 1)",
    "drop_rate": "fraction of calls whose connection is closed without an answer",
    "reject_token_next": "the next N calls get 401 as if the token were rejected",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `kore-gateway sandbox` flags; `--listen` stays "HOST:PORT" text, checked for loopback."""
    parser.add_argument(
        "--listen",
        type=_arg(_listen_address),
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="loopback address (default 127.0.0.1:9090)",
    )
    parser.add_argument(
        "--enforce-jti",
        action="store_true",
        help='reject a token without a "jti" or with one seen before',
    )
    for name, help_text in _FAULT_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=_arg(_FAULT_CHECKS[name]), help=help_text)
    parser.add_argument(
        "--limit",
        dest="limits",
        action="append",
        type=_arg(_limit),
        metavar="CALLS/PER_S",
        help="per-bot window, repeatable (e.g. 600/60)",
    )
    parser.add_argument(
        "--known-bot",
        action="append",
        metavar="GLOB",
        help="botId glob that exists, repeatable (default st-*)",
    )
    parser.add_argument(
        "--session-path",
        action="append",
        type=_arg(_session_path),
        metavar="TEMPLATE",
        help=f"repeatable (default {DEFAULT_SESSION_PATH})",
    )
    parser.add_argument("--seed", type=_arg(_seed), help="seed of the fault dice")


def sandbox_from_args(args: argparse.Namespace, apps: Sequence[SandboxApp]) -> KoreSandbox:
    given = {name: getattr(args, name, None) for name in _FAULT_CHECKS}
    faults = Faults(**{name: value for name, value in given.items() if value is not None})
    return KoreSandbox(
        apps,
        enforce_jti=args.enforce_jti,
        session_paths=args.session_path or (DEFAULT_SESSION_PATH,),
        known_bots=args.known_bot or DEFAULT_KNOWN_BOTS,
        faults=faults,
    )


def run_sandbox(sandbox: KoreSandbox, host: str, port: int) -> None:
    """Serve until interrupted; the socket is bound first so the printed URL is real."""
    if not _is_loopback(host):
        raise ValueError(f"sandbox listen address {host!r}: must be loopback")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family)
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    web.run_app(
        sandbox.create_app(),
        sock=sock,
        print=lambda _banner: print(f"sandbox listening on {url}", flush=True),
    )


def _arg(check: Callable[[Any], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return check(text)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _listen_address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not _is_loopback(host.removeprefix("[").removesuffix("]")):
        raise ValueError(f"{text!r}: must be HOST:PORT on loopback (127.0.0.0/8, ::1, localhost)")
    _integer(0, 65535)(port)
    return text


def _session_path(template: str) -> str:
    _compile_path(template)
    return template


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
