"""Tests for gateway.kore.client: Retry-After parsing, backoff with full jitter, and the retry loop
inside one deadline against a scripted local upstream (a real aiohttp server on loopback)."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.model import Config, UpstreamConfig
from gateway.errors import (
    RateLimited,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.kore.client import CallTrace, KoreClient, parse_retry_after, session_url
from gateway.kore.tokens import TokenCache
from gateway.ratelimit.memory import MemoryRateLimiter, RateLimiter, Unlimited
from gateway.validation import Deactivation

BOT = "st-test-bot"
NOW = 1_800_000_000.0


def http_date(seconds_from_now: float, now: float = NOW) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(now + seconds_from_now, UTC),
                                       usegmt=True)


class TestParseRetryAfter:
    @pytest.mark.parametrize(("value", "expected"), [
        ("3", 3.0), (" 7 ", 7.0), ("0", 0.0), ("1.5", 1.5), ("1e2", 100.0),
    ], ids=["seconds", "padded", "zero", "fraction", "exponent"])
    def test_delay_seconds(self, value: str, expected: float) -> None:
        assert parse_retry_after(value, now=NOW) == expected

    @pytest.mark.parametrize("value", ["86400", "1e5", "99999999999999999999"],
                             ids=["a-day", "exponent", "huge"])
    def test_capped_at_max_pause(self, value: str) -> None:
        assert parse_retry_after(value, now=NOW, cap_s=3600) == 3600
        assert parse_retry_after(value, now=NOW, cap_s=60) == 60

    def test_far_http_date_is_capped(self) -> None:
        assert parse_retry_after(http_date(10 * 86400), now=NOW, cap_s=3600) == 3600
        assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now=NOW, cap_s=7) == 7

    @pytest.mark.parametrize("value", [
        "1e999", "inf", "Infinity", "nan", "NaN", "-1", "-0.5", "+3", "1_000", "0x10", "3 s",
        "\u0663", "Mon, 99 Foo 2026 99:99:99 GMT",
    ], ids=["overflow", "inf", "infinity", "nan", "nan-caps", "negative", "negative-fraction",
            "plus-sign", "underscore", "hex", "unit", "arabic-digit", "impossible-date"])
    def test_not_a_finite_number_of_seconds_is_absent(self, value: str) -> None:
        assert parse_retry_after(value, now=NOW) is None

    def test_http_date_in_the_future(self) -> None:
        assert parse_retry_after(http_date(30), now=NOW) == pytest.approx(30)

    @pytest.mark.parametrize("form", [
        "%a, %d %b %Y %H:%M:%S GMT", "%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y",
    ], ids=["imf-fixdate", "rfc850", "asctime"])
    @pytest.mark.parametrize("at", [NOW, NOW - 14 * 86400], ids=["two-digit-day", "one"])
    def test_every_http_date_form_counts(self, form: str, at: float) -> None:
        """RFC 9110 §5.6.7: three forms, all in GMT (asctime's names no zone)."""
        value = time.strftime(form, time.gmtime(at))
        assert parse_retry_after(value, now=at - 30, cap_s=3600) == pytest.approx(30), value

    def test_asctime_needs_its_exact_form(self) -> None:
        value = time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(NOW - 14 * 86400))
        assert "  1 " in value
        assert parse_retry_after(value.replace("  ", " "), now=NOW) is None  # day unpadded
        assert parse_retry_after(value.replace("Jan", "Xyz"), now=NOW) is None

    def test_http_date_in_the_past_means_now(self) -> None:
        assert parse_retry_after(http_date(-600), now=NOW) == 0.0

    def test_http_date_against_the_wall_clock(self) -> None:
        value = http_date(120, now=time.time())
        assert 118 <= (parse_retry_after(value) or 0) <= 120

    @pytest.mark.parametrize("value", [
        None, "", "soon", "Wed, 21 Oct 2015 07:28:00", "12 parsecs",
    ], ids=["absent", "empty", "word", "date-without-zone", "junk"])
    def test_absent_or_unusable_is_none(self, value: str | None) -> None:
        assert parse_retry_after(value, now=NOW) is None


