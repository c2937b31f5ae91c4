"""The Kore.ai session PUT on one shared `ClientSession`, with retries inside a deadline.

Raises only the `UpstreamError` family: no aiohttp exception escapes this module. Knows
nothing of callers or the audit log; the core (`deactivation.py`) passes a `CallTrace` that
this module fills with the attempt count and the last upstream status.

Kore.ai's rate-limit answer (a 429, or its message "Rate limit for this API has been reached"
on any status) is reported to the rate limiter, which pauses the bot and learns its real
budget; the retry then waits for a slot like any call. Kore.ai's `Retry-After` counts only
as a finite number of seconds or an HTTP date, capped at `rate_limit.max_pause_s`.
"""

from __future__ import annotations

import asyncio
import calendar
import email.utils
import json
import math
import random
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import structlog
from yarl import URL

from gateway.config.model import KoreApp, UpstreamConfig, upstream_host
from gateway.errors import (
    RateLimited,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.kore.scrub import scrub
from gateway.kore.tokens import TokenCache, remember
from gateway.metrics import Metrics
from gateway.ratelimit.memory import Grant, RateLimiter
from gateway.validation import Deactivation

log = structlog.get_logger(__name__)

_NOT_SENT_IN_TIME = "the deadline passed before the call could be sent to Kore.ai"
MAX_ANSWER_BYTES = 65536  # Kore.ai's answers are small; never buffer an unbounded one
MIN_ATTEMPT_S = 0.05  # a retry with less time than this before the deadline is not started
STATIC_HEADERS = {"Content-Type": "application/json"}  # on every call, exactly once
DEFAULT_MAX_PAUSE_S = 3600.0  # rate_limit.max_pause_s
# Kore.ai's words when its limit is spent, lower-cased (docs/xo/apis/automation/rate-limit.md)
RATE_LIMIT_MESSAGE = "rate limit for this api has been reached"
MAX_SCANNED_STRINGS = 64  # of an answer body, when looking for Kore.ai's message
_SECONDS = re.compile(r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?")
_ASCTIME = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|"
                      r"Sep|Oct|Nov|Dec) [ 0-9][0-9] [0-9]{2}:[0-9]{2}:[0-9]{2} [0-9]{4}")


@dataclass(slots=True)
class CallTrace:
    """What happened upstream for one caller request, and the rate-limit grant of the attempt
    in progress (reported back when Kore.ai refuses it for its limit)."""

    attempts: int = 0
    upstream_status: int | None = None
    grant: Grant | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any
    retry_after_s: float | None


def session_url(config: UpstreamConfig, bot_id: str) -> URL:
    """`base_url` + `session_path` with the botId percent-encoded: it never adds a segment."""
    path = config.session_path.replace("{botId}", quote(bot_id, safe=""))
    return URL(config.base_url + path, encoded=True)


def request_body(d: Deactivation) -> bytes:
    """Kore.ai's body. Its values are texts the input rules accepted (no lone surrogate, no
    control character), which orjson writes as `jsoncodec.compact` would."""
    body: dict[str, Any] = {"userId": d.user_id, "status": "inactive"}
    if d.channel is not None:
        body["channel"] = d.channel
    return orjson.dumps(body)


def ssl_context(config: UpstreamConfig) -> ssl.SSLContext:
    """TLS verification is always on; `ca_file` adds a private CA."""
    return ssl.create_default_context(cafile=config.ca_file)


def parse_retry_after(value: str | None, now: float | None = None, *,
                      cap_s: float = DEFAULT_MAX_PAUSE_S) -> float | None:
    """`Retry-After` as seconds from now: a finite, non-negative number of seconds or an HTTP
    date, capped at `cap_s`. Anything else (`1e999`, `nan`, `-1`, garbage) is None: absent."""
    if not value:
        return None
    value = value.strip()
    if _SECONDS.fullmatch(value):
        seconds = float(value)
        return min(seconds, cap_s) if math.isfinite(seconds) else None
    try:
        if _ASCTIME.fullmatch(value):  # the third HTTP-date form (RFC 9110 §5.6.7), in GMT
            at = float(calendar.timegm(time.strptime(value, "%a %b %d %H:%M:%S %Y")))
        else:
            when = email.utils.parsedate_to_datetime(value)
            if when.tzinfo is None:
                return None
            at = when.timestamp()
        delta = at - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    return min(max(0.0, delta), cap_s)


def is_rate_limit_answer(status: int, body: Any) -> bool:
    """An upstream 429, or Kore.ai's message "Rate limit for this API has been reached" in the
    body of an answer of any status."""
    return status == 429 or any(RATE_LIMIT_MESSAGE in text.lower() for text in _strings(body))


def _strings(body: Any) -> list[str]:
    """The strings of a parsed answer, in a bounded walk (an answer is at most 64 KiB)."""
    found: list[str] = []
    todo = [body]
    while todo and len(found) < MAX_SCANNED_STRINGS:
        item = todo.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item[:MAX_SCANNED_STRINGS])
    return found


