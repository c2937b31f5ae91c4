"""Learning Kore.ai's real limit from its refusals (contract §2): the rules of
gateway.ratelimit.learning, and the memory backend and the workers' shared table following
them. A fake clock and a fake sleep: nothing here sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.ratelimit.learning import (
    Learned,
    Policy,
    accepted_before,
    budget_at,
    expired,
    refuse,
)
from gateway.ratelimit.memory import (
    CALL_MARGIN_S,
    RESTAMP_MIN_S,
    Grant,
    GrantLog,
    MemoryRateLimiter,
)
from gateway.ratelimit.shared import SharedLearning, Table, ring_size
from tests.conftest import FakeClock

BOT = "st-learning-bot"
OTHER = "st-other-bot"
FAR = 1e6
W = 60.0
TEN_WINDOWS = 10  # contract §2: "within ten windows", "one refused call per ten windows"
POLICY = Policy(configured=60, window_s=W, backoff_s=5.0, max_pause_s=3600.0)


class FakeSleep:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.clock.advance(seconds)


class FakeKore:
    """Kore.ai's sliding log: at most `calls` accepted per `per_s`; a refused call counts in none."""

    def __init__(self, clock: FakeClock, calls: int, per_s: float = W) -> None:
        self.clock, self.calls, self.per_s = clock, calls, per_s
        self.accepted: list[float] = []
        self.refused: list[float] = []

    def answer(self) -> bool:
        now = self.clock()
        recent = [t for t in self.accepted if t > now - self.per_s]
        if len(recent) >= self.calls:
            self.refused.append(now)
            return False
        self.accepted.append(now)
        return True


def make_limiter(clock: FakeClock, calls: int = 60, per_s: float = W, **kwargs: Any
                 ) -> MemoryRateLimiter:
    return MemoryRateLimiter([(calls, per_s)], clock=clock, sleep=FakeSleep(clock), **kwargs)


async def call_through(lim: MemoryRateLimiter, kore: FakeKore, bot: str = BOT,
                       timeout_s: float = FAR, retry_after_s: float | None = None) -> str:
    """One call: its slot, then Kore.ai's answer, reported back when it is a refusal."""
    try:
        grant = await lim.acquire(bot, lim._clock() + timeout_s)
    except RateLimited:
        return "gateway-429"
    if kore.answer():
        return "200"
    await lim.refused(bot, grant, retry_after_s)
    return "kore-429"


