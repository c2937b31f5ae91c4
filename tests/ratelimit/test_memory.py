"""Tests for gateway.ratelimit.memory: Kore.ai's per-bot windows, with a fake clock and a fake sleep."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.errors import RateLimited
from gateway.ratelimit.memory import CALL_MARGIN_S, MemoryRateLimiter, Unlimited, scaled
from tests.conftest import FakeClock

BOT = "st-bot-a"
OTHER = "st-bot-b"
FAR = 1e9  # a deadline that never gets in the way


class FakeSleep:
    """Records the sleeps asked for and moves the clock instead of sleeping."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.advance(seconds)


@pytest.fixture
def sleep(clock: FakeClock) -> FakeSleep:
    return FakeSleep(clock)


def limiter(clock: FakeClock, sleep: FakeSleep, windows: list[tuple[int, float]],
            share: float = 1.0, spacing_s: float | None = 0.0) -> MemoryRateLimiter:
    """Unpaced unless `spacing_s` is None (the default pacing) or given: the window tests
    count in whole windows."""
    return MemoryRateLimiter(windows, share=share, clock=clock, sleep=sleep, spacing_s=spacing_s)


async def acquire(lim: MemoryRateLimiter, clock: FakeClock, bot: str = BOT,
                  timeout_s: float = FAR) -> float:
    return (await lim.acquire(bot, clock() + timeout_s)).wait_s