class TestSessionUrl:
    @given(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40))
    def test_bot_id_is_one_percent_encoded_segment(self, bot_id: str) -> None:
        url = session_url(UpstreamConfig(base_url="https://kore.test"), bot_id)
        prefix, suffix = "/api/public/bot/", "/session"
        raw = url.raw_path
        assert raw.startswith(prefix) and raw.endswith(suffix)
        segment = raw[len(prefix):-len(suffix)]
        assert set(segment) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                   "0123456789-._~%")
        assert unquote(segment, errors="strict") == bot_id


# --- the retry loop against a scripted upstream -----------------------------------------------

Script = Sequence[tuple[int, dict[str, str]]]


class ScriptedKore:
    """Answers the session PUT from a script (the last answer repeats); records arrival times."""

    def __init__(self, script: Script) -> None:
        self.script = list(script)
        self.arrivals: list[float] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        status, headers = self.script[min(len(self.arrivals), len(self.script)) - 1]
        body: Any = {"success": True} if status == 200 else {"errors": [{"msg": "no"}]}
        return web.json_response(body, status=status, headers=headers)


Start = Callable[..., Any]


@pytest.fixture
async def scripted(aiohttp_server: Any, make_config: Any) -> AsyncIterator[Start]:
    """`await scripted(script, limiter=…, **upstream)`: (KoreClient, ScriptedKore, Config)."""
    clients: list[KoreClient] = []

    async def start(script: Script, limiter: RateLimiter | None = None,
                    **upstream: Any) -> tuple[KoreClient, ScriptedKore, Config]:
        kore = ScriptedKore(script)
        app = web.Application()
        app.router.add_put("/api/public/bot/{botId}/session", kore.handle)
        server = await aiohttp_server(app, host="127.0.0.1")
        config = make_config(str(server.make_url("")).rstrip("/"), upstream=upstream)
        client = KoreClient(config.upstream, TokenCache(config.apps), limiter or Unlimited())
        await client.start()
        clients.append(client)
        return client, kore, config

    yield start
    for client in clients:
        await client.close()


async def call(client: KoreClient, config: Config, trace: CallTrace,
               timeout_s: float | None = None) -> Any:
    deadline = time.monotonic() + (timeout_s or config.upstream.timeout_s)
    return await client.deactivate(config.apps[0], Deactivation(BOT, "u-1"), "rid-1", deadline,
                                   trace)


