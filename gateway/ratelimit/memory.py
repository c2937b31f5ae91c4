"""Kore.ai's per-bot rate limits, applied before a call leaves the gateway, in this process.

Each bot has one or more windows ("at most `calls` per `per_s` seconds"). A call is granted
the earliest time at which every window has room and the bot's previous grant is `spacing`
old; it waits for that time if it can still finish within its deadline, otherwise it is
refused with an honest `Retry-After`. On top of the configured windows sit the pause and the
budget learned from Kore.ai's refusals (`learning.py`), kept by a `LearnedStore`: this
process's own (`LocalLearning`), or the table the workers of one supervisor share
(`shared.py`). Knows nothing of HTTP. Backends follow the `RateLimiter` protocol.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.ratelimit.learning import (
    Learned,
    Policy,
    accepted_before,
    budget_at,
    expired,
    learned_slot,
    refuse,
    shown,
)

Windows = Sequence[tuple[int, float]]
MAX_TRACKED_BOTS = 100_000
MAX_LEARNED_BOTS = 4096  # bots with a learned pause or budget at one time, as shared.CAPACITY
MIN_SWEEP_BOTS = 1024  # below this many bots, idle ones are not swept out
CALL_MARGIN_S = 0.25  # time left for the call itself after waiting for a slot
# A grant keeps its place in a window this much longer than `per_s`: a call reaches Kore.ai a
# little after its grant (audit fsync, connection, network), and unevenly, so a call granted
# exactly `per_s` after an earlier one could land inside Kore.ai's window of that earlier call.
SPACING_MARGIN_S = 0.2
# One bot's grants are paced `spacing` apart: its windows' average interval, capped at
# MAX_SPACING_S so a bot with a small budget still gets its few calls at once. A whole window's
# budget granted in one instant would reach Kore.ai over the time the gateway takes to send it,
# and the next window, granted on time, would then overlap the tail of that burst.
MAX_SPACING_S = 0.1
# A call held back less than this keeps its slot: `SPACING_MARGIN_S` covers such a delay, and
# moving a grant in the log on every call would cost each call more than anything else here.
RESTAMP_MIN_S = SPACING_MARGIN_S / 4
MAX_ROOM_WAITS = 3  # waits of one call for room its predecessors' late departures took
AGE_TRIM_EVERY = 4096  # grants of one bot between trims of the stale ones
MAX_HELD_GRANTS = 4096  # grants one bot's log holds at most while a burst is granted ahead
STALE_WINDOWS = 2  # grants this many longest windows old are stale (margins included)


@dataclass(slots=True)
class Grant:
    """A slot for one upstream call: `wait_s` waited for it, at `slot` on the backend's clock
    (Redis's when `remote`), under the bot's learning `epoch` (a refusal from Kore.ai makes
    older grants void). Not changed once handed out (a new one is made instead); not frozen:
    a frozen dataclass costs 2.5 times as much to make, and a request makes two or three."""

    wait_s: float = 0.0
    slot: float = 0.0
    epoch: int = 0
    remote: bool = False
    due: float = 0.0  # the slot on this process's monotonic clock (`slot` itself unless remote)


@dataclass(frozen=True, slots=True)
class BotView:
    """What `/metrics` and `/readyz` show of one bot that Kore.ai refused lately."""

    bot_id: str
    budget: int | None  # the learned budget in the shortest window; None when not below the
    # configured one
    paused_s: float  # the pause left, 0 when none


class RateLimiter(Protocol):
    async def acquire(self, bot_id: str, deadline: float) -> Grant:
        """Waits for a slot for one upstream call.

        Raises `RateLimited` (without waiting) when the slot comes too late for `deadline`
        (a `time.monotonic()` value)."""
        ...

    async def sending(self, bot_id: str, grant: Grant, deadline: float | None = None
                      ) -> Grant:
        """The call under `grant` leaves now: its place in the windows moves from the slot to
        now when later (the audit write or a busy event loop held it back), as Kore.ai counts
        a call when it arrives. A call granted ahead whose window an earlier call's late
        departure has filled first waits for room, when that leaves time for the call before
        `deadline`, and is refused (`RateLimited`) when it does not. Returns the grant as it
        now stands."""
        ...

    async def refused(self, bot_id: str, grant: Grant, retry_after_s: float | None) -> float:
        """Kore.ai refused the call made under `grant` for its rate limit: learns from it.
        Returns the bot's pause left, in seconds (0 when this limiter does not pause)."""
        ...

    def learned(self) -> list[BotView]:
        """The bots with a learned budget or a pause, as this process knows them."""
        ...

    async def start(self) -> None:
        """Connects to a shared store, if any (start-up; never raises for a store outage)."""
        ...

    def detail(self) -> dict[str, Any]:
        """The backend and its state, for `/readyz`."""
        ...

    async def aclose(self) -> None: ...


class Unlimited:
    """`[rate_limit] enabled = false`: nothing paced, nothing learned."""

    async def acquire(self, bot_id: str, deadline: float) -> Grant:
        return Grant()

    async def sending(self, bot_id: str, grant: Grant, deadline: float | None = None
                      ) -> Grant:
        return grant

    async def refused(self, bot_id: str, grant: Grant, retry_after_s: float | None) -> float:
        return 0.0

    def learned(self) -> list[BotView]:
        return []

    async def start(self) -> None:
        return None

    def detail(self) -> dict[str, Any]:
        return {"backend": "off"}

    async def aclose(self) -> None:
        return None


def spaced(windows: Windows, margin_s: float = SPACING_MARGIN_S) -> tuple[tuple[int, float], ...]:
    """Kore.ai's windows as the gateway paces them: each `margin_s` longer."""
    return tuple((calls, per_s + margin_s) for calls, per_s in windows)


def scaled(windows: Windows, share: float) -> tuple[tuple[int, float], ...]:
    """This process's part of each window (several workers split one budget)."""
    return tuple((max(1, math.floor(calls * share)), per_s) for calls, per_s in windows)


def spacing_of(windows: Windows) -> float:
    return min(MAX_SPACING_S, *(per_s / calls for calls, per_s in windows))


class GrantLog:
    """Each bot's recent grant times, oldest first, kept compact: a bare float for a bot with
    one grant, else an array of doubles holding at most `keep` (+ a little slack; while grants
    are made ahead, also the last window behind them, up to `max_held`), and, every
    `AGE_TRIM_EVERY` grants, none older than `STALE_WINDOWS` times `idle_s` (so a window of
    more calls than a bot ever makes in it does not keep every grant while the bot is busy).

    Bots are swept out once idle for `idle_s` (their latest grant that old): a sweep runs
    whenever the number of bots has doubled since the last one, so it costs O(1) per grant.
    Still near `max_bots` after a sweep, the longest-known bots go, down to 7/8 of it (a busy
    bot evicted so forgets its grants: the bound holds memory, not every budget).
    """

    def __init__(self, keep: int, idle_s: float, max_bots: int = MAX_TRACKED_BOTS) -> None:
        self.keep, self.idle_s, self.max_bots = keep, idle_s, max_bots
        self._slack = max(8, keep // 4)
        self.max_held = max(4 * (keep + self._slack), MAX_HELD_GRANTS)
        self._bots: dict[str, float | array[float]] = {}
        self._sweep_at = MIN_SWEEP_BOTS

    def __len__(self) -> int:
        return len(self._bots)

    def bots(self) -> list[str]:
        return list(self._bots)

    def times(self, bot_id: str) -> Sequence[float]:
        held = self._bots.get(bot_id)
        if held is None:
            return ()
        return (held,) if isinstance(held, float) else held

    def add(self, bot_id: str, at: float, now: float) -> None:
        held = self._bots.get(bot_id)
        if held is None:
            if len(self._bots) >= self._sweep_at:
                self.sweep(now)
            self._bots[bot_id] = float(at)
        elif isinstance(held, float):
            self._bots[bot_id] = array("d", (held, at))
        else:
            held.append(at)
            if len(held) > self.keep + self._slack:
                cut = len(held) - self.keep
                if at > now:
                    # Grants still to come (a burst granted ahead): the grants of the last
                    # window behind them stay, for a call that leaves on time after others
                    # left late (`MemoryRateLimiter.sending`), up to `max_held`.
                    cut = max(min(cut, bisect_right(held, now - self.idle_s)),
                              len(held) - self.max_held)
                del held[:cut]
            elif not len(held) % AGE_TRIM_EVERY:  # a window of many calls: drop the stale
                del held[:bisect_left(held, now - STALE_WINDOWS * self.idle_s)]

    def sweep(self, now: float) -> None:
        """Drops the idle bots, then the longest-known ones when still near `max_bots`."""
        idle = [bot for bot, held in self._bots.items()
                if (held if isinstance(held, float) else held[-1]) + self.idle_s <= now]
        for bot in idle:
            del self._bots[bot]
        if len(self._bots) >= self.max_bots - 1:
            keep = self.max_bots - self.max_bots // 8
            for bot in list(itertools.islice(self._bots, len(self._bots) - keep)):
                del self._bots[bot]
        self._sweep_at = min(self.max_bots, max(MIN_SWEEP_BOTS, 2 * len(self._bots)))

    def void_after(self, bot_id: str, now: float) -> None:
        """Forgets the bot's grants for slots still to come: Kore.ai's refusal voided them."""
        kept = [t for t in self.times(bot_id) if t <= now]
        self._set(bot_id, kept)

    def forget(self, bot_id: str, at: float) -> None:
        """Forgets one grant (a caller gave its slot back)."""
        times = list(self.times(bot_id))
        if at in times:
            times.remove(at)
            self._set(bot_id, times)

    def restamp(self, bot_id: str, at: float, now: float) -> None:
        """Moves one grant from `at` to `now`, keeping the log in order. The grant is recent,
        so both ends of the search are near the end of the log."""
        held = self._bots.get(bot_id)
        if isinstance(held, float):
            if held == at:
                self._bots[bot_id] = now
            return
        if held is None:
            return
        i = last_index(held, at)
        if i < 0:
            return
        del held[i]
        j = len(held)
        while j > 0 and held[j - 1] > now:
            j -= 1
        held.insert(j, now)

    def _set(self, bot_id: str, times: list[float]) -> None:
        if not times:
            self._bots.pop(bot_id, None)
        else:
            self._bots[bot_id] = times[0] if len(times) == 1 else array("d", times)


def last_index(times: Sequence[float], at: float) -> int:
    """Where the last grant at `at` is in a bot's log, searched from the end (a grant that is
    leaving or moving is among the last); -1 when the log no longer holds it."""
    i = len(times) - 1
    while i >= 0 and times[i] != at:
        i -= 1
    return i


def window_room(windows: Sequence[tuple[int, float]], times: Sequence[float], end: int,
                at: float) -> float:
    """The earliest time from `at` that a call after the first `end` grants of `times` fits
    every window (`calls` per `per_s`)."""
    for calls, per_s in windows:
        if end >= calls:
            at = max(at, times[end - calls] + per_s)
    return at


Fits = Callable[[float], bool]


class LearnedStore(Protocol):
    """Where the pause and learned budget of each bot live, and how a grant honours them."""

    def reserve(self, bot_id: str, slot: float, now: float, times: Sequence[float],
                fits: Fits) -> tuple[float, int, bool]:
        """Moves `slot` past the bot's pause and learned budget; records it if `fits(slot)`.
        `times` are this process's grants for the bot. Returns (slot, epoch, granted)."""
        ...

    def refused(self, bot_id: str, grant: Grant, retry_after_s: float | None, now: float,
                times: Sequence[float]) -> tuple[Learned, bool]:
        """Learns from Kore.ai's refusal of `grant`, forgets that grant and those for slots
        still to come; returns the state and whether a new pause started."""
        ...

    def epoch(self, bot_id: str, now: float) -> int:
        """The bot's current epoch (0 when nothing is learned)."""
        ...

    def restamp(self, bot_id: str, at: float, now: float) -> None:
        """The grant at `at` left at `now` (see `RateLimiter.sending`)."""
        ...

    def views(self, now: float) -> list[BotView]: ...


class LocalLearning:
    """The learned state of this process's bots, next to its complete grant log."""

    def __init__(self, policy: Policy, margin_s: float) -> None:
        self.policy, self.margin_s = policy, margin_s
        self._states: dict[str, Learned] = {}

    def _state(self, bot_id: str, now: float) -> Learned | None:
        state = self._states.get(bot_id)
        if state is not None and expired(state, self.policy, now):
            del self._states[bot_id]
            return None
        return state

    def reserve(self, bot_id: str, slot: float, now: float, times: Sequence[float],
                fits: Fits) -> tuple[float, int, bool]:
        state = self._state(bot_id, now)
        if state is None:
            return slot, 0, fits(slot)
        slot = max(slot, state.pause_until)
        budget = budget_at(state, self.policy, slot)
        if budget is not None and len(times) >= budget:
            slot = max(slot, learned_slot(times[-budget] + self.policy.window_s + self.margin_s,
                                          state, self.policy))
        return slot, state.epoch, fits(slot)

    def refused(self, bot_id: str, grant: Grant, retry_after_s: float | None, now: float,
                times: Sequence[float]) -> tuple[Learned, bool]:
        accepted = accepted_before(times, grant.slot, self.policy.window_s + self.margin_s)
        state, started = refuse(self._state(bot_id, now), self.policy, now=now,
                                slot=grant.slot, accepted=accepted, retry_after_s=retry_after_s)
        if bot_id not in self._states and len(self._states) >= MAX_LEARNED_BOTS:
            self.views(now)  # drops the expired
            while len(self._states) >= MAX_LEARNED_BOTS:
                del self._states[next(iter(self._states))]
        self._states[bot_id] = state
        return state, started

    def epoch(self, bot_id: str, now: float) -> int:
        state = self._state(bot_id, now)
        return 0 if state is None else state.epoch

    def restamp(self, bot_id: str, at: float, now: float) -> None:
        return None  # the grant log is this process's own: `MemoryRateLimiter` moves it

    def views(self, now: float) -> list[BotView]:
        for bot in [b for b, s in self._states.items() if expired(s, self.policy, now)]:
            del self._states[bot]
        return [BotView(bot, shown(s, self.policy, now), max(0.0, s.pause_until - now))
                for bot, s in self._states.items()]


class MemoryRateLimiter:
    """Per-bot sliding windows kept in this process, plus what Kore.ai's refusals taught.

    Grants are handed out in order, so only the `calls`-th most recent grant of each window
    matters: a window has room at `t` once that grant is at least `per_s` old. One log of grant
    times per bot serves every window.
    """

    def __init__(self, windows: Windows, *, share: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 metrics: Metrics | None = None, backoff_s: float = 5.0,
                 max_pause_s: float = 3600.0, margin_s: float = 0.0,
                 store: LearnedStore | None = None, spacing_s: float | None = None) -> None:
        """`windows` are paced as given (with any margin already added); `margin_s` is that
        margin, so that learning measures Kore.ai's own windows. `spacing_s` defaults to
        `spacing_of(windows)`, as the Redis backend's."""
        self.windows = scaled(windows, share)
        self.spacing_s = spacing_of(self.windows) if spacing_s is None else spacing_s
        self.policy = Policy.of([(c, p - margin_s) for c, p in windows], backoff_s, max_pause_s)
        self.store: LearnedStore = store if store is not None else LocalLearning(
            self.policy, margin_s)
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._sleep = sleep
        self.log = GrantLog(max(calls for calls, _ in self.windows),
                            max(per for _, per in self.windows))
        self._longest_s = max(per for _, per in self.windows)
        self._moved: dict[str, float] = {}  # bot: the latest time one of its grants moved to
        self.waits = 0
        self.rejections = 0

    def _local_slot(self, times: Sequence[float], now: float) -> float:
        slot = now
        if times:
            slot = max(slot, times[-1] + self.spacing_s)
        return window_room(self.windows, times, len(times), slot)

    def next_slot(self, bot_id: str, now: float | None = None) -> float:
        """The earliest time a call for `bot_id` may go out (`now`: one clock read for both)."""
        now = self._clock() if now is None else now
        times = self.log.times(bot_id)
        slot, _, _ = self.store.reserve(bot_id, self._local_slot(times, now), now, times,
                                        lambda _slot: False)
        return slot

    def reserve(self, bot_id: str, deadline: float) -> Grant:
        """Takes the next slot if it leaves time for the call."""
        now = self._clock()
        times = self.log.times(bot_id)

        def fits(slot: float) -> bool:
            return slot <= now or slot + CALL_MARGIN_S <= deadline

        slot, epoch, granted = self.store.reserve(bot_id, self._local_slot(times, now), now,
                                                  times, fits)
        if not granted:
            raise self._refusal(bot_id, slot - now)
        self.log.add(bot_id, slot, now)
        return Grant(slot - now, slot, epoch, due=slot)

    async def acquire(self, bot_id: str, deadline: float) -> Grant:
        waited = 0.0
        while True:  # ends: each round sleeps until a slot, and a slot past the deadline raises
            grant = self.reserve(bot_id, deadline)
            if grant.wait_s <= 0:
                grant.wait_s = waited  # made just now, seen by nobody else
                return grant
            self.waits += 1
            self._metrics.ratelimit_waited()
            await self._sleep(grant.wait_s)
            waited += grant.wait_s
            if self.store.epoch(bot_id, self._clock()) == grant.epoch:
                return Grant(waited, grant.slot, grant.epoch, due=grant.due)
            self.log.forget(bot_id, grant.slot)  # Kore.ai refused meanwhile: ask again

    async def sending(self, bot_id: str, grant: Grant, deadline: float | None = None
                      ) -> Grant:
        now = self._clock()
        if grant.remote:
            return grant
        if now > grant.slot + RESTAMP_MIN_S:
            grant = self._restamp(bot_id, grant, now)
        # A burst's grants are made at once, each slot counted from the grants before it as
        # they were granted. When one of those left late, a later call leaving on time could
        # land inside Kore.ai's window of it: the call waits until its windows, as the calls
        # before it really left, have room. Only a bot with a grant moved within a window of
        # this one is looked at (one lookup a call otherwise).
        for _ in range(MAX_ROOM_WAITS):
            moved = self._moved.get(bot_id)
            if moved is None or moved <= grant.slot - self._longest_s:
                return grant
            room = self._room(bot_id, grant.slot)
            if room <= now:
                return grant
            if deadline is not None and room + CALL_MARGIN_S > deadline:
                # No room in time: sent now, the call would land in a window the gateway
                # counts as full, and Kore.ai would refuse it. It is refused here instead,
                # and takes no place in the windows.
                self.log.forget(bot_id, grant.slot)
                raise self._refusal(bot_id, room - now)
            self._metrics.ratelimit_waited()
            await self._sleep(room - now)
            now = self._clock()
            grant = self._restamp(bot_id, grant, now)
        return grant

    def _restamp(self, bot_id: str, grant: Grant, now: float) -> Grant:
        """`grant` leaves at `now`: its place in the log, and the bot marked as having a grant
        moved (`_moved`: at most `MAX_LEARNED_BOTS` bots, the stale first to go)."""
        self.log.restamp(bot_id, grant.slot, now)
        self.store.restamp(bot_id, grant.slot, now)
        moved = self._moved
        if bot_id not in moved and len(moved) >= MAX_LEARNED_BOTS:
            stale = now - self._longest_s
            for bot in [b for b, at in moved.items() if at <= stale]:
                del moved[bot]
            while len(moved) >= MAX_LEARNED_BOTS:
                del moved[next(iter(moved))]
        moved[bot_id] = now
        return Grant(grant.wait_s, now, grant.epoch, due=now)

    def _room(self, bot_id: str, at: float) -> float:
        """The earliest time the grant at `at` fits every window, counting the grants before it
        in the log as they stand (`at` when the log no longer holds it)."""
        times = self.log.times(bot_id)
        return window_room(self.windows, times, last_index(times, at), at)

    def _refusal(self, bot_id: str, wait_s: float) -> RateLimited:
        """A call refused here, counted: what the caller gets."""
        self.rejections += 1
        self._metrics.ratelimit_rejected()
        return rate_limited(bot_id, wait_s)

    async def refused(self, bot_id: str, grant: Grant, retry_after_s: float | None) -> float:
        now = self._clock()
        state, started = self.store.refused(bot_id, grant, retry_after_s, now,
                                            self.log.times(bot_id))
        self.log.forget(bot_id, grant.slot)  # a refused call takes no place in a window
        self.log.void_after(bot_id, now)
        if started:
            self._metrics.ratelimit_paused()
        return max(0.0, state.pause_until - now)

    def learned(self) -> list[BotView]:
        return self.store.views(self._clock())

    def history(self) -> dict[str, list[float]]:
        """Each tracked bot's recent grant times."""
        return {bot: list(self.log.times(bot)) for bot in self.log.bots()}

    async def start(self) -> None:
        return None

    def detail(self) -> dict[str, Any]:
        return {"backend": "memory", "state": "local"}

    async def aclose(self) -> None:
        return None


def rate_limited(bot_id: str, wait_s: float) -> RateLimited:
    return RateLimited(
        f"the Kore.ai rate limit for bot {bot_id} is spent; retry in {math.ceil(wait_s)} s",
        retry_after_s=wait_s)