class TestMemoryRateLimiter:
    async def test_within_budget_no_wait(self, clock: FakeClock, sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(3, 10)])
        assert [await acquire(lim, clock) for _ in range(3)] == [0, 0, 0]
        assert sleep.calls == [] and lim.waits == 0

    async def test_over_budget_waits_until_oldest_grant_is_per_s_old(
            self, clock: FakeClock, sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(2, 10)])
        start = clock()
        await acquire(lim, clock)
        clock.advance(1)
        await acquire(lim, clock)
        clock.advance(1)
        waited = await acquire(lim, clock)
        assert waited == pytest.approx(8)
        assert sleep.calls == [pytest.approx(8)]
        assert clock() == pytest.approx(start + 10)
        assert lim.waits == 1

    async def test_slot_frees_as_the_window_slides(self, clock: FakeClock,
                                                   sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(2, 10)])
        await acquire(lim, clock)
        clock.advance(4)
        await acquire(lim, clock)
        clock.advance(6)  # the first grant is now exactly 10 s old
        assert await acquire(lim, clock) == 0
        assert await acquire(lim, clock) == pytest.approx(4)  # waits for the second grant

    async def test_two_windows_both_enforced(self, clock: FakeClock, sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(2, 1), (3, 10)])
        start = clock()
        waits = [await acquire(lim, clock) for _ in range(4)]
        # the short window holds the third call back 1 s; the long one the fourth until 10 s
        assert waits == [0, 0, pytest.approx(1), pytest.approx(9)]
        assert clock() == pytest.approx(start + 10)

    async def test_short_window_enforced_under_long_window(self, clock: FakeClock,
                                                           sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(100, 3600), (1, 2)])
        waits = [await acquire(lim, clock) for _ in range(3)]
        assert waits == [0, pytest.approx(2), pytest.approx(2)]

    def test_grants_handed_out_in_order(self, clock: FakeClock, sleep: FakeSleep) -> None:
        """Callers arriving together are queued one window apart, none overtaking another."""
        lim = limiter(clock, sleep, [(2, 10)])
        waits = [lim.reserve(BOT, clock() + FAR).wait_s for _ in range(5)]
        assert waits == [0, 0, pytest.approx(10), pytest.approx(10), pytest.approx(20)]

    async def test_refuses_when_slot_after_deadline(self, clock: FakeClock,
                                                    sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(1, 30)])
        await acquire(lim, clock)
        clock.advance(5)
        with pytest.raises(RateLimited) as caught:
            await acquire(lim, clock, timeout_s=10)
        exc = caught.value
        assert (exc.status, exc.code) == (429, "rate_limited")
        assert exc.retry_after_s == pytest.approx(25)
        assert "25" in exc.message and BOT in exc.message
        assert sleep.calls == [] and lim.rejections == 1

    async def test_refusal_reserves_nothing(self, clock: FakeClock, sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(1, 30)])
        await acquire(lim, clock)
        before = lim.next_slot(BOT)
        for _ in range(3):
            with pytest.raises(RateLimited):
                await acquire(lim, clock, timeout_s=1)
        assert lim.next_slot(BOT) == before
        assert await acquire(lim, clock) == pytest.approx(30)  # not pushed back by refusals

    async def test_retry_after_is_honest(self, clock: FakeClock, sleep: FakeSleep) -> None:
        """Coming back after `retry_after_s` gets a slot without waiting."""
        lim = limiter(clock, sleep, [(2, 7), (3, 60)])
        for _ in range(3):
            await acquire(lim, clock)
        with pytest.raises(RateLimited) as caught:
            await acquire(lim, clock, timeout_s=0.5)
        retry_after = caught.value.retry_after_s
        assert retry_after is not None and retry_after > 0
        clock.advance(retry_after)
        assert await acquire(lim, clock, timeout_s=CALL_MARGIN_S) == 0

    async def test_slot_needs_time_left_for_the_call(self, clock: FakeClock,
                                                     sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(1, 10)])
        await acquire(lim, clock)
        with pytest.raises(RateLimited):
            await acquire(lim, clock, timeout_s=10)  # the slot is exactly at the deadline
        assert await acquire(lim, clock, timeout_s=10 + CALL_MARGIN_S) == pytest.approx(10)

    async def test_no_wait_needed_is_never_refused(self, clock: FakeClock,
                                                   sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(1, 10)])
        assert await acquire(lim, clock, timeout_s=0.01) == 0

    async def test_share_halves_the_budget(self, clock: FakeClock, sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(4, 10), (100, 60)], share=0.5)
        assert lim.windows == ((2, 10), (50, 60))
        waits = [await acquire(lim, clock) for _ in range(3)]
        assert waits == [0, 0, pytest.approx(10)]

    async def test_bots_are_independent(self, clock: FakeClock, sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(1, 10)])
        await acquire(lim, clock, BOT)
        with pytest.raises(RateLimited):
            await acquire(lim, clock, BOT, timeout_s=1)
        assert await acquire(lim, clock, OTHER, timeout_s=1) == 0
        assert sleep.calls == []

    async def test_idle_bot_forgotten_after_longest_window(self, clock: FakeClock,
                                                           sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(1, 10), (2, 60)])
        await acquire(lim, clock)
        await acquire(lim, clock)
        clock.advance(61)
        assert await acquire(lim, clock) == 0
        assert await acquire(lim, clock) == pytest.approx(10)

    def test_queued_grants_survive_the_state_ttl(self, clock: FakeClock,
                                                 sleep: FakeSleep) -> None:
        lim = limiter(clock, sleep, [(1, 10)])
        start = clock()
        slots = [clock() + lim.reserve(BOT, clock() + FAR).wait_s for _ in range(3)]
        clock.advance(10.5)  # the second caller has just been let through
        slots.append(clock() + lim.reserve(BOT, clock() + FAR).wait_s)
        assert slots == [start, start + 10, start + 20, start + 30]

    async def test_acquire_sleeps_on_the_event_loop_by_default(self) -> None:
        lim = MemoryRateLimiter([(1, 0.05)])
        loop = asyncio.get_running_loop()
        await lim.acquire(BOT, loop.time() + 5)
        started = loop.time()
        waited = (await lim.acquire(BOT, loop.time() + 5)).wait_s
        assert 0 < waited <= 0.05 and loop.time() - started >= waited * 0.9
        await lim.aclose()