class TestRules:
    def test_first_refusal_pauses_backoff_and_shrinks_to_what_was_accepted(self) -> None:
        state, started = refuse(None, POLICY, now=100.0, slot=99.9, accepted=6,
                                retry_after_s=None)
        assert started and state == Learned(6, 105.0, 5.0, 100.0, 1)

    @pytest.mark.parametrize(("accepted", "budget"), [(0, 1), (1, 1), (59, 59), (500, 60)],
                             ids=["none-still-one", "one", "most", "never-above-configured"])
    def test_budget_is_what_was_accepted_at_least_one(self, accepted: int, budget: int) -> None:
        state, _ = refuse(None, POLICY, now=0.0, slot=0.0, accepted=accepted, retry_after_s=None)
        assert state.budget == budget

    def test_retry_after_sets_the_pause_capped_at_max_pause(self) -> None:
        policy = Policy(60, W, backoff_s=5.0, max_pause_s=120.0)
        state, _ = refuse(None, policy, now=0.0, slot=0.0, accepted=3, retry_after_s=30.0)
        assert state.pause_until == 30.0
        state, _ = refuse(None, policy, now=0.0, slot=0.0, accepted=3, retry_after_s=1e6)
        assert state.pause_until == 120.0

    def test_pause_doubles_while_refusals_continue_up_to_max_pause(self) -> None:
        policy = Policy(60, W, backoff_s=5.0, max_pause_s=30.0)
        state, now, pauses = None, 0.0, []
        for _ in range(6):
            state, started = refuse(state, policy, now=now, slot=now, accepted=0,
                                    retry_after_s=None)
            assert started
            pauses.append(state.pause_until - now)
            now = state.pause_until  # the next call, right after the pause, is refused too
        assert pauses == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]

    def test_pause_starts_over_after_a_quiet_window(self) -> None:
        state, _ = refuse(None, POLICY, now=0.0, slot=0.0, accepted=3, retry_after_s=None)
        state, _ = refuse(state, POLICY, now=5.0, slot=5.0, accepted=3, retry_after_s=None)
        assert state.pause_s == 10.0
        later = state.pause_until + W + 1
        state, _ = refuse(state, POLICY, now=later, slot=later, accepted=3, retry_after_s=None)
        assert state.pause_s == 5.0

    def test_the_same_burst_neither_extends_the_pause_nor_raises_the_budget(self) -> None:
        first, _ = refuse(None, POLICY, now=10.0, slot=9.0, accepted=7, retry_after_s=None)
        second, started = refuse(first, POLICY, now=10.1, slot=9.5, accepted=8,
                                 retry_after_s=None)
        assert not started
        assert (second.budget, second.pause_until, second.pause_s) == (7, 15.0, 5.0)
        third, _ = refuse(second, POLICY, now=10.2, slot=9.2, accepted=6, retry_after_s=30.0)
        assert third.budget == 6 and third.pause_until == pytest.approx(40.2)
        assert [s.epoch for s in (first, second, third)] == [1, 2, 3]

    def test_configured_budget_is_tried_again_after_ten_windows(self) -> None:
        state, _ = refuse(None, POLICY, now=0.0, slot=0.0, accepted=6, retry_after_s=None)
        assert budget_at(state, POLICY, 0.0) == 6
        assert budget_at(state, POLICY, TEN_WINDOWS * W - 0.001) == 6
        assert budget_at(state, POLICY, TEN_WINDOWS * W) is None
        assert not expired(state, POLICY, (TEN_WINDOWS + 1) * W - 0.001)
        assert expired(state, POLICY, (TEN_WINDOWS + 1) * W)

    def test_a_long_pause_holds_the_learned_budget_until_it_ends(self) -> None:
        state, _ = refuse(None, POLICY, now=0.0, slot=0.0, accepted=6, retry_after_s=3000.0)
        assert budget_at(state, POLICY, 2999.0) == 6
        assert budget_at(state, POLICY, 3000.0) is None

    def test_accepted_counts_the_window_before_the_slot(self) -> None:
        times = [0.0, 10.0, 59.0, 60.0, 61.0, 70.0]
        # 59, 60, 61: not 0 or 10 (a grant exactly a window old has left it), not 70 itself
        assert accepted_before(times, 70.0, W) == 3


