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
from collections.abc import Callable, Sequence
from typing import Protocol

from cachetools import TTLCache

from gateway.errors import RateLimited

Windows = Sequence[tuple[int, float]]
MAX_TRACKED_BOTS = 100_000
CALL_MARGIN_S = 0.25  # time left for the call itself after waiting for a slot


class RateLimiter(Protocol):
    async def acquire(self, bot_id: str, deadline: float) -> float:
        """Waits for a slot for one upstream call; returns the seconds waited.

        Raises `RateLimited` (without waiting) when the slot comes too late for `deadline`
        (a `time.monotonic()` value)."""
        ...

    async def aclose(self) -> None: ...


class Unlimited:
    """`[rate_limit] enabled = false`."""

    async def acquire(self, bot_id: str, deadline: float) -> float:
        return 0.0

    async def aclose(self) -> None:
        return None


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
                 sleep: Callable[[float], object] = asyncio.sleep) -> None:
        self.windows = scaled(windows, share)
        self._clock = clock
        self._sleep = sleep
        longest = max(per for _, per in self.windows)
        self._bots: TTLCache[str, list[deque[float]]] = TTLCache(
            MAX_TRACKED_BOTS, ttl=longest, timer=clock)
        self.waits = 0
        self.rejections = 0

    def next_slot(self, bot_id: str) -> float:
        """The earliest time a call for `bot_id` may go out."""
        now = self._clock()
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
        slot = self.next_slot(bot_id)
        if slot > now and slot + CALL_MARGIN_S > deadline:
            self.rejections += 1
            wait = slot - now
            raise RateLimited(
                f"the Kore.ai rate limit for bot {bot_id} is spent; retry in {math.ceil(wait)} s",
                retry_after_s=wait)
        grants = self._bots.get(bot_id)
        if grants is None:
            grants = [deque(maxlen=calls) for calls, _ in self.windows]
        for window in grants:
            window.append(slot)
        self._bots[bot_id] = grants  # re-set so the TTL counts from the latest grant
        return slot - now

    async def acquire(self, bot_id: str, deadline: float) -> float:
        wait = self.reserve(bot_id, deadline)
        if wait > 0:
            self.waits += 1
            await self._sleep(wait)
        return wait

    async def aclose(self) -> None:
        return None
