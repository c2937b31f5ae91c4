"""The supervisor of `serve --workers N`: starts the workers, relays signals, restarts the dead.

A worker that exits without being asked to (a crash, SIGKILL, the kernel's OOM killer) is
started again in its slot after a backoff (0.1 s, doubling with each death of that slot within
the last 60 s, at most 5 s), with a `worker.died` and a `worker.restarted` log line. The new
worker counts itself in `kgw_worker_restarts_total` and takes over its slot's audit file,
continuing the chain from the file's last complete record (`AuditLog.open`). A slot that dies
more than 5 times within 60 s is in a crash loop (typically a worker that fails at start):
every other worker is drained and `serve` exits non-zero with one clear error, rather than
restarting for ever.

SIGTERM/SIGINT stop restarts and become one SIGTERM per worker (each drains); SIGHUP is relayed
to workers ready to take it (`HangupRelay`). Signal handlers only note the signal and wake the
loop through a pipe; everything else happens in the loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.connection
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

import structlog

from gateway.metrics import worker_exited

log = structlog.get_logger(__name__)

MAX_DEATHS = 5  # deaths of one slot within DEATH_WINDOW_S that are still restarted
DEATH_WINDOW_S = 60.0
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 5.0
RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

StartWorker = Callable[[int, int], BaseProcess]
"""Starts the worker of slot `n` (its `restarts`-th restart, 0 at first) and returns it."""


class HangupRelay:
    """SIGHUP from the supervisor to its workers, never fatal to a worker still starting.

    SIGHUP's default action ends a process, so only workers that have installed their handler
    are signalled; a worker that gets ready after a SIGHUP reloads by itself (a restarted
    worker too: it starts from the supervisor's config, which a reload may have outdated).
    """

    def __init__(self, ctx: BaseContext, workers: int) -> None:
        self.hangups = ctx.Value("q", 0, lock=False)  # lock-free: written in a signal handler
        self.ready = [ctx.Value("b", 0, lock=False) for _ in range(workers)]

    def worker_ready(self, worker: int) -> bool:
        """Marks `worker` ready; True when a SIGHUP came before (it runs a stale config)."""
        self.ready[worker].value = 1
        return bool(self.hangups.value)

    def starting(self, worker: int) -> None:
        self.ready[worker].value = 0

    def forward(self, procs: Sequence[BaseProcess | None]) -> None:
        self.hangups.value += 1
        for flag, proc in zip(self.ready, procs, strict=True):
            if flag.value and proc is not None and proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)


@dataclass
class Slot:
    """One worker position: its current process, its recent deaths, its pending restart."""

    number: int
    proc: BaseProcess | None = None
    deaths: deque[float] = field(default_factory=deque)
    restarts: int = 0
    restart_at: float | None = None


class CrashLoop(Exception):
    """A slot died more than MAX_DEATHS times within DEATH_WINDOW_S."""


class Supervisor:
    """Runs `workers` worker processes until a stop signal or a crash loop; see the module."""

    def __init__(self, start: StartWorker, workers: int, relay: HangupRelay, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._start, self._relay, self._clock = start, relay, clock
        self.slots = [Slot(n) for n in range(workers)]
        self._stopping = False
        self._codes: list[int] = []  # exit codes of workers that were asked to stop
        self._failure: int | None = None  # exit code of `serve` after a crash loop
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def run(self) -> int:
        """Starts every worker and supervises them; returns `serve`'s exit code."""
        previous = {signum: signal.signal(signum, self._note) for signum in RELAYED}
        try:
            for slot in self.slots:
                self._launch(slot)
            while self._live() or (self._pending() and not self._stopping):
                self._step()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self._failure is not None:
            return self._failure
        return max([0, *self._codes])

    # -- the loop ----------------------------------------------------------------------------

    def _step(self) -> None:
        by_sentinel = {slot.proc.sentinel: slot for slot in self._live() if slot.proc}
        ready = multiprocessing.connection.wait([self._wake_r, *by_sentinel],
                                                timeout=self._next_restart_in())
        if self._wake_r in ready:
            self._take_signals()
        for sentinel in ready:
            if sentinel in by_sentinel:
                self._reap(by_sentinel[sentinel])
        if not self._stopping:
            now = self._clock()
            for slot in self._pending():
                if slot.restart_at is not None and slot.restart_at <= now:
                    slot.restarts += 1
                    self._launch(slot)

    def _live(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.proc is not None]

    def _pending(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.proc is None and slot.restart_at is not None]

    def _next_restart_in(self) -> float | None:
        due = [s.restart_at for s in self._pending() if s.restart_at is not None]
        if self._stopping or not due:
            return None
        return max(0.0, min(due) - self._clock())

    def _launch(self, slot: Slot) -> None:
        slot.restart_at = None
        self._relay.starting(slot.number)
        try:
            with _signals_blocked():  # the child resets the handlers it inherits first
                slot.proc = self._start(slot.number, slot.restarts)
        except OSError as exc:  # fork refused (EAGAIN, ENOMEM): a death like any other
            self._died(slot, None, 1, f"not started: {exc.strerror or exc}")
            return
        if slot.restarts:
            log.info("worker.restarted", worker=slot.number, pid=slot.proc.pid,
                     restarts=slot.restarts)

    def _reap(self, slot: Slot) -> None:
        proc = slot.proc
        assert proc is not None
        proc.join()
        slot.proc = None
        if proc.pid is not None:
            worker_exited(proc.pid)
        code = proc.exitcode if proc.exitcode is not None else 1
        if self._stopping:
            self._codes.append(code)
            return
        self._died(slot, proc.pid, code, describe_exit(code))

    def _died(self, slot: Slot, pid: int | None, code: int, cause: str) -> None:
        now = self._clock()
        slot.deaths.append(now)
        while slot.deaths and slot.deaths[0] < now - DEATH_WINDOW_S:
            slot.deaths.popleft()
        if len(slot.deaths) > MAX_DEATHS:
            self._crash_loop(slot, cause, code)
            return
        delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (len(slot.deaths) - 1))
        slot.restart_at = now + delay
        log.warning("worker.died", worker=slot.number, pid=pid, cause=cause,
                    restart_in_s=delay, deaths_in_window=len(slot.deaths))

    def _crash_loop(self, slot: Slot, cause: str, code: int) -> None:
        message = (f"worker {slot.number} died {len(slot.deaths)} times within "
                   f"{DEATH_WINDOW_S:g} s (last: {cause}); stopping every worker")
        log.error("worker.crash_loop", worker=slot.number, deaths=len(slot.deaths),
                  window_s=DEATH_WINDOW_S, cause=cause)
        print(f"serve: {message}", file=sys.stderr, flush=True)
        self._failure = code if code > 0 else 1
        self._stop()

    # -- signals -----------------------------------------------------------------------------

    def _note(self, signum: int, _frame: object) -> None:
        """The handler: notes the signal and wakes the loop (safe to run anywhere)."""
        self._signals.append(signum)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"s")

    def _take_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass
        taken, self._signals = self._signals, []
        for signum in taken:
            if signum == signal.SIGHUP:
                self._relay.forward([slot.proc for slot in self.slots])
            else:
                self._stop()

    def _stop(self) -> None:
        """SIGTERM to every worker (SIGINT too: workers drain on SIGTERM only); no restarts."""
        self._stopping = True
        for slot in self.slots:
            slot.restart_at = None
            proc = slot.proc
            if proc is not None and proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)


def describe_exit(code: int) -> str:
    """ "exit code 2", "SIGKILL" (a negative exit code is the signal that ended it)."""
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Relayed signals held back while a worker is forked: until it has reset the handlers it
    inherits (`worker_signals`), a signal would run the supervisor's handler in the worker."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, RELAYED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def worker_signals() -> None:
    """First thing in a worker: default SIGTERM/SIGHUP until the event loop installs its own
    handlers, SIGINT ignored (the supervisor turns Ctrl-C into SIGTERM), then unblocked."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED)
    die_with_supervisor()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_supervisor() -> None:
    """On Linux, the kernel sends this worker SIGTERM when the supervisor dies, even by
    SIGKILL or the OOM killer: no worker is left behind, orphaned, holding the port and the
    output. (It drains as on any SIGTERM.) Elsewhere nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)