class TestMemoryLearning:
    async def test_no_call_goes_during_the_pause(self, clock: FakeClock) -> None:
        lim = make_limiter(clock)
        grant = await lim.acquire(BOT, clock() + FAR)
        assert await lim.refused(BOT, grant, None) == pytest.approx(5.0)
        started = clock()
        grant = await lim.acquire(BOT, clock() + FAR)
        assert clock() - started == pytest.approx(5.0) and grant.wait_s == pytest.approx(5.0)

    async def test_paused_caller_is_refused_at_once_with_an_honest_retry_after(
            self, clock: FakeClock) -> None:
        lim = make_limiter(clock)
        await lim.refused(BOT, await lim.acquire(BOT, clock() + FAR), 30.0)
        clock.advance(4)
        with pytest.raises(RateLimited) as caught:
            await lim.acquire(BOT, clock() + 10)
        assert caught.value.retry_after_s == pytest.approx(26.0)
        assert lim._sleep.calls == []  # type: ignore[attr-defined]
        clock.advance(26)
        assert (await lim.acquire(BOT, clock() + CALL_MARGIN_S)).wait_s == 0

    async def test_other_bots_are_not_paused(self, clock: FakeClock) -> None:
        lim = make_limiter(clock)
        await lim.refused(BOT, await lim.acquire(BOT, clock() + FAR), 600.0)
        assert (await lim.acquire(OTHER, clock() + 1)).wait_s == 0
        with pytest.raises(RateLimited):
            await lim.acquire(BOT, clock() + 1)

    async def test_budget_shrinks_to_what_kore_accepted_in_the_window(
            self, clock: FakeClock) -> None:
        lim, kore = make_limiter(clock), FakeKore(clock, 6)
        answers = [await call_through(lim, kore) for _ in range(7)]
        assert answers == ["200"] * 6 + ["kore-429"]
        [view] = lim.learned()
        assert (view.bot_id, view.budget) == (BOT, 6) and view.paused_s == pytest.approx(5.0)
        # The next six wait for the window to slide, then go; none is refused.
        answers = [await call_through(lim, kore) for _ in range(12)]
        assert answers == ["200"] * 12 and kore.refused == kore.refused[:1]

    async def test_the_refused_call_counts_in_no_window(self, clock: FakeClock) -> None:
        """Retry-After: 0 with nothing accepted: the one call of the budget may go at once."""
        lim = make_limiter(clock)
        grant = await lim.acquire(BOT, clock() + FAR)
        assert await lim.refused(BOT, grant, 0.0) == 0.0
        assert (await lim.acquire(BOT, clock() + 1)).wait_s == 0

    async def test_a_waiting_caller_asks_again_when_kore_refuses_meanwhile(
            self, clock: FakeClock) -> None:
        lim = make_limiter(clock)
        first = await lim.acquire(BOT, clock() + FAR)
        second = lim.reserve(BOT, clock() + FAR)  # queued 0.1 s later
        assert second.wait_s == pytest.approx(0.1)
        await lim.refused(BOT, first, None)  # Kore.ai refused the first: 5 s pause
        assert len(lim.log.times(BOT)) == 0  # the refused and the queued grant are gone
        waiter = await lim.acquire(BOT, clock() + FAR)
        assert waiter.wait_s == pytest.approx(5.0) and waiter.epoch == 1

    async def test_steady_limit_costs_at_most_one_refusal_per_ten_windows(
            self, clock: FakeClock) -> None:
        """Configured ten times the real limit, callers always waiting: over 60 windows."""
        lim, kore = make_limiter(clock), FakeKore(clock, 6)
        end = clock() + 60 * W
        answers = []
        while clock() < end:
            answers.append(await call_through(lim, kore))
        refused = answers.count("kore-429")
        assert 1 <= refused <= 1 + 60 // TEN_WINDOWS, refused
        assert answers.count("200") >= 6 * 60 * 0.9  # and the real limit is nearly used up

    async def test_one_off_refusal_back_to_configured_within_ten_windows(
            self, clock: FakeClock) -> None:
        lim, kore = make_limiter(clock, calls=20), FakeKore(clock, 20)
        for _ in range(5):
            await call_through(lim, kore)
        await lim.refused(BOT, await lim.acquire(BOT, clock() + FAR), None)  # one-off
        refused_at = clock()
        assert [v.budget for v in lim.learned()] == [5]
        clock.advance(TEN_WINDOWS * W - clock() + refused_at)
        assert [v.budget for v in lim.learned()] == [None]
        start = clock()
        answers = [await call_through(lim, kore) for _ in range(20)]
        assert answers == ["200"] * 20 and clock() - start < W / 2  # a whole configured window

    async def test_a_waiting_caller_goes_when_the_configured_budget_applies_again(
            self, clock: FakeClock) -> None:
        """The learned budget never pushes a slot past the end of its ten windows."""
        lim, kore = make_limiter(clock, calls=20), FakeKore(clock, 20)
        for _ in range(3):
            await call_through(lim, kore)
        await lim.refused(BOT, await lim.acquire(BOT, clock() + FAR), None)  # budget 3
        probe_at = clock() + TEN_WINDOWS * W
        clock.advance(TEN_WINDOWS * W - W / 2)
        grants = [lim.reserve(BOT, clock() + FAR) for _ in range(4)]
        assert grants[2].slot < probe_at
        assert grants[3].slot == pytest.approx(probe_at, abs=1e-6)  # not grants[0].slot + W

    async def test_pause_doubles_while_kore_keeps_refusing(self, clock: FakeClock) -> None:
        lim = make_limiter(clock, backoff_s=2.0, max_pause_s=10.0)
        pauses = []
        for _ in range(5):
            grant = await lim.acquire(BOT, clock() + FAR)
            pauses.append(await lim.refused(BOT, grant, None))
        assert pauses == [2.0, 4.0, 8.0, 10.0, 10.0]

    async def test_pauses_are_counted_and_learned_budgets_shown(self, clock: FakeClock) -> None:
        metrics = Metrics()
        lim, kore = make_limiter(clock, metrics=metrics), FakeKore(clock, 3)
        metrics.ratelimit_learned(
            lambda: ((v.bot_id, v.budget, v.paused_s) for v in lim.learned()))
        for _ in range(4):
            await call_through(lim, kore)
        sample = metrics.registry.get_sample_value
        assert sample("kore_gateway_ratelimit_pauses_total") == 1.0
        assert sample("kore_gateway_ratelimit_learned_budget", {"bot": BOT}) == 3.0
        assert sample("kore_gateway_ratelimit_paused_bots") == 1.0
        assert sample("kore_gateway_ratelimit_pause_seconds", {"bot": BOT}) == pytest.approx(5.0)
        assert sample("kore_gateway_ratelimit_pause_seconds", {"bot": OTHER}) is None
        clock.advance(6)
        assert sample("kore_gateway_ratelimit_paused_bots") == 0.0
        assert sample("kore_gateway_ratelimit_pause_seconds", {"bot": BOT}) is None
        clock.advance(TEN_WINDOWS * W)
        assert sample("kore_gateway_ratelimit_learned_budget", {"bot": BOT}) is None


