"""Per-bot rate-limit state is compact and bounded (issue 11, item 4): a caller sending one call
each to 100,000 distinct bots cannot grow the limiter past 32 MiB, and bots idle past the
longest window are the first to go."""

from __future__ import annotations

import tracemalloc

from gateway.config.model import DEFAULT_WINDOWS
from gateway.ratelimit.memory import (
    AGE_TRIM_EVERY,
    MAX_TRACKED_BOTS,
    GrantLog,
    MemoryRateLimiter,
    spaced,
)
from tests.conftest import FakeClock

BOTS = 100_000
LIMIT_BYTES = 32 * 2**20
FAR = 1e9


def test_100k_bots_fit_in_32_mib_of_limiter_state() -> None:
    """The default windows (600/60 s + 18,000/3,600 s); the bot IDs themselves count too."""
    clock = FakeClock()
    tracemalloc.start()
    try:
        limiter = MemoryRateLimiter(spaced(DEFAULT_WINDOWS), clock=clock)
        before = tracemalloc.get_traced_memory()[0]
        for n in range(BOTS):
            limiter.reserve(f"st-{n:08x}-0000-4000-8000-{n:012x}", clock() + FAR)
            if n % 1000 == 999:
                clock.advance(1)  # 100 batches of 1,000 bots, a second apart
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(limiter.log) == BOTS
    assert held <= LIMIT_BYTES, f"{held / 2**20:.1f} MiB for {BOTS} bots"
    assert held / BOTS <= 200, f"{held / BOTS:.0f} bytes per idle bot"


def test_bots_idle_past_the_longest_window_are_evicted_first() -> None:
    clock = FakeClock()
    log = GrantLog(keep=600, idle_s=3600.0, max_bots=2000)
    for n in range(1000):
        log.add(f"st-old-{n}", clock(), clock())
    clock.advance(3600)  # every old bot is now idle past the longest window
    log.add("st-busy", clock(), clock())
    for n in range(1500):
        log.add(f"st-new-{n}", clock(), clock())
    bots = set(log.bots())
    assert not any(b.startswith("st-old-") for b in bots)  # all gone, though 2000 would fit
    assert "st-busy" in bots and len(bots) == 1501


def test_the_number_of_bots_is_bounded_even_when_none_is_idle() -> None:
    clock = FakeClock()
    log = GrantLog(keep=600, idle_s=3600.0, max_bots=1500)
    for n in range(5000):
        log.add(f"st-{n}", clock(), clock())
    assert len(log) <= 1500
    assert "st-4999" in set(log.bots()) and "st-0" not in set(log.bots())  # oldest first


def test_a_full_log_stays_cheap_to_add_to() -> None:
    """At the bound with every bot busy, a sweep frees an eighth: not one sweep per new bot."""
    clock = FakeClock()
    log = GrantLog(keep=600, idle_s=3600.0, max_bots=8000)
    sweeps = 0
    real_sweep = log.sweep

    def counted(now: float) -> None:
        nonlocal sweeps
        sweeps += 1
        real_sweep(now)

    log.sweep = counted  # type: ignore[method-assign]
    for n in range(40_000):
        log.add(f"st-{n}", clock(), clock())
    assert len(log) <= 8000 and sweeps <= 40_000 // 1000


def test_an_idle_bot_keeps_one_float_and_a_busy_one_is_trimmed() -> None:
    log = GrantLog(keep=5, idle_s=60.0)
    log.add("st-idle", 1.0, 1.0)
    assert log.times("st-idle") == (1.0,)
    for t in range(100):
        log.add("st-busy", float(t), float(t))
    assert len(log.times("st-busy")) <= 5 + 8 and log.times("st-busy")[-1] == 99.0


def test_a_window_of_many_calls_keeps_no_stale_grants() -> None:
    """`keep` far above what the bot makes in a window: grants older than two windows go."""
    log = GrantLog(keep=1_000_000_000, idle_s=60.0)
    for t in range(3 * AGE_TRIM_EVERY):
        log.add("st-busy", t * 0.1, t * 0.1)  # 10 grants a second
    times = log.times("st-busy")
    assert times[-1] == (3 * AGE_TRIM_EVERY - 1) * 0.1
    assert len(times) <= 120 * 10 + AGE_TRIM_EVERY  # two windows' worth, plus one trim period
    assert times[0] >= times[-1] - 120 - AGE_TRIM_EVERY * 0.1


def test_the_gateway_tracks_at_most_max_tracked_bots() -> None:
    assert MAX_TRACKED_BOTS == BOTS  # the figure above is the worst case of a real limiter
