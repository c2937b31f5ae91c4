"""The Redis rate-limit backend against a real redis-server: atomic shared windows, pacing,
deadlines, keys, and the local fallback while Redis is down, hung, or restarted."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from benchmarks.ports import free_port
from gateway.config.model import Config, RateLimitConfig, Secret
from gateway.errors import RateLimited
from gateway.http.runtime import make_limiter
from gateway.metrics import Metrics
from gateway.ratelimit.learning import Policy
from gateway.ratelimit.redis import (
    FALLBACK,
    REDIS,
    WINDOW_MARGIN_S,
    RedisRateLimiter,
    RedisWindows,
    learned_key,
    window_keys,
)
from tests.redis_fixtures import RedisServer

BOT = "st-redis-bot"
FAR = 1000.0  # a max wait no test reaches
MARGIN = WINDOW_MARGIN_S
TEN_WINDOWS = 10  # contract §2


def rl_config(url: str, windows: list[tuple[int, float]], *, timeout_s: float = 0.25,
              fraction: float = 0.5) -> RateLimitConfig:
    return RateLimitConfig(backend="redis", windows=tuple(windows), redis_url=Secret(url),
                           local_fallback_fraction=fraction, redis_timeout_s=timeout_s)


@pytest.fixture
async def clients(redis_server: RedisServer) -> AsyncIterator[Callable[[], Redis]]:
    """`clients()`: a new client (own connections, like another gateway process) each call."""
    made: list[Redis] = []

    def make() -> Redis:
        made.append(Redis.from_url(redis_server.url, socket_timeout=5))
        return made[-1]

    yield make
    for client in made:
        await client.aclose()


LimiterFactory = Callable[..., Awaitable[RedisRateLimiter]]


@pytest.fixture
async def limiter_for() -> AsyncIterator[LimiterFactory]:
    """`await limiter_for(url, windows, ...)`: a started `RedisRateLimiter`, closed after."""
    made: list[RedisRateLimiter] = []

    async def make(url: str, windows: list[tuple[int, float]], **kwargs: Any) -> RedisRateLimiter:
        metrics = kwargs.pop("metrics", None)
        limiter = RedisRateLimiter(rl_config(url, windows, **kwargs),
                                   fallback_share=kwargs.get("fraction", 0.5), metrics=metrics)
        made.append(limiter)
        await limiter.start()
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


def fallback_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("kore_gateway_ratelimit_redis_fallback")


async def wait_for_mode(limiter: RedisRateLimiter, mode: str, timeout_s: float = 8.0) -> None:
    deadline = time.monotonic() + timeout_s
    while limiter.mode != mode:
        assert time.monotonic() < deadline, f"still {limiter.mode} after {timeout_s} s"
        await asyncio.sleep(0.05)


async def granted_at(windows: RedisWindows, bot: str = BOT) -> list[float]:
    """The grant times the longest window keeps, in seconds after the first of them."""
    key = window_keys(bot, windows.windows)[-1]
    times = [int(t) / 1e6 for t in await windows.client.lrange(key, 0, -1)]
    return [round(t - times[0], 6) for t in times]


class TestRedisWindows:
    async def test_grants_are_paced_then_wait_for_the_window(self, clients: Any) -> None:
        """5 per 10 s: five grants 0.1 s apart, the sixth once the first is 10 s (+margin) old."""
        windows = RedisWindows(clients(), [(5, 10.0), (100, 100.0)])
        waits = [(await windows.reserve(BOT, FAR))[1] for _ in range(6)]
        assert await granted_at(windows) == [0.0, 0.1, 0.2, 0.3, 0.4, 10.0 + MARGIN]
        assert waits[0] == 0.0 and 10.0 < waits[5] <= 10.0 + MARGIN

    async def test_refusal_reserves_nothing_and_tells_the_wait(self, clients: Any) -> None:
        client = clients()
        windows = RedisWindows(client, [(2, 10.0)])
        for _ in range(2):
            await windows.reserve(BOT, FAR)
        granted, wait, *_ = await windows.reserve(BOT, 1.0)
        assert not granted and 9.5 < wait <= 10.0 + MARGIN
        assert await client.llen(window_keys(BOT, [(2, 10.0)])[0]) == 2
        granted, again, *_ = await windows.reserve(BOT, FAR)
        assert granted and wait - 0.5 < again <= wait

    async def test_window_boundary_on_the_redis_clock(self, clients: Any) -> None:
        """3 per 0.5 s: the 4th slot is 0.5 s + margin after the 1st; once past it, no wait."""
        windows = RedisWindows(clients(), [(3, 0.5)])
        for _ in range(3):
            assert (await windows.reserve(BOT, FAR))[0]
        granted, wait, *_ = await windows.reserve(BOT, 0.0)
        assert not granted and 0.2 < wait <= 0.5 + MARGIN
        await asyncio.sleep(wait + 0.1)
        assert (await windows.reserve(BOT, 0.0))[:2] == (True, 0.0)

    async def test_every_window_is_enforced(self, clients: Any) -> None:
        windows = RedisWindows(clients(), [(2, 0.5), (3, 5.0), (100, 100.0)])
        for _ in range(4):
            await windows.reserve(BOT, FAR)
        assert await granted_at(windows) == [0.0, 0.1, 0.5 + MARGIN, 5.0 + MARGIN]

    async def test_bots_are_independent(self, clients: Any) -> None:
        windows = RedisWindows(clients(), [(1, 10.0)])
        assert (await windows.reserve(BOT, 0.0))[:2] == (True, 0.0)
        assert (await windows.reserve("st-other", 0.0))[:2] == (True, 0.0)
        assert not (await windows.reserve(BOT, 0.0))[0]

    async def test_keys_are_namespaced_per_bot_and_window_and_expire(self, clients: Any) -> None:
        client = clients()
        windows = RedisWindows(client, [(5, 2.0), (50, 30.0)])
        await windows.reserve(BOT, FAR)
        keys = sorted(k.decode() for k in await client.keys("*"))
        assert keys == [f"kore-gateway:rl:{{{BOT}}}:5/2s", f"kore-gateway:rl:{{{BOT}}}:50/30s"]
        short, long = [await client.pttl(k) for k in keys]
        assert 0 < short <= (2.0 + MARGIN + 1) * 1000
        assert 2_000 < long <= (30.0 + MARGIN + 1) * 1000

    async def test_concurrent_gateways_never_exceed_the_budget(self, clients: Any) -> None:
        """200 asks at once through 4 clients: every grant recorded once, no window over."""
        shape = [(10, 1.0), (1000, 100.0)]  # the long window keeps every grant for checking
        gateways = [RedisWindows(clients(), shape) for _ in range(4)]
        results = await asyncio.gather(*(gateways[i % 4].reserve(BOT, FAR) for i in range(200)))
        assert all(r.granted for r in results)
        log = [int(x) / 1e6 for x in await gateways[0].client.lrange(
            window_keys(BOT, shape)[1], 0, -1)]
        assert len(log) == 200 and log == sorted(log)
        assert min(b - a for a, b in itertools.pairwise(log)) >= 0.1 - 1e-6
        assert min(b - a for a, b in zip(log, log[10:], strict=False)) >= 1.0 + MARGIN - 1e-6


class TestRedisRateLimiter:
    async def test_waits_for_its_slot_or_is_refused_at_once(self, redis_server: RedisServer,
                                                            limiter_for: LimiterFactory) -> None:
        limiter = await limiter_for(redis_server.url, [(2, 0.5)])
        now = time.monotonic
        started = now()
        waits = [(await limiter.acquire(BOT, now() + 5)).wait_s for _ in range(2)]
        assert waits[0] == 0.0 and 0.0 < waits[1] <= 0.1
        asked = now()
        with pytest.raises(RateLimited) as refused:
            await limiter.acquire(BOT, now() + 0.3)
        assert now() - asked < 0.5  # refused at once, not after the ~0.9 s the slot is away
        retry = refused.value.retry_after_s
        assert retry is not None and 0.5 < retry <= 0.5 + MARGIN
        assert (await limiter.acquire(BOT, now() + 5)).wait_s > 0.3
        assert now() - started >= 0.5 + MARGIN - 0.05
        assert limiter.detail() == {"backend": "redis", "state": REDIS, "outages": 0}

    async def test_down_at_start_serves_a_local_share_and_says_so(
            self, limiter_for: LimiterFactory) -> None:
        metrics = Metrics()
        with capture_logs() as logs:
            limiter = await limiter_for(f"redis://127.0.0.1:{free_port()}/0", [(4, 10.0)],
                                        metrics=metrics)
            deadline = time.monotonic() + 1
            waits = [(await limiter.acquire(BOT, deadline)).wait_s for _ in range(2)]
            assert waits[0] == 0.0 and 0.05 < waits[1] <= 0.1  # paced as the Redis backend paces
            with pytest.raises(RateLimited):  # a local share of 0.5: 2 of the 4 per 10 s
                await limiter.acquire(BOT, deadline)
        assert [e["event"] for e in logs] == ["ratelimit.redis_unavailable"]
        assert logs[0]["log_level"] == "error"
        assert limiter.detail()["state"] == FALLBACK and limiter.detail()["localShare"] == 0.5
        assert fallback_gauge(metrics) == 1.0

    async def test_a_hung_redis_never_holds_an_ask_past_its_timeouts(
            self, silent_port: int) -> None:
        limiter = RedisRateLimiter(rl_config(f"redis://127.0.0.1:{silent_port}/0",
                                             [(100, 1.0)], timeout_s=0.5), fallback_share=1.0)
        try:
            latencies: list[float] = []

            async def ask() -> None:
                started = time.monotonic()
                await limiter.acquire(BOT, started + 10)
                latencies.append(time.monotonic() - started)

            await asyncio.gather(*(ask() for _ in range(20)))
            assert len(latencies) == 20 and max(latencies) < 3.0  # 2 turns of the timeout
            await asyncio.sleep(1.0)
            await ask()  # the timeouts have lasted past LOSS_CONFIRM_S: Redis is lost
            assert limiter.mode == FALLBACK
            await asyncio.gather(*(ask() for _ in range(5)))
            assert max(latencies[-5:]) < 0.4  # no longer tried: well under the timeout
        finally:
            await limiter.aclose()

    async def test_killed_then_restarted_hands_local_grants_back_to_redis(
            self, redis_server: RedisServer, limiter_for: LimiterFactory) -> None:
        metrics = Metrics()
        limiter = await limiter_for(redis_server.url, [(4, 10.0)], metrics=metrics)
        deadline = time.monotonic() + 60
        with capture_logs() as logs:
            await limiter.acquire(BOT, deadline)
            redis_server.kill()
            started = time.monotonic()
            await limiter.acquire("st-during-outage", deadline)
            await limiter.acquire("st-during-outage", deadline)
            assert time.monotonic() - started < 1.0
            assert limiter.mode == FALLBACK and fallback_gauge(metrics) == 1.0
            redis_server.start()
            await wait_for_mode(limiter, REDIS)
        assert [e["event"] for e in logs] == ["ratelimit.redis_unavailable",
                                              "ratelimit.redis_restored"]
        assert fallback_gauge(metrics) == 0.0 and limiter.detail()["outages"] == 1
        # The two local grants now count in Redis: 2 more fit the 4 per 10 s, a third does not.
        now = time.monotonic
        waits = [(await limiter.acquire("st-during-outage", now() + 1)).wait_s
                 for _ in range(2)]
        assert max(waits) < 0.5
        with pytest.raises(RateLimited):
            await limiter.acquire("st-during-outage", now() + 1)

    async def test_the_redis_url_never_shows(self, redis_server: RedisServer, clients: Any,
                                             limiter_for: LimiterFactory) -> None:
        """A password the server refuses: the limiter falls back, and says so without it."""
        await clients().config_set("requirepass", "the-right-one")
        url = f"redis://:hunter2-secret@127.0.0.1:{redis_server.port}/0"
        with capture_logs() as logs:
            limiter = await limiter_for(url, [(4, 10.0)])
            await limiter.acquire(BOT, time.monotonic() + 1)
        assert limiter.mode == FALLBACK
        shown = json.dumps([logs, limiter.detail(), repr(limiter.redis.client),
                            repr(rl_config(url, [(1, 1.0)]))], default=str)
        assert "hunter2" not in shown


class TestMakeLimiter:
    def config(self, **rate_limit: Any) -> Config:
        return Config(rate_limit=RateLimitConfig(**rate_limit))

    def test_redis_backend_shares_the_whole_budget(self) -> None:
        config = self.config(backend="redis", redis_url=Secret("redis://127.0.0.1:1/0"),
                             local_fallback_fraction=0.5, windows=((600, 60.0),))
        limiter = make_limiter(config, workers=4)
        assert isinstance(limiter, RedisRateLimiter)
        assert limiter.redis.windows == ((600, 60.0),)
        assert limiter.fallback.windows == ((75, 60.0),)  # 0.5 of the budget over 4 workers


def learning_config(url: str, windows: list[tuple[int, float]], *, backoff_s: float = 5.0,
                    max_pause_s: float = 3600.0) -> RateLimitConfig:
    return RateLimitConfig(backend="redis", windows=tuple(windows), redis_url=Secret(url),
                           backoff_s=backoff_s, max_pause_s=max_pause_s, redis_timeout_s=2.0)


def learning_windows(client: Redis, windows: list[tuple[int, float]], **policy: float
                     ) -> RedisWindows:
    return RedisWindows(client, windows, policy=Policy.of(windows, **policy))


class TestRedisLearning:
    """REFUSED_LUA and the reservation script: contract §2's learning, atomically in Redis."""

    async def test_refusal_pauses_shrinks_and_forgets_the_refused_grant(
            self, clients: Any) -> None:
        client = clients()
        windows = learning_windows(client, [(60, 10.0)], backoff_s=5.0)
        got = [await windows.reserve(BOT, FAR) for _ in range(4)]
        await asyncio.sleep(got[3].wait)  # all four sent; Kore.ai refuses the fourth
        refusal = await windows.refused(BOT, got[3].slot, None)
        assert refusal.started and refusal.budget == 3 and refusal.epoch == 1
        assert 4.9 < refusal.pause_s <= 5.0
        assert await client.llen(window_keys(BOT, windows.windows)[0]) == 3
        after = await windows.reserve(BOT, FAR)  # three in the window: wait for it to slide
        assert after.granted and 9.5 < after.wait <= 10.0 + MARGIN
        assert (after.epoch, after.budget) == (1, 3) and 4.8 < after.pause_s <= 5.0

    async def test_a_waiter_goes_when_the_configured_budget_applies_again(
            self, clients: Any) -> None:
        """The learned budget never pushes a slot past the end of its ten windows."""
        windows = learning_windows(clients(), [(60, 0.3)], backoff_s=0.05)
        got = [await windows.reserve(BOT, FAR) for _ in range(3)]
        await asyncio.sleep(got[2].wait)
        assert (await windows.refused(BOT, got[2].slot, None)).budget == 2
        probe = (await windows.reserve(BOT, 0.0)).probe_s  # paused: nothing reserved
        await asyncio.sleep(probe - 0.2)  # two grants now, a third pushed past the probe
        first, second, third = [await windows.reserve(BOT, FAR) for _ in range(3)]
        assert (first.budget, second.budget) == (2, 2)
        assert third.granted and third.wait == pytest.approx(third.probe_s, abs=0.002), third
        assert third.wait < first.wait + 0.3 + MARGIN - 0.05  # not the learned window's push

    async def test_learned_budget_holds_for_every_replica(self, clients: Any) -> None:
        shape = [(60, 10.0), (1000, 100.0)]
        a = learning_windows(clients(), shape, backoff_s=0.01)
        b = learning_windows(clients(), shape, backoff_s=0.01)
        got = [await a.reserve(BOT, FAR) for _ in range(3)]
        await asyncio.sleep(got[2].wait)
        await a.refused(BOT, got[2].slot, None)  # Kore.ai accepted two, refused the third
        await asyncio.sleep(0.05)
        first = await b.reserve(BOT, FAR)  # this replica saw no refusal
        assert first.granted and first.budget == 2
        assert 9.5 < first.wait <= 10.0 + MARGIN  # two in the window already: wait for it

    async def test_a_paused_bot_refuses_at_once_with_the_pause_left(self, clients: Any) -> None:
        a = learning_windows(clients(), [(60, 10.0)], backoff_s=30.0)
        b = learning_windows(clients(), [(60, 10.0)])
        await a.refused(BOT, (await a.reserve(BOT, FAR)).slot, None)
        got = await b.reserve(BOT, 5.0)
        assert not got.granted and 29 < got.wait <= 30.0
        assert (await b.reserve("st-other", 0.0)).granted  # no other bot is affected

    async def test_retry_after_counts_capped_at_max_pause(self, clients: Any) -> None:
        windows = learning_windows(clients(), [(60, 10.0)], max_pause_s=100.0)
        first = await windows.reserve(BOT, FAR)
        assert 19.9 < (await windows.refused(BOT, first.slot, 20.0)).pause_s <= 20.0
        again = await windows.reserve(BOT, FAR)  # the 20 s wait reserves a slot after it
        refusal = await windows.refused(BOT, again.slot, 1e6)
        assert 99.9 < refusal.pause_s <= 100.0

    async def test_grants_for_slots_to_come_are_voided(self, clients: Any) -> None:
        client = clients()
        windows = learning_windows(client, [(2, 10.0)])
        first, second, queued = [await windows.reserve(BOT, FAR) for _ in range(3)]
        assert queued.wait > 9
        await asyncio.sleep(second.wait)  # the second was sent; the third waits for its slot
        await windows.refused(BOT, first.slot, 0.0)
        log = await client.lrange(window_keys(BOT, windows.windows)[0], 0, -1)
        assert len(log) == 1  # the refused one forgotten, the queued one voided
        assert await windows.epoch(BOT) == 1

    async def test_the_same_burst_does_not_extend_the_pause(self, clients: Any) -> None:
        windows = learning_windows(clients(), [(60, 10.0)], backoff_s=5.0)
        got = [await windows.reserve(BOT, FAR) for _ in range(5)]
        await asyncio.sleep(got[4].wait)  # all five sent; Kore.ai refuses the last two
        first = await windows.refused(BOT, got[3].slot, None)
        await asyncio.sleep(0.2)
        second = await windows.refused(BOT, got[4].slot, None)  # granted before the refusal
        assert not second.started and second.budget == 3 and second.epoch == 2
        assert second.pause_s < first.pause_s - 0.1

    async def test_pause_doubles_while_refusals_continue(self, clients: Any) -> None:
        windows = learning_windows(clients(), [(60, 10.0)], backoff_s=0.1, max_pause_s=0.35)
        pauses = []
        for _ in range(4):
            got = await windows.reserve(BOT, FAR)
            await asyncio.sleep(got.wait)
            pauses.append((await windows.refused(BOT, got.slot, None)).pause_s)
        assert [round(p, 1) for p in pauses] == [0.1, 0.2, 0.3, 0.3]
        assert pauses[2] == pytest.approx(0.35, abs=0.02)

    async def test_the_learned_hash_expires_with_the_learning(self, clients: Any) -> None:
        client = clients()
        windows = learning_windows(client, [(60, 0.5)], backoff_s=0.1)
        await windows.refused(BOT, (await windows.reserve(BOT, FAR)).slot, None)
        ttl = await client.pttl(learned_key(BOT))
        assert 0 < ttl <= (TEN_WINDOWS * 0.5 + 0.5) * 1000 + 1000  # probe + a window + 1 s

    async def test_configured_budget_again_after_ten_windows(self, clients: Any) -> None:
        windows = learning_windows(clients(), [(60, 0.1)], backoff_s=0.01)
        got = [await windows.reserve(BOT, FAR) for _ in range(3)]
        await asyncio.sleep(got[2].wait)
        await windows.refused(BOT, got[2].slot, None)
        assert (await windows.reserve(BOT, FAR)).budget == 2
        await asyncio.sleep(TEN_WINDOWS * 0.1 + 0.1)
        assert (await windows.reserve(BOT, FAR)).budget is None