def kore_message(body: Any) -> str:
    """The human message inside a Kore.ai error answer."""
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("msg", ""))[:300]
        for name in ("message", "msg", "error"):
            if isinstance(body.get(name), str):
                return str(body[name])[:300]
    if isinstance(body, str):
        return body[:300]
    return ""


class KoreClient:
    """Sends the session PUT; one instance (and one connection pool) per process."""

    def __init__(self, config: UpstreamConfig, tokens: TokenCache, limiter: RateLimiter, *,
                 rng: Callable[[], float] = random.random,
                 metrics: Metrics | None = None,
                 max_pause_s: float = DEFAULT_MAX_PAUSE_S) -> None:
        self.config = config
        self.max_pause_s = max_pause_s
        self._metrics = metrics if metrics is not None else Metrics()
        self.tokens = tokens
        self.limiter = limiter
        self._rng = rng
        self._session: aiohttp.ClientSession | None = None
        self.host = upstream_host(config.base_url)  # never with user:password@
        self._urls: dict[str, URL] = {}  # bot → session URL (`remember`)

    async def start(self) -> None:
        secure = self.config.base_url.startswith("https:")
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections, ssl=ssl_context(self.config) if secure else False,
            enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",), raise_for_status=False,
            headers=STATIC_HEADERS)  # built once; each call adds only `auth` and X-Request-ID
        # aiohttp silently resends an idempotent request once when a kept-alive connection
        # drops. Our own retry loop does that, counted in `attempts` and with a fresh jti, so
        # the hidden resend is switched off (no public switch exists).
        self._session._retry_connection = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def deactivate(self, app: KoreApp, d: Deactivation, request_id: str, deadline: float,
                         trace: CallTrace) -> Any:
        """Closes the session upstream; returns Kore.ai's answer body or raises UpstreamError.

        The first attempt's rate-limit slot is taken by the caller; later attempts take their own.
        """
        url = self._urls.get(d.bot_id) or self._url(d.bot_id)
        payload = request_body(d)
        counted = 0
        reminted = False
        error: UpstreamError | None = None
        paused = False  # the rate limiter paused the bot after Kore.ai's rate-limit answer
        while True:
            if trace.attempts:
                trace.grant = await self._retry_slot(d.bot_id, deadline, error)
            token = self.tokens.ready(app) or await self.tokens.token(app)
            if trace.grant is not None:
                trace.grant = await self.limiter.sending(d.bot_id, trace.grant, deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # spent before this attempt: nothing of it is sent or counted
                raise UpstreamTimeout(_NOT_SENT_IN_TIME)
            trace.attempts += 1
            try:
                answer = await self._send(url, token.value, payload, request_id, remaining)
            except UpstreamTimeout:
                raise
            except UpstreamError as exc:
                error = exc
            else:
                trace.upstream_status = answer.status
                if answer.status in (401, 403) and not reminted and not is_rate_limit_answer(
                        answer.status, answer.body):
                    # Our token was refused: drop it and try once with a fresh one.
                    self.tokens.drop(app, token)
                    reminted, error = True, None
                    log.warning("upstream.token_rejected", app=app.name, status=answer.status,
                                kore_message=kore_message(answer.body))
                    continue
                body = answer.body
                if 200 <= answer.status < 300 and type(body) is dict and (
                        body.get("success") is True):
                    return body
                judged = self._judge(answer)
                paused = isinstance(judged, UpstreamRateLimited) and await self._learn(
                    d.bot_id, trace, answer, judged)
                error = judged
            counted += 1
            await self._before_retry(error, counted, deadline, request_id, paused)

    def _url(self, bot_id: str) -> URL:
        """`session_url`, built once per bot (a `remember` memo: cachetools' LRUCache measured
        about 9,000 instructions a request)."""
        url = self._urls.get(bot_id)
        if url is None:
            url = remember(self._urls, bot_id, session_url(self.config, bot_id))
        return url

    async def _learn(self, bot_id: str, trace: CallTrace, answer: Answer,
                     error: UpstreamRateLimited) -> bool:
        """Kore.ai said the bot's limit is spent: the limiter pauses the bot and learns (True
        when it paused). The caller's `Retry-After` is the pause, else Kore.ai's own, else 1 s."""
        grant = trace.grant if trace.grant is not None else Grant(slot=time.monotonic())
        paused = await self.limiter.refused(bot_id, grant, answer.retry_after_s)
        error.retry_after_s = paused if paused > 0 else (
            answer.retry_after_s if answer.retry_after_s is not None else 1.0)
        log.warning("upstream.rate_limited", bot_id=bot_id, upstream_status=answer.status,
                    retry_after_s=answer.retry_after_s, paused_s=round(paused, 3))
        return paused > 0

    async def _retry_slot(self, bot_id: str, deadline: float, error: UpstreamError | None
                          ) -> Grant:
        """A rate-limit slot for the next attempt. Without one in time, the caller gets the
        last attempt's error (`RateLimited` only when none failed: the re-mint after 401/403),
        with the honest `Retry-After` when Kore.ai's own limit is what holds it back."""
        try:
            return await self.limiter.acquire(bot_id, deadline)
        except RateLimited as refused:
            if error is None:
                raise
            if isinstance(error, UpstreamRateLimited):
                error.retry_after_s = refused.retry_after_s
            log.info("upstream.retry_not_started", reason="rate_limit", error=error.code)
            raise error from None

    def _judge(self, answer: Answer) -> UpstreamError:
        """The error an answer other than a success (`"success": true`) means."""
        status, body = answer.status, answer.body
        message = kore_message(body)
        if is_rate_limit_answer(status, body):
            retry = answer.retry_after_s
            return UpstreamRateLimited(
                "Kore.ai's rate limit for this bot is reached", upstream_status=status,
                retry_after_s=retry if retry is not None else 1.0)
        if 200 <= status < 300:
            # Not retried: Kore.ai took the call and may well have closed the session.
            return UpstreamUnavailable(f"Kore.ai answered {status} without success: true",
                                       upstream_status=status)
        if status in (400, 404):
            return UpstreamRejected(f"Kore.ai rejected the call ({status}): {message}".rstrip(": "),
                                    upstream_status=status, upstream_body=body)
        if status in (401, 403):
            return UpstreamAuthFailed(self._auth_failed_message(status, message),
                                      upstream_status=status)
        return UpstreamUnavailable(f"Kore.ai answered {status}", upstream_status=status)

    def _auth_failed_message(self, status: int, message: str) -> str:
        """Names the host, and the step most often missed: publishing the scope."""
        said = f" (Kore.ai said: {message})" if message else ""
        return (f"Kore.ai at {self.host} refused the gateway's credentials ({status}) after a "
                "fresh token; check the app's client ID and secret, and that the Bot Sessions "
                f"scope is assigned to the app and published in Kore.ai{said}")

    async def _before_retry(self, error: UpstreamError, counted: int, deadline: float,
                            request_id: str, paused: bool) -> None:
        """Sleeps before the next attempt, or raises `error` when no retry may start. A bot
        the rate limiter paused waits for its pause in the next attempt's slot instead."""
        status = error.upstream_status
        retryable = isinstance(error, UpstreamRateLimited) or (
            isinstance(error, UpstreamUnavailable) and (status is None or status >= 500))
        if not retryable or counted >= self.config.max_attempts:
            raise error
        delay = self._backoff(counted)
        if isinstance(error, UpstreamRateLimited) and error.retry_after_s is not None and (
                not paused):
            delay = max(delay, error.retry_after_s)
        if time.monotonic() + delay + MIN_ATTEMPT_S >= deadline:
            raise error
        log.info("upstream.retry", attempt=counted + 1, delay_s=round(delay, 3),
                 error=error.code, upstream_status=error.upstream_status, request_id=request_id)
        await asyncio.sleep(delay)

    def _backoff(self, counted: int) -> float:
        """Exponential backoff with full jitter."""
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2.0 ** (counted - 1))
        return self._rng() * cap

    async def _send(self, url: URL, token: str, payload: bytes, request_id: str,
                    remaining: float) -> Answer:
        assert self._session is not None, "KoreClient.start() was not called"
        headers = {"auth": token, "X-Request-ID": request_id}
        started = time.monotonic()
        try:
            async with self._session.put(url, data=payload, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=remaining),
                                         allow_redirects=False) as resp:
                # At once when its length is known and within the limit (aiohttp's parser stops
                # at `Content-Length`), else chunk by chunk.
                length = resp.content_length
                if length is not None and length <= MAX_ANSWER_BYTES:
                    raw = await resp.read()
                else:
                    raw = await read_bounded(resp.content, MAX_ANSWER_BYTES)
                self._metrics.upstream_attempt(resp.status, time.monotonic() - started)
                retry_after = resp.headers.get("Retry-After")
                return Answer(resp.status, decode_answer(raw), None if retry_after is None
                              else parse_retry_after(retry_after, cap_s=self.max_pause_s))
        except TimeoutError:
            self._metrics.upstream_attempt("timeout", time.monotonic() - started)
            raise UpstreamTimeout("Kore.ai did not answer within the deadline") from None
        except aiohttp.ClientError as exc:
            self._metrics.upstream_attempt("error", time.monotonic() - started)
            raise UpstreamUnavailable(f"Kore.ai could not be reached ({type(exc).__name__})"
                                      ) from None


async def read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The whole answer up to `limit` bytes: one `read()` may return only the first chunk."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def decode_answer(raw: bytes) -> Any:
    """Kore.ai's answer as JSON (else text), scrubbed of anything shaped like a JWT first
    (every JWT shape has two dots: an answer without one needs no pattern)."""
    text = raw.decode("utf-8", "replace")
    if "." in text:
        text = scrub(text)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text)  # what orjson refuses and JSON allows (integers past 64 bits)
    except (ValueError, RecursionError):  # not JSON, or nested past what json can read
        return text