class TestPacing:
    async def test_calls_are_spread_over_the_window(self, clock: FakeClock) -> None:
        """As the Redis backend: 0.1 s apart (the windows' average interval, capped)."""
        lim = MemoryRateLimiter([(5, 10.0), (100, 100.0)], clock=clock, sleep=FakeSleep(clock))
        slots = [lim.reserve(BOT, clock() + FAR).slot - clock() for _ in range(6)]
        assert slots == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 10.0])

    async def test_a_slow_budget_is_spaced_by_its_own_interval(self, clock: FakeClock) -> None:
        lim = MemoryRateLimiter([(2, 0.1)], clock=clock, sleep=FakeSleep(clock))
        slots = [lim.reserve(BOT, clock() + FAR).slot - clock() for _ in range(3)]
        assert slots == pytest.approx([0.0, 0.05, 0.1])


class TestSending:
    async def test_a_call_held_back_takes_its_place_when_it_leaves(
            self, clock: FakeClock) -> None:
        """Kore.ai counts a call when it arrives: a grant the audit write held back 0.3 s
        counts from then, so the next window's call waits for it."""
        lim = make_limiter(clock, calls=1, per_s=10.0)
        grant = await lim.acquire(BOT, clock() + FAR)
        clock.advance(0.3)
        moved = await lim.sending(BOT, grant)
        assert moved.slot == clock() and lim.log.times(BOT) == (clock(),)
        assert lim.reserve(BOT, clock() + FAR).wait_s == pytest.approx(10.0)

    async def test_moved_grants_stay_in_order(self, clock: FakeClock) -> None:
        lim = make_limiter(clock)
        grants = [lim.reserve(BOT, clock() + FAR) for _ in range(4)]
        clock.advance(0.35)
        await lim.sending(BOT, grants[0])  # left last, after the others' slots
        times = list(lim.log.times(BOT))
        assert times == sorted(times) and times[-1] == clock()

    def test_a_grant_moves_to_its_place_in_the_log(self) -> None:
        log = GrantLog(keep=100, idle_s=60.0)
        for at in (1.0, 2.0, 3.0, 3.0, 5.0):
            log.add(BOT, at, at)
        log.restamp(BOT, 3.0, 4.5)  # one of two equal grants, into the middle
        assert list(log.times(BOT)) == [1.0, 2.0, 3.0, 4.5, 5.0]
        log.restamp(BOT, 1.0, 2.0)  # next to an equal time
        assert list(log.times(BOT)) == [2.0, 2.0, 3.0, 4.5, 5.0]
        log.restamp(BOT, 2.5, 9.0)  # a grant the log no longer holds: nothing moves
        log.restamp(BOT, 7.0, 9.0)  # (past the last)
        log.restamp("other-bot", 2.0, 9.0)
        assert list(log.times(BOT)) == [2.0, 2.0, 3.0, 4.5, 5.0]
        log.restamp(BOT, 2.0, 6.0)
        assert list(log.times(BOT)) == [2.0, 3.0, 4.5, 5.0, 6.0]

    async def test_a_call_granted_ahead_waits_for_a_window_an_earlier_late_call_moved(
            self, clock: FakeClock) -> None:
        """A burst is granted at once, its later slots counted from the earlier grants as
        granted. When the first calls leave late (a token mint, a slow audit write), a later
        call that leaves on time would land inside Kore.ai's window of those first calls: it
        waits for the window as the calls before it really left."""
        lim = make_limiter(clock, calls=2, per_s=1.0)
        kore = FakeKore(clock, calls=2, per_s=1.0)
        t0 = clock()
        grants = [lim.reserve(BOT, t0 + FAR) for _ in range(3)]
        assert [g.slot - t0 for g in grants] == pytest.approx([0.0, 0.1, 1.0])
        clock.advance(0.3)  # the first two leave 0.3 s late
        for grant in grants[:2]:
            await lim.sending(BOT, grant)
            assert kore.answer()
        clock.advance(0.7)  # the third's slot: on time for it, inside Kore.ai's window
        sent = await lim.sending(BOT, grants[2], clock() + FAR)
        assert sent.slot - t0 == pytest.approx(1.3) and clock() - t0 == pytest.approx(1.3)
        assert kore.answer() and kore.refused == []
        assert [t - t0 for t in lim.log.times(BOT)] == pytest.approx([0.3, 0.3, 1.3])

    async def test_a_burst_longer_than_the_log_keeps_the_window_behind_it(
            self, clock: FakeClock) -> None:
        """Thirty grants at once, where the log keeps 2 (+8): the grants still to come keep
        the window behind them in the log, so the check above still sees the late calls."""
        lim = make_limiter(clock, calls=2, per_s=1.0)
        kore = FakeKore(clock, calls=2, per_s=1.0)
        t0 = clock()
        grants = [lim.reserve(BOT, t0 + FAR) for _ in range(30)]
        assert len(lim.log.times(BOT)) == 30
        clock.advance(0.3)
        for grant in grants[:2]:
            await lim.sending(BOT, grant)
            assert kore.answer()
        for grant in grants[2:6]:  # each on time for its slot, each moved by the late two
            clock.advance(max(0.0, grant.slot - clock()))
            await lim.sending(BOT, grant, clock() + FAR)
            assert kore.answer(), (grant.slot - t0, clock() - t0)
        assert kore.refused == []
        assert lim.reserve(BOT, clock() + FAR) and len(lim.log.times(BOT)) <= lim.log.max_held

    def test_a_log_with_grants_to_come_keeps_the_last_window_behind_them(self) -> None:
        log = GrantLog(keep=2, idle_s=1.0)
        for k in range(5):  # granted and gone: trimmed to `keep` (+ slack) as before
            log.add(BOT, float(k), float(k))
        for k in range(40):  # a burst at t=10: the grants of (9, 10] and all those to come stay
            log.add(BOT, 10.0 + 0.5 * k, 10.0)
        times = list(log.times(BOT))
        assert times[0] > 9.0 and times[-1] == 29.5 and len(times) == 40

    async def test_no_room_before_the_deadline_is_refused_here_not_sent(
            self, clock: FakeClock) -> None:
        """Room only past the deadline: the call is refused by the gateway (it would land in
        a window the gateway counts as full), at once, and takes no place in the windows."""
        lim = make_limiter(clock, calls=2, per_s=1.0)
        t0 = clock()
        grants = [lim.reserve(BOT, t0 + FAR) for _ in range(3)]
        clock.advance(0.3)
        for grant in grants[:2]:
            await lim.sending(BOT, grant)
        clock.advance(0.7)
        with pytest.raises(RateLimited) as refused:
            await lim.sending(BOT, grants[2], clock() + 0.2)
        assert refused.value.retry_after_s == pytest.approx(0.3)  # the room, at 1.3
        assert clock() - t0 == pytest.approx(1.0)  # no wait
        assert [t - t0 for t in lim.log.times(BOT)] == pytest.approx([0.3, 0.3])
        assert lim.rejections == 1

    async def test_an_early_or_remote_grant_is_left_alone(self, clock: FakeClock) -> None:
        lim = make_limiter(clock)
        grant = lim.reserve(BOT, clock() + FAR)
        assert await lim.sending(BOT, grant) == grant
        clock.advance(RESTAMP_MIN_S)  # held back no longer than the spacing margin covers
        assert await lim.sending(BOT, grant) == grant and lim.log.times(BOT) == (grant.slot,)
        remote = Grant(slot=clock() - 5, remote=True)
        assert await lim.sending(BOT, remote) == remote


