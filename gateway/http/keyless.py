"""Requests without a valid key: a budget per client address and a small share of the process.

A keyless request (no key, an unknown key) is refused before it counts against
`server.max_in_flight`: it costs its answer (401, always) and an audit record or a count
(`audit/keyless.py`). On top of that each client address (IPv6: its /64, see
`forwarded.budget_key`) has a budget of `RATE_PER_S` keyless requests a second with bursts of
`BURST`. Past it, the 401 is held back until the budget allows it (at most `MAX_HOLD_S`), so a
flooding address is slowed to its budget, through TCP back-pressure, without any other answer
than the contract's. Held answers are the keyless share: at most `share` at once; past that a
keyless answer goes out at once and its connection is closed, so the client has to reconnect
(which `server.max_connections_per_client` bounds).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import TTLCache

RATE_PER_S = 50.0  # keyless requests per second and client address, sustained
BURST = 100  # … and at once
MAX_HOLD_S = 2.0  # the longest a keyless answer is held back
MAX_CLIENTS = 65_536  # addresses remembered; a forgotten one starts with a full burst


class KeylessBudget:
    """GCRA per client address: `enter(key)` says how long to hold this request's answer."""

    def __init__(self, share: int, *, rate_per_s: float = RATE_PER_S, burst: int = BURST,
                 max_hold_s: float = MAX_HOLD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.share = share
        self.held = 0  # answers being held now
        self._interval = 1.0 / rate_per_s
        self._tolerance = (burst - 1) * self._interval  # `burst` at once, none held
        self._max_hold_s = max_hold_s
        self._clock = clock
        # Theoretical arrival time per address; forgotten once a full burst is back.
        self._tat: TTLCache[str, float] = TTLCache(MAX_CLIENTS, self._tolerance + max_hold_s,
                                                   timer=clock)

    def hold_s(self, key: str) -> float:
        """Seconds to hold the answer of one more keyless request from `key` (0: none)."""
        now = self._clock()
        tat = max(self._tat.get(key, now), now)
        hold = tat - now - self._tolerance
        if hold > self._max_hold_s:
            return self._max_hold_s  # not charged: the budget stays as far ahead as it was
        self._tat[key] = tat + self._interval
        return max(0.0, hold)

    def enter(self) -> bool:
        """Takes a place in the share for one held answer; False when the share is full."""
        if self.held >= self.share:
            return False
        self.held += 1
        return True

    def leave(self) -> None:
        self.held -= 1
