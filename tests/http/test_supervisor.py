"""The supervisor of `serve --workers N`, driven with small real worker processes: a dead worker
is started again after a growing backoff, a crash loop stops everything, signals stop restarts.
The gateway's own workers under it are tests/integration/test_supervised_workers.py."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.http.supervisor import (
    BACKOFF_BASE_S,
    MAX_DEATHS,
    HangupRelay,
    Supervisor,
    describe_exit,
    worker_signals,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and fork")
CTX = multiprocessing.get_context("fork")
LONG_S = 60.0  # how long a healthy test worker would live if nothing stopped it


def _exit_at_once(code: int) -> None:
    worker_signals()
    os._exit(code)


def _live(seconds: float) -> None:
    worker_signals()
    time.sleep(seconds)


def _live_then_exit(seconds: float, code: int) -> None:
    worker_signals()
    time.sleep(seconds)
    os._exit(code)


class Starts:
    """A `StartWorker` recording every start: (slot, restarts, monotonic time)."""

    def __init__(self, plan: dict[int, Any]) -> None:
        self.plan = plan  # slot → (target, args) for each start of it
        self.log: list[tuple[int, int, float]] = []

    def __call__(self, slot: int, restarts: int) -> BaseProcess:
        self.log.append((slot, restarts, time.monotonic()))
        target, args = self.plan[slot](restarts)
        proc = CTX.Process(target=target, args=args, name=f"test-worker-{slot}")
        proc.start()
        return proc

    def of(self, slot: int) -> list[tuple[int, float]]:
        return [(restarts, at) for s, restarts, at in self.log if s == slot]


@pytest.fixture(autouse=True)
def _sigterm_harmless() -> Any:
    """The tests signal their own process: one arriving after the supervisor has returned
    must not end the test run."""
    previous = signal.signal(signal.SIGTERM, lambda _signum, _frame: None)
    yield
    signal.signal(signal.SIGTERM, previous)


def signal_self_after(seconds: float, signum: signal.Signals) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signum))
    timer.start()
    return timer


class TestRestarts:
    def test_dead_worker_is_restarted_with_a_growing_backoff_until_a_crash_loop(self) -> None:
        starts = Starts({0: lambda _: (_exit_at_once, (3,)), 1: lambda _: (_live, (LONG_S,))})
        began = time.monotonic()
        with capture_logs() as logs:
            code = Supervisor(starts, 2, HangupRelay(CTX, 2)).run()
        assert code == 3  # the crashing worker's own exit code
        assert time.monotonic() - began < LONG_S / 2  # the healthy worker was stopped too
        assert [r for r, _ in starts.of(0)] == list(range(MAX_DEATHS + 1))
        assert [r for r, _ in starts.of(1)] == [0]  # never restarted: it was asked to stop
        times = [at for _, at in starts.of(0)]
        for n, (before, after) in enumerate(itertools.pairwise(times)):
            assert after - before >= BACKOFF_BASE_S * 2 ** n * 0.9, (n, after - before)
        events = [e["event"] for e in logs]
        assert events.count("worker.died") == MAX_DEATHS
        assert events.count("worker.restarted") == MAX_DEATHS
        [loop] = [e for e in logs if e["event"] == "worker.crash_loop"]
        assert (loop["worker"], loop["deaths"], loop["cause"]) == (0, MAX_DEATHS + 1,
                                                                   "exit code 3")

    def test_crash_loop_prints_one_clear_error(self, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
        starts = Starts({0: lambda _: (_exit_at_once, (2,))})
        with capture_logs():
            assert Supervisor(starts, 1, HangupRelay(CTX, 1)).run() == 2
        err = capsys.readouterr().err
        assert err.count("serve: worker 0 died 6 times within 60 s (last: exit code 2); "
                         "stopping every worker") == 1

    def test_killed_worker_is_restarted_once_and_keeps_serving(self) -> None:
        """A worker that dies once is restarted at once (the first backoff), not given up."""
        starts = Starts({0: lambda restarts: (_live_then_exit, (0.2, 1)) if restarts == 0
                         else (_live, (LONG_S,))})
        timer = signal_self_after(1.5, signal.SIGTERM)
        try:
            with capture_logs() as logs:
                code = Supervisor(starts, 1, HangupRelay(CTX, 1)).run()
        finally:
            timer.cancel()
        assert code == 0
        (_, first), (_, second) = starts.of(0)
        assert second - first < 1.0
        [died] = [e for e in logs if e["event"] == "worker.died"]
        assert (died["cause"], died["restart_in_s"]) == ("exit code 1", BACKOFF_BASE_S)

    def test_signal_death_is_named(self) -> None:
        assert describe_exit(-signal.SIGKILL) == "SIGKILL"
        assert describe_exit(2) == "exit code 2"


class TestSignals:
    def test_sigterm_stops_every_worker_and_restarts_nothing(self) -> None:
        starts = Starts({n: lambda _: (_live, (LONG_S,)) for n in range(2)})
        timer = signal_self_after(0.5, signal.SIGTERM)
        began = time.monotonic()
        try:
            with capture_logs() as logs:
                code = Supervisor(starts, 2, HangupRelay(CTX, 2)).run()
        finally:
            timer.cancel()
        assert code == 0
        assert time.monotonic() - began < LONG_S / 2
        assert len(starts.log) == 2
        assert "worker.died" not in [e["event"] for e in logs]

    def test_sigterm_during_a_backoff_stops_without_waiting_for_it(self) -> None:
        """A slot waiting out its backoff is not restarted after a stop signal."""
        starts = Starts({0: lambda _: (_exit_at_once, (1,)), 1: lambda _: (_live, (LONG_S,))})
        timer = signal_self_after(1.0, signal.SIGTERM)  # slot 0 is in its 4th or 5th backoff
        try:
            with capture_logs():
                code = Supervisor(starts, 2, HangupRelay(CTX, 2)).run()
        finally:
            timer.cancel()
        assert code == 0
        assert len(starts.of(0)) < MAX_DEATHS + 1  # stopped before the crash loop
        last = max(at for _, at in starts.of(0))
        assert last < starts.log[0][2] + 1.2  # nothing started after the signal

    def test_handlers_are_restored(self) -> None:
        before = signal.getsignal(signal.SIGTERM)
        starts = Starts({0: lambda _: (_live, (LONG_S,))})
        timer = signal_self_after(0.3, signal.SIGTERM)
        try:
            with capture_logs():
                Supervisor(starts, 1, HangupRelay(CTX, 1)).run()
        finally:
            timer.cancel()
        assert signal.getsignal(signal.SIGTERM) is before


class TestStartFailures:
    def test_a_refused_fork_counts_as_a_death_and_is_retried(self) -> None:
        """A worker that cannot even be started (fork refused) is retried with the backoff,
        and a slot that never starts ends in the crash loop, not in a traceback."""
        tries: list[int] = []

        def refuse(slot: int, restarts: int) -> BaseProcess:
            tries.append(restarts)
            raise BlockingIOError(11, "Resource temporarily unavailable")

        with capture_logs() as logs:
            code = Supervisor(refuse, 1, HangupRelay(CTX, 1)).run()
        assert code == 1
        assert tries == list(range(MAX_DEATHS + 1))
        died = [e for e in logs if e["event"] == "worker.died"]
        assert died[0]["cause"] == "not started: Resource temporarily unavailable"
        assert died[0]["pid"] is None