class TestSharedTable:
    """Two workers: two `SharedLearning`s over one mapped file, as `serve --workers 2` has."""

    @pytest.fixture
    def workers(self, tmp_path: Path, clock: FakeClock
                ) -> list[tuple[MemoryRateLimiter, SharedLearning]]:
        path = tmp_path / "learned.table"
        Table.create(path, ring_size(60), capacity=8)
        made = []
        for _ in range(2):
            store = SharedLearning(Table.open(path), POLICY, 0.0)
            made.append((MemoryRateLimiter([(60, W)], share=0.5, clock=clock,
                                           sleep=FakeSleep(clock), store=store), store))
        return made

    async def test_a_worker_that_saw_no_refusal_still_pauses(
            self, workers: list[tuple[MemoryRateLimiter, SharedLearning]],
            clock: FakeClock) -> None:
        (a, _), (b, _) = workers
        await a.refused(BOT, await a.acquire(BOT, clock() + FAR), 20.0)
        with pytest.raises(RateLimited) as caught:
            await b.acquire(BOT, clock() + 5)
        assert caught.value.retry_after_s == pytest.approx(20.0)
        assert (await b.acquire(OTHER, clock() + 1)).wait_s == 0
        assert [(v.bot_id, v.paused_s) for v in b.learned()] == [(BOT, pytest.approx(20.0))]

    async def test_the_learned_budget_holds_over_both_workers(
            self, workers: list[tuple[MemoryRateLimiter, SharedLearning]],
            clock: FakeClock) -> None:
        (a, _), (b, _) = workers
        kore = FakeKore(clock, 6)
        answers = [await call_through((a, b)[i % 2], kore) for i in range(7)]
        assert answers.count("kore-429") == 1
        # Twelve more, alternating workers: the six per window hold across both.
        answers = [await call_through((a, b)[i % 2], kore) for i in range(12)]
        assert answers == ["200"] * 12

    async def test_the_budget_counts_what_every_worker_sent(
            self, workers: list[tuple[MemoryRateLimiter, SharedLearning]],
            clock: FakeClock) -> None:
        """Kore.ai accepted six, three from each worker: the worker that saw the refusal
        counted its own three; the other adds its own the first time it touches the bot."""
        (a, _), (b, _) = workers
        kore = FakeKore(clock, 6)
        answers = [await call_through((a, b)[i % 2], kore) for i in range(7)]
        assert answers == ["200"] * 6 + ["kore-429"]  # the seventh, a's
        assert [v.budget for v in a.learned()] == [3]
        assert await call_through(b, kore) == "200"  # after the pause and the window
        assert [v.budget for v in a.learned()] == [v.budget for v in b.learned()] == [6]
        answers = [await call_through((a, b)[i % 2], kore) for i in range(12)]
        assert answers == ["200"] * 12 and kore.refused == kore.refused[:1]

    async def test_a_waiting_caller_goes_when_the_configured_budget_applies_again(
            self, workers: list[tuple[MemoryRateLimiter, SharedLearning]],
            clock: FakeClock) -> None:
        (a, _), (b, _) = workers
        kore = FakeKore(clock, 3)
        answers = [await call_through(a, kore) for _ in range(4)]
        assert answers[-1] == "kore-429" and [v.budget for v in b.learned()] == [3]
        probe_at = clock() + TEN_WINDOWS * W
        clock.advance(TEN_WINDOWS * W - W / 2)
        grants = [(a, b)[i % 2].reserve(BOT, clock() + FAR) for i in range(4)]
        assert grants[2].slot < probe_at
        assert grants[3].slot == pytest.approx(probe_at, abs=1e-6)

    async def test_a_waiter_in_the_other_worker_asks_again(
            self, workers: list[tuple[MemoryRateLimiter, SharedLearning]],
            clock: FakeClock) -> None:
        (a, _), (b, _) = workers
        grant = await a.acquire(BOT, clock() + FAR)
        await b.refused(BOT, Grant(slot=clock()), None)  # b's own call refused: 5 s pause
        queued = b.reserve(BOT, clock() + FAR)
        assert queued.wait_s == pytest.approx(5.0)
        assert grant.epoch == 0 and b.store.epoch(BOT, clock()) == 1

    async def test_a_full_table_reuses_expired_slots_first(self, tmp_path: Path,
                                                          clock: FakeClock) -> None:
        table = Table.anonymous(ring_size(60), capacity=2)
        store = SharedLearning(table, POLICY, 0.0)
        store.refused("st-a", Grant(slot=clock()), None, clock(), ())
        clock.advance((TEN_WINDOWS + 1) * W)
        store.refused("st-b", Grant(slot=clock()), None, clock(), ())
        clock.advance(1)
        store.refused("st-c", Grant(slot=clock()), None, clock(), ())  # st-a had expired
        assert sorted(v.bot_id for v in store.views(clock())) == ["st-b", "st-c"]
        clock.advance(1)
        store.refused("st-d", Grant(slot=clock()), None, clock(), ())  # st-b: refused first
        assert sorted(v.bot_id for v in store.views(clock())) == ["st-c", "st-d"]
        table.close()


