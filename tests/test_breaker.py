"""Tests for gateway.breaker: closed → open → half-open → closed, on a fake clock."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from gateway.errors import UpstreamCircuitOpen, UpstreamError, UpstreamUnavailable
from tests.conftest import FakeClock

HOST = "bots.kore.example"
THRESHOLD = 3
COOLDOWN_S = 10.0


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(HOST, failures=THRESHOLD, cooldown_s=COOLDOWN_S, clock=clock)


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.before_call()
        breaker.record(False)


def opened(breaker: CircuitBreaker) -> CircuitBreaker:
    fail(breaker, THRESHOLD)
    assert breaker.state == OPEN
    return breaker


class TestCircuitBreaker:
    def test_starts_closed_and_lets_calls_through(self, breaker: CircuitBreaker) -> None:
        for _ in range(10):
            breaker.before_call()
            breaker.record(True)
        assert breaker.state == CLOSED and breaker.failures == 0

    def test_stays_closed_below_threshold(self, breaker: CircuitBreaker) -> None:
        fail(breaker, THRESHOLD - 1)
        assert breaker.state == CLOSED
        breaker.before_call()

    def test_opens_after_n_consecutive_failures(self, breaker: CircuitBreaker) -> None:
        fail(breaker, THRESHOLD)
        assert breaker.state == OPEN
        with pytest.raises(UpstreamCircuitOpen):
            breaker.before_call()

    def test_success_resets_the_run(self, breaker: CircuitBreaker) -> None:
        fail(breaker, THRESHOLD - 1)
        breaker.before_call()
        breaker.record(True)
        fail(breaker, THRESHOLD - 1)
        assert breaker.state == CLOSED and breaker.failures == THRESHOLD - 1

    def test_fails_fast_during_cooldown(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(3)
        with pytest.raises(UpstreamCircuitOpen) as caught:
            breaker.before_call()
        exc = caught.value
        # the contract maps upstream_unavailable to 502; the breaker adds Retry-After
        assert (exc.status, exc.code) == (502, "upstream_unavailable")
        assert isinstance(exc, UpstreamUnavailable) and isinstance(exc, UpstreamError)
        assert exc.retry_after_s == pytest.approx(COOLDOWN_S - 3)
        assert HOST in exc.message

    def test_retry_after_never_below_one_second(self, breaker: CircuitBreaker,
                                                clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S - 0.2)
        with pytest.raises(UpstreamCircuitOpen) as caught:
            breaker.before_call()
        assert caught.value.retry_after_s == pytest.approx(1.0)

    def test_every_call_fails_fast_until_cooldown_ends(self, breaker: CircuitBreaker,
                                                       clock: FakeClock) -> None:
        opened(breaker)
        for _ in range(9):
            clock.advance(1)
            with pytest.raises(UpstreamCircuitOpen):
                breaker.before_call()
        assert breaker.state == OPEN

    def test_half_open_lets_exactly_one_probe(self, breaker: CircuitBreaker,
                                              clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S)
        breaker.before_call()  # the probe
        assert breaker.state == HALF_OPEN
        for _ in range(5):
            with pytest.raises(UpstreamCircuitOpen) as caught:
                breaker.before_call()
            assert caught.value.retry_after_s is not None and caught.value.retry_after_s >= 1

    def test_probe_success_closes(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S)
        breaker.before_call()
        breaker.record(True)
        assert breaker.state == CLOSED and breaker.failures == 0
        for _ in range(3):
            breaker.before_call()
            breaker.record(True)
        fail(breaker, THRESHOLD - 1)  # a fresh run is needed to open again
        assert breaker.state == CLOSED

    def test_probe_failure_reopens_for_a_new_cooldown(self, breaker: CircuitBreaker,
                                                      clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S + 5)
        breaker.before_call()
        breaker.record(False)
        assert breaker.state == OPEN
        with pytest.raises(UpstreamCircuitOpen) as caught:
            breaker.before_call()
        assert caught.value.retry_after_s == pytest.approx(COOLDOWN_S)
        clock.advance(COOLDOWN_S)
        breaker.before_call()  # the next probe
        assert breaker.state == HALF_OPEN

    def test_released_probe_slot_goes_to_the_next_call(self, breaker: CircuitBreaker,
                                                       clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S)
        breaker.before_call()
        breaker.release()  # e.g. the audit write failed before the call went out
        breaker.before_call()
        with pytest.raises(UpstreamCircuitOpen):
            breaker.before_call()

    def test_threshold_of_one(self, clock: FakeClock) -> None:
        breaker = CircuitBreaker(HOST, failures=1, cooldown_s=0.5, clock=clock)
        fail(breaker, 1)
        assert breaker.state == OPEN
        clock.advance(0.5)
        breaker.before_call()
        breaker.record(True)
        assert breaker.state == CLOSED

    def test_detail(self, breaker: CircuitBreaker) -> None:
        fail(breaker, 1)
        assert breaker.detail() == {"host": HOST, "state": CLOSED, "consecutiveFailures": 1}


class TestBreakerLogs:
    def test_state_changes_are_logged(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        with capture_logs() as logs:
            fail(breaker, THRESHOLD)
            clock.advance(COOLDOWN_S)
            breaker.before_call()
            breaker.record(True)
        assert [entry["event"] for entry in logs] == [
            "upstream.circuit_open", "upstream.circuit_half_open", "upstream.circuit_closed"]
        assert all(entry["host"] == HOST and entry["log_level"] == "warning" for entry in logs)
        assert logs[0]["failures"] == THRESHOLD

    def test_no_log_without_a_state_change(self, breaker: CircuitBreaker) -> None:
        with capture_logs() as logs:
            fail(breaker, THRESHOLD - 1)
            breaker.before_call()
            breaker.record(True)
        assert logs == []

    def test_reopening_is_logged(self, breaker: CircuitBreaker, clock: FakeClock) -> None:
        opened(breaker)
        clock.advance(COOLDOWN_S)
        with capture_logs() as logs:
            breaker.before_call()
            breaker.record(False)
        assert [entry["event"] for entry in logs] == [
            "upstream.circuit_half_open", "upstream.circuit_open"]