class TestRetries:
    async def test_a_deadline_spent_before_the_first_attempt_sends_and_counts_nothing(
            self, scripted: Start) -> None:
        client, kore, config = await scripted([(200, {})])
        trace = CallTrace()
        with pytest.raises(UpstreamTimeout, match="before the call could be sent"):
            await call(client, config, trace, timeout_s=-0.01)
        assert trace.attempts == 0 and kore.arrivals == []

    async def test_429_with_an_http_date_is_honoured(self, scripted: Start) -> None:
        wall = time.time()
        client, kore, config = await scripted(
            [(429, {"Retry-After": http_date(2, now=wall)}), (200, {})], timeout_s=5)
        trace = CallTrace()
        assert await call(client, config, trace) == {"success": True}
        assert trace.attempts == 2 and trace.upstream_status == 200
        # An HTTP date has whole seconds: "2 s from now" is between 1 and 2 s away.
        assert kore.arrivals[1] - kore.arrivals[0] >= 0.9

    async def test_429_with_delay_seconds_is_honoured(self, scripted: Start) -> None:
        client, kore, config = await scripted([(429, {"Retry-After": "1"}), (200, {})],
                                              timeout_s=5)
        trace = CallTrace()
        await call(client, config, trace)
        assert trace.attempts == 2
        assert kore.arrivals[1] - kore.arrivals[0] >= 0.95

    async def test_429_whose_date_passes_the_deadline_is_raised_at_once(
            self, scripted: Start) -> None:
        client, kore, config = await scripted(
            [(429, {"Retry-After": http_date(30, now=time.time())})], timeout_s=2)
        trace = CallTrace()
        started = time.monotonic()
        with pytest.raises(UpstreamRateLimited) as caught:
            await call(client, config, trace)
        assert time.monotonic() - started < 1
        assert trace.attempts == 1 and len(kore.arrivals) == 1
        assert 28 <= (caught.value.retry_after_s or 0) <= 30

    async def test_5xx_is_retried_up_to_max_attempts(self, scripted: Start) -> None:
        client, kore, config = await scripted([(503, {})], max_attempts=4)
        trace = CallTrace()
        with pytest.raises(UpstreamUnavailable) as caught:
            await call(client, config, trace)
        assert trace.attempts == len(kore.arrivals) == 4
        assert caught.value.upstream_status == trace.upstream_status == 503

    @pytest.mark.parametrize("status", [400, 404, 409], ids=["400", "404", "409"])
    async def test_other_answers_are_not_retried(self, scripted: Start, status: int) -> None:
        client, kore, config = await scripted([(status, {})], max_attempts=4)
        trace = CallTrace()
        with pytest.raises(UpstreamUnavailable if status == 409 else Exception):
            await call(client, config, trace)
        assert trace.attempts == len(kore.arrivals) == 1

    async def test_no_retry_starts_that_cannot_finish_before_the_deadline(
            self, scripted: Start) -> None:
        client, kore, config = await scripted([(503, {})], max_attempts=20, timeout_s=0.6,
                                              backoff_base_s=0.1, backoff_max_s=0.4)
        trace = CallTrace()
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable):
            await call(client, config, trace)
        assert time.monotonic() - started < 0.6 + 0.4  # never slept past the deadline
        assert 2 <= trace.attempts == len(kore.arrivals) < 20

    async def test_retry_without_a_rate_limit_slot_reports_the_last_upstream_error(
            self, scripted: Start) -> None:
        limiter = MemoryRateLimiter([(1, 60)])
        client, kore, config = await scripted([(503, {})], limiter=limiter, timeout_s=2)
        await limiter.acquire(BOT, time.monotonic() + 2)  # the first attempt's slot
        trace = CallTrace()
        with pytest.raises(UpstreamUnavailable) as caught:
            await call(client, config, trace)
        assert not isinstance(caught.value, RateLimited)
        assert trace.attempts == len(kore.arrivals) == 1 and trace.upstream_status == 503


class TestBackoff:
    @pytest.mark.parametrize(("counted", "cap"), [(1, 0.1), (2, 0.2), (3, 0.4), (5, 1.6),
                                                  (6, 2.0), (30, 2.0)])
    async def test_full_jitter_within_an_exponential_cap(self, make_config: Any, counted: int,
                                                         cap: float) -> None:
        config = make_config(upstream={"backoff_base_s": 0.1, "backoff_max_s": 2.0})
        draws = iter([0.0, 0.5, 1.0])
        client = KoreClient(config.upstream, TokenCache(config.apps), Unlimited(),
                            rng=lambda: next(draws))
        assert [client._backoff(counted) for _ in range(3)] == pytest.approx(
            [0.0, cap / 2, cap])


class TestAnswerReading:
    async def test_answer_split_over_several_chunks_is_read_whole(
            self, aiohttp_server: Any, make_config: Any) -> None:
        """A chunked answer arriving in pieces is still `{"success": true}`, not a 502."""
        async def handle(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b'{"succ')
            await asyncio.sleep(0.05)
            await resp.write(b'ess": true}')
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_put("/api/public/bot/{botId}/session", handle)
        server = await aiohttp_server(app, host="127.0.0.1")
        config = make_config(str(server.make_url("")).rstrip("/"))
        client = KoreClient(config.upstream, TokenCache(config.apps), Unlimited())
        await client.start()
        try:
            assert await call(client, config, CallTrace()) == {"success": True}
        finally:
            await client.close()


def test_answers_without_a_dot_skip_the_scrub_and_never_hold_a_jwt() -> None:
    """`decode_answer` runs the JWT pattern only on text with a dot: every JWT shape has two."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gateway.kore.client import decode_answer
    from gateway.kore.scrub import JWT_SHAPE

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet="eyzJ0aZ_-.{}\": ", max_size=80))
    def check(text: str) -> None:
        decoded = decode_answer(text.encode())
        shown = decoded if isinstance(decoded, str) else repr(decoded)
        assert JWT_SHAPE.search(shown) is None or "." in text

    check()
    assert decode_answer(b'{"success": true}') == {"success": True}
    token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    assert token not in str(decode_answer(f'{{"echo": "{token}"}}'.encode()))
