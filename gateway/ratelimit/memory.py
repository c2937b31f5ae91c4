"""Kore.ai's per-bot rate limits, applied before a call leaves the gateway.

Each bot has one or more windows ("at most `calls` per `per_s` seconds"). A call is granted
the earliest time at which every window has room; it waits for that time if it can still
finish within its deadline, otherwise it is refused with an honest `Retry-After`.
Knows nothing of HTTP. Backends follow the `RateLimiter` protocol.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from cachetools import TLRUCache

from gateway.errors import RateLimited
from gateway.metrics import Metrics

Windows = Sequence[tuple[int, float]]
MAX_TRACKED_BOTS = 100_000
CALL_MARGIN_S = 0.25  # time left for the call itself after waiting for a slot
# A grant keeps its place in a window this much longer than `per_s`: a call reaches Kore.ai a
# little after its grant (audit fsync, connection, network), and unevenly, so a call granted
# exactly `per_s` after an earlier one could land inside Kore.ai's window of that earlier call.
SPACING_MARGIN_S = 0.2


class RateLimiter(Protocol):
    async def acquire(self, bot_id: str, deadline: float) -> float:
        """Waits for a slot for one upstream call; returns the seconds waited.

        Raises `RateLimited` (without waiting) when the slot comes too late for `deadline`
        (a `time.monotonic()` value)."""
        ...

    async def start(self) -> None:
        """Connects to a shared store, if any (start-up; never raises for a store outage)."""
        ...

    def detail(self) -> dict[str, Any]:
        """The backend and its state, for `/readyz`."""
        ...

    async def aclose(self) -> None: ...


class Unlimited:
    """`[rate_limit] enabled = false`."""

    async def acquire(self, bot_id: str, deadline: float) -> float:
        return 0.0

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


class MemoryRateLimiter:
    """Per-bot sliding windows kept in this process.

    Grants are handed out in order, so only the `calls`-th most recent grant of each window
    matters: a window has room at `t` once that grant is at least `per_s` old.
    """

    def __init__(self, windows: Windows, *, share: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 metrics: Metrics | None = None) -> None:
        self.windows = scaled(windows, share)
        self._metrics = metrics if metrics is not None else Metrics()
        self._clock = clock
        self._sleep = sleep
        longest = max(per for _, per in self.windows)

        def until_stale(_bot: str, grants: list[deque[float]], _now: float) -> float:
            # The latest grant may be a slot in the future: it counts until `longest` after it.
            return max(w[-1] for w in grants) + longest

        self._bots: TLRUCache[str, list[deque[float]]] = TLRUCache(
            MAX_TRACKED_BOTS, ttu=until_stale, timer=clock)
        self.waits = 0
        self.rejections = 0

    def next_slot(self, bot_id: str, now: float | None = None) -> float:
        """The earliest time a call for `bot_id` may go out (`now`: one clock read for both)."""
        now = self._clock() if now is None else now
        grants = self._bots.get(bot_id)
        if grants is None:
            return now
        slot = now
        for (calls, per_s), window in zip(self.windows, grants, strict=True):
            if window:
                slot = max(slot, window[-1])
            if len(window) >= calls:
                slot = max(slot, window[-calls] + per_s)
        return slot

    def reserve(self, bot_id: str, deadline: float) -> float:
        """Takes the next slot if it leaves time for the call; returns the wait in seconds."""
        now = self._clock()
        slot = self.next_slot(bot_id, now)
        if slot > now and slot + CALL_MARGIN_S > deadline:
            self.rejections += 1
            self._metrics.ratelimit_rejected()
            wait = slot - now
            raise RateLimited(
                f"the Kore.ai rate limit for bot {bot_id} is spent; retry in {math.ceil(wait)} s",
                retry_after_s=wait)
        grants = self._bots.get(bot_id)
        if grants is None:
            grants = [deque(maxlen=calls) for calls, _ in self.windows]
        for window in grants:
            window.append(slot)
        self._bots[bot_id] = grants  # re-set so the expiry counts from the latest grant
        return slot - now

    async def acquire(self, bot_id: str, deadline: float) -> float:
        wait = self.reserve(bot_id, deadline)
        if wait > 0:
            self.waits += 1
            self._metrics.ratelimit_waited()
            await self._sleep(wait)
        return wait

    def history(self) -> dict[str, list[float]]:
        """Each tracked bot's recent grant times (as many as its largest window keeps)."""
        largest = max(range(len(self.windows)), key=lambda i: self.windows[i][0])
        return {bot: list(grants[largest]) for bot, grants in list(self._bots.items())}

    async def start(self) -> None:
        return None

    def detail(self) -> dict[str, Any]:
        return {"backend": "memory", "state": "local"}

    async def aclose(self) -> None:
        return None