class TestScaled:
    @pytest.mark.parametrize(("windows", "share", "expected"), [
        ([(600, 60), (18000, 3600)], 1.0, ((600, 60), (18000, 3600))),
        ([(600, 60), (18000, 3600)], 0.5, ((300, 60), (9000, 3600))),
        ([(5, 1)], 0.5, ((2, 1),)),
        ([(1, 1)], 0.1, ((1, 1),)),
    ], ids=["whole", "half", "rounds-down", "never-zero"])
    def test_scaled(self, windows: list[tuple[int, float]], share: float,
                    expected: tuple[tuple[int, float], ...]) -> None:
        assert scaled(windows, share) == expected


async def test_unlimited_never_waits() -> None:
    lim = Unlimited()
    assert [(await lim.acquire(BOT, 0)).wait_s for _ in range(1000)] == [0.0] * 1000
    await lim.aclose()


@settings(max_examples=60, deadline=None)
@example(windows=[(1, 1.0)], steps=[(BOT, 0.0, 0.5), (BOT, 0.0, 5.0), (BOT, 0.0, 0.5)])
@given(windows=st.lists(st.tuples(st.integers(1, 4), st.sampled_from([1.0, 2.5, 10.0])),
                        min_size=1, max_size=3),
       steps=st.lists(st.tuples(st.sampled_from([BOT, OTHER]),
                                st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]),
                                st.sampled_from([0.5, 5.0, FAR])),
                      max_size=40))
def test_no_window_ever_exceeded(windows: list[tuple[int, float]],
                                 steps: list[tuple[str, float, float]]) -> None:
    """Whatever the arrivals and deadlines, no `per_s` span holds more than `calls` grants."""
    clock = FakeClock()
    sleep = FakeSleep(clock)
    lim = limiter(clock, sleep, windows)
    granted: dict[str, list[float]] = {BOT: [], OTHER: []}

    async def run() -> None:
        for bot, gap, timeout_s in steps:
            clock.advance(gap)
            deadline = clock() + timeout_s
            try:
                waited = (await lim.acquire(bot, deadline)).wait_s
            except RateLimited as exc:
                assert exc.retry_after_s is not None and exc.retry_after_s > 0
                continue
            if waited:  # a wait is only taken when the call still fits before the deadline
                assert clock() + CALL_MARGIN_S <= deadline + 1e-6
            granted[bot].append(clock())

    asyncio.run(run())
    for times in granted.values():
        for calls, per_s in windows:
            for first, later in zip(times, times[calls:], strict=False):
                assert later - first >= per_s - 1e-6


@settings(max_examples=60, deadline=None)
@given(windows=st.lists(st.tuples(st.integers(1, 4), st.sampled_from([1.0, 2.5, 10.0])),
                        min_size=1, max_size=3),
       steps=st.lists(st.tuples(st.sampled_from([BOT, OTHER]),
                                st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0])), max_size=40))
def test_callers_that_cannot_wait_never_exceed_a_window(
        windows: list[tuple[int, float]], steps: list[tuple[str, float]]) -> None:
    """With no time to wait, a call is granted only when every window has room right now."""
    clock = FakeClock()
    sleep = FakeSleep(clock)
    lim = limiter(clock, sleep, windows)
    granted: dict[str, list[float]] = {BOT: [], OTHER: []}

    async def run() -> None:
        for bot, gap in steps:
            clock.advance(gap)
            try:
                assert (await lim.acquire(bot, clock() + CALL_MARGIN_S / 2)).wait_s == 0
            except RateLimited as exc:
                assert exc.retry_after_s is not None and exc.retry_after_s > 0
                continue
            granted[bot].append(clock())

    asyncio.run(run())
    assert sleep.calls == []
    for times in granted.values():
        for calls, per_s in windows:
            for first, later in zip(times, times[calls:], strict=False):
                assert later - first >= per_s - 1e-6