Driver = Callable[[MemoryRateLimiter, FakeKore], Any]


@settings(max_examples=40, deadline=None)
@given(real=st.integers(1, 8), configured=st.integers(8, 40),
       gaps=st.lists(st.sampled_from([0.0, 0.05, 0.5, 3.0, 20.0]), min_size=1, max_size=60),
       retry=st.sampled_from([None, 0.0, 2.0, 30.0]))
def test_learning_never_sends_during_a_pause_nor_past_the_learned_budget(
        real: int, configured: int, gaps: list[float], retry: float | None) -> None:
    """Whatever the arrivals: no grant falls inside a pause, no window holds more grants than
    the budget in force, and the configured windows are never exceeded."""
    clock = FakeClock()
    lim = make_limiter(clock, calls=configured, per_s=10.0)
    kore = FakeKore(clock, real, per_s=10.0)
    sent: list[float] = []

    async def run() -> None:
        for gap in gaps:
            clock.advance(gap)
            before = lim.store._states.get(BOT)  # type: ignore[attr-defined]
            pause_until = before.pause_until if before is not None else 0.0
            try:
                grant = await lim.acquire(BOT, clock() + 5.0)
            except RateLimited as exc:
                assert exc.retry_after_s is not None and exc.retry_after_s > 0
                continue
            assert grant.slot >= pause_until - 1e-9
            state = lim.store._states.get(BOT)  # type: ignore[attr-defined]
            budget = budget_at(state, lim.policy, grant.slot) or configured
            assert len([t for t in sent if t > grant.slot - 10.0]) < budget
            sent.append(grant.slot)
            if not kore.answer():
                await lim.refused(BOT, grant, retry)
                sent.remove(grant.slot)

    asyncio.run(run())
    for first, later in zip(sent, sent[configured:], strict=False):
        assert later - first >= 10.0 - 1e-6
