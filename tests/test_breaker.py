"""Tests for gateway.breaker: each bot's circuit closed → open → half-open → closed, the host's
circuit only for failures across many bots, and bounded memory, on a fake clock."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from gateway.breaker import (
    CLOSED,
    HALF_OPEN,
    HOST,
    OPEN,
    CircuitBreaker,
    Pass,
)
from gateway.errors import UpstreamCircuitOpen, UpstreamError, UpstreamUnavailable
from tests.conftest import FakeClock

HOST_NAME = "bots.kore.example"
THRESHOLD = 3
COOLDOWN_S = 10.0
HOST_BOTS = 4
BOT = "st-a"


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(HOST_NAME, failures=THRESHOLD, cooldown_s=COOLDOWN_S,
                          host_bots=HOST_BOTS, window_s=60, clock=clock)


def fail(breaker: CircuitBreaker, times: int, bot: str = BOT) -> None:
    for _ in range(times):
        breaker.record(breaker.before_call(bot), False)


def succeed(breaker: CircuitBreaker, bot: str = BOT) -> None:
    breaker.record(breaker.before_call(bot), True)


def opened(breaker: CircuitBreaker, bot: str = BOT) -> CircuitBreaker:
    fail(breaker, THRESHOLD, bot)
    assert breaker.bot_state(bot) == OPEN
    return breaker


def refused(breaker: CircuitBreaker, bot: str = BOT) -> UpstreamCircuitOpen:
    with pytest.raises(UpstreamCircuitOpen) as caught:
        breaker.before_call(bot)
    return caught.value


class TestBotCircuit:
    def test_starts_closed_and_lets_calls_through(self, breaker: CircuitBreaker) -> None:
        for _ in range(10):
            succeed(breaker)
        assert breaker.bot_state(BOT) == CLOSED and breaker.bot_failures(BOT) == 0

    def test_stays_closed_below_threshold(self, breaker: CircuitBreaker) -> None:
        fail(breaker, THRESHOLD - 1)
        assert breaker.bot_state(BOT) == CLOSED
        breaker.before_call(BOT)

    def test_opens_after_n_consecutive_failures(self, breaker: CircuitBreaker) -> None:
        fail(breaker, THRESHOLD)
        assert breaker.bot_state(BOT) == OPEN
        refused(breaker)

    def test_one_bot_open_never_refuses_another_bot(self, breaker: CircuitBreaker) -> None:
        opened(breaker)
        for _ in range(50):
            refused(breaker)
            succeed(breaker, "st-other")
        assert breaker.state == CLOSED and breaker.bot_state("st-other") == CLOSED

    def test_success_resets_the_run(self, breaker: CircuitBreaker) -> None:
        fail(breaker, THRESHOLD - 1)
        succeed(breaker)
        fail(breaker, THRESHOLD - 1)
        assert breaker.bot_state(BOT) == CLOSED and breaker.bot_failures(BOT) == THRESHOLD - 1

    def test_fails_fast_during_cooldown(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(3)
        exc = refused(breaker)
        # the contract maps upstream_unavailable to 502; the breaker adds Retry-After
        assert (exc.status, exc.code) == (502, "upstream_unavailable")
        assert isinstance(exc, UpstreamUnavailable) and isinstance(exc, UpstreamError)
        assert exc.retry_after_s == pytest.approx(COOLDOWN_S - 3)
        assert HOST_NAME in exc.message and BOT in exc.message

    def test_retry_after_never_below_one_second(self, breaker: CircuitBreaker,
                                                clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S - 0.2)
        assert refused(breaker).retry_after_s == pytest.approx(1.0)

    def test_half_open_lets_exactly_one_probe(self, breaker: CircuitBreaker,
                                              clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S)
        ticket = breaker.before_call(BOT)  # the probe
        assert ticket.bot_probe and breaker.bot_state(BOT) == HALF_OPEN
        for _ in range(5):
            retry = refused(breaker).retry_after_s
            assert retry is not None and retry >= 1

    def test_probe_success_closes_and_forgets_the_bot(self, breaker: CircuitBreaker,
                                                      clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S)
        succeed(breaker)
        assert breaker.bot_state(BOT) == CLOSED and breaker.bot_failures(BOT) == 0
        assert breaker.detail()["openBots"] == 0
        fail(breaker, THRESHOLD - 1)  # a fresh run is needed to open again
        assert breaker.bot_state(BOT) == CLOSED

    def test_probe_failure_reopens_only_that_bot(self, breaker: CircuitBreaker,
                                                 clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S + 5)
        fail(breaker, 1)
        assert breaker.bot_state(BOT) == OPEN and breaker.state == CLOSED
        assert refused(breaker).retry_after_s == pytest.approx(COOLDOWN_S)
        succeed(breaker, "st-other")
        clock.advance(COOLDOWN_S)
        assert breaker.before_call(BOT).bot_probe  # the next probe
        assert breaker.bot_state(BOT) == HALF_OPEN

    def test_late_failure_while_half_open_does_not_reopen(self, breaker: CircuitBreaker,
                                                          clock: FakeClock) -> None:
        """Only the probe decides: a call sent before the circuit opened ends later."""
        fail(breaker, THRESHOLD - 1)
        late = breaker.before_call(BOT)
        fail(breaker, 1)
        clock.advance(COOLDOWN_S)
        probe = breaker.before_call(BOT)
        breaker.record(late, False)
        assert breaker.bot_state(BOT) == HALF_OPEN
        breaker.record(probe, True)
        assert breaker.bot_state(BOT) == CLOSED

    def test_released_probe_slot_goes_to_the_next_call(self, breaker: CircuitBreaker,
                                                       clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S)
        breaker.release(breaker.before_call(BOT))  # e.g. the audit write failed
        breaker.before_call(BOT)
        refused(breaker)

    def test_threshold_of_one(self, clock: FakeClock) -> None:
        breaker = CircuitBreaker(HOST_NAME, failures=1, cooldown_s=0.5, clock=clock)
        fail(breaker, 1)
        assert breaker.bot_state(BOT) == OPEN
        clock.advance(0.5)
        succeed(breaker)
        assert breaker.bot_state(BOT) == CLOSED


class TestHostCircuit:
    def test_one_bot_failing_forever_never_opens_the_host(self, breaker: CircuitBreaker,
                                                          clock: FakeClock) -> None:
        for _ in range(100):
            clock.advance(COOLDOWN_S)
            try:
                fail(breaker, 1)
            except UpstreamCircuitOpen:
                pass
        assert breaker.state == CLOSED
        succeed(breaker, "st-other")

    def test_failures_across_many_bots_open_the_host(self, breaker: CircuitBreaker) -> None:
        for n in range(HOST_BOTS - 1):
            fail(breaker, 1, f"st-{n}")
        assert breaker.state == CLOSED
        fail(breaker, 1, "st-last")
        assert breaker.state == OPEN
        exc = refused(breaker, "st-never-seen")
        assert exc.code == "upstream_unavailable" and exc.retry_after_s == pytest.approx(
            COOLDOWN_S)

    def test_a_success_between_failures_keeps_the_host_closed(self,
                                                              breaker: CircuitBreaker) -> None:
        for n in range(3 * HOST_BOTS):
            fail(breaker, 1, f"st-{n}")
            if n % (HOST_BOTS - 1) == 0:
                succeed(breaker, "st-healthy")
        assert breaker.state == CLOSED

    def test_failures_older_than_the_window_do_not_count(self, breaker: CircuitBreaker,
                                                         clock: FakeClock) -> None:
        for n in range(HOST_BOTS - 1):
            fail(breaker, 1, f"st-{n}")
        clock.advance(61)
        fail(breaker, 1, "st-late")
        assert breaker.state == CLOSED and breaker.detail()["failingBots"] == 1

    def test_half_open_host_lets_one_probe_per_bot(self, breaker: CircuitBreaker,
                                                   clock: FakeClock) -> None:
        for n in range(HOST_BOTS):
            fail(breaker, 1, f"st-{n}")
        clock.advance(COOLDOWN_S)
        tickets = [breaker.before_call(f"st-p{n}") for n in range(HOST_BOTS)]
        assert breaker.state == HALF_OPEN and all(t.host_probe for t in tickets)
        refused(breaker, "st-p0")  # one probe per bot
        refused(breaker, "st-more")  # at most host_bots at once
        breaker.record(tickets[0], True)
        assert breaker.state == CLOSED

    def test_one_bots_failing_probes_never_reopen_the_host(self, breaker: CircuitBreaker,
                                                           clock: FakeClock) -> None:
        for n in range(HOST_BOTS):
            fail(breaker, 1, f"st-{n}")
        clock.advance(COOLDOWN_S)
        for _ in range(THRESHOLD):
            fail(breaker, 1, "st-broken")  # caller B's bot takes probe after probe
        assert breaker.state == HALF_OPEN and breaker.bot_state("st-broken") == OPEN
        succeed(breaker, "st-good")
        assert breaker.state == CLOSED

    def test_failing_probes_of_many_bots_reopen_the_host(self, breaker: CircuitBreaker,
                                                         clock: FakeClock) -> None:
        for n in range(HOST_BOTS):
            fail(breaker, 1, f"st-{n}")
        clock.advance(COOLDOWN_S)
        for n in range(HOST_BOTS):
            fail(breaker, 1, f"st-p{n}")
        assert breaker.state == OPEN

    def test_bot_probe_slot_is_freed_when_the_host_refuses(self, breaker: CircuitBreaker,
                                                          clock: FakeClock) -> None:
        opened(breaker)  # BOT is one of the failing bots
        clock.advance(COOLDOWN_S)
        for n in range(HOST_BOTS - 1):
            fail(breaker, 1, f"st-{n}")
        assert breaker.state == OPEN
        refused(breaker)  # the bot would probe, the host refuses
        clock.advance(COOLDOWN_S)
        assert breaker.before_call(BOT) == Pass(BOT, bot_probe=True, host_probe=True)


class TestBotMemory:
    def test_healthy_bots_cost_nothing(self, breaker: CircuitBreaker) -> None:
        for n in range(1000):
            succeed(breaker, f"st-{n}")
        assert len(breaker._bots) == 0

    def test_failing_bots_are_bounded_oldest_first(self, clock: FakeClock) -> None:
        breaker = CircuitBreaker(HOST_NAME, failures=1, cooldown_s=1, max_bots=100,
                                 host_bots=10**6, clock=clock)
        for n in range(1000):
            fail(breaker, 1, f"st-{n}")
        assert len(breaker._bots) == 100 and breaker.bot_state("st-999") == OPEN
        assert breaker.bot_state("st-0") == CLOSED  # evicted: forgotten, so closed
        assert breaker.detail()["openBots"] == 100

    def test_idle_bots_are_forgotten(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(breaker.idle_s + 1)
        fail(breaker, 1, "st-other")
        assert list(breaker._bots) == ["st-other"] and breaker.detail()["openBots"] == 0

    def test_detail(self, breaker: CircuitBreaker) -> None:
        fail(breaker, 1)
        opened(breaker, "st-b")
        assert breaker.detail() == {
            "host": HOST_NAME, "state": CLOSED, "consecutiveFailures": THRESHOLD + 1,
            "failingBots": 2, "openBots": 1, "openBotIds": ["st-b"]}


class TestBreakerLogs:
    def test_state_changes_are_logged(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        with capture_logs() as logs:
            fail(breaker, THRESHOLD)
            clock.advance(COOLDOWN_S)
            succeed(breaker)
        assert [entry["event"] for entry in logs] == [
            "upstream.circuit_open", "upstream.circuit_half_open", "upstream.circuit_closed"]
        assert all(entry["host"] == HOST_NAME and entry["bot"] == BOT
                   and entry["log_level"] == "warning" for entry in logs)
        assert logs[0]["failures"] == THRESHOLD

    def test_host_changes_are_logged_with_bot_star(self, breaker: CircuitBreaker) -> None:
        with capture_logs() as logs:
            for n in range(HOST_BOTS):
                fail(breaker, 1, f"st-{n}")
        assert [(e["event"], e["bot"]) for e in logs] == [("upstream.circuit_open", HOST)]

    def test_no_log_without_a_state_change(self, breaker: CircuitBreaker) -> None:
        with capture_logs() as logs:
            fail(breaker, THRESHOLD - 1)
            succeed(breaker)
        assert logs == []

    def test_reopening_is_logged(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S)
        with capture_logs() as logs:
            fail(breaker, 1)
        assert [entry["event"] for entry in logs] == [
            "upstream.circuit_half_open", "upstream.circuit_open"]