class TestRedisRateLimiterLearning:
    async def test_a_waiter_asks_again_when_another_replica_learns_a_pause(
            self, redis_server: RedisServer) -> None:
        config = learning_config(redis_server.url, [(1, 0.4)], backoff_s=1.0)
        a = RedisRateLimiter(config, fallback_share=1.0)
        b = RedisRateLimiter(config, fallback_share=1.0)
        await a.start()
        await b.start()
        try:
            assert a.mode == b.mode == REDIS
            first = await a.acquire(BOT, time.monotonic() + 5)
            waiting = asyncio.create_task(b.acquire(BOT, time.monotonic() + 5))
            await asyncio.sleep(0.1)  # b holds a slot ~0.4 s away
            assert await a.refused(BOT, first, None) == pytest.approx(1.0, abs=0.05)
            grant = await waiting
            assert grant.wait_s >= 0.95 and grant.epoch == 1  # held until the pause ended
            # b knows the bot's learning (budget 1 is the configured one: not shown as learned)
            assert [(v.bot_id, v.budget) for v in b.learned()] == [(BOT, None)]
        finally:
            await a.aclose()
            await b.aclose()

    async def test_pauses_are_counted_once_by_the_replica_that_saw_them(
            self, redis_server: RedisServer) -> None:
        metrics = Metrics()
        limiter = RedisRateLimiter(learning_config(redis_server.url, [(60, 10.0)]),
                                   fallback_share=1.0, metrics=metrics)
        try:
            grants = [await limiter.acquire(BOT, time.monotonic() + 5) for _ in range(2)]
            for grant in grants:
                await limiter.refused(BOT, grant, None)
            assert metrics.registry.get_sample_value(
                "kore_gateway_ratelimit_pauses_total") == 1.0
        finally:
            await limiter.aclose()

    async def test_refusal_without_redis_learns_locally(self, limiter_for: LimiterFactory
                                                       ) -> None:
        limiter = await limiter_for(f"redis://127.0.0.1:{free_port()}/0", [(4, 10.0)])
        grant = await limiter.acquire(BOT, time.monotonic() + 1)
        assert not grant.remote
        assert await limiter.refused(BOT, grant, 7.0) == pytest.approx(7.0, abs=0.05)
        with pytest.raises(RateLimited):
            await limiter.acquire(BOT, time.monotonic() + 1)
