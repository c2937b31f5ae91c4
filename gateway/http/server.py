"""Running the gateway: one worker per process on a shared port, signals and graceful drain.

SIGTERM/SIGINT: readiness turns 503 and new deactivations are shed at once, in-flight ones
finish (bounded by `server.drain_s`; past it they are cancelled and audited as cut short), the
audit log is flushed and closed, exit 0. A second signal exits at once, after any audit write
in progress has finished (`AuditLog.halt`), so no line is torn by it.
SIGHUP (and `--watch-config`): the config is re-read and callers and apps swapped live
(`reload.py`); the supervisor of `--workers N` forwards it to every worker.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.context import BaseContext

import structlog
from aiohttp import web

from gateway.audit.log import AuditOpenError
from gateway.config.model import Config, with_changes
from gateway.http import loop as event_loop
from gateway.http.app import RUNTIME, create_app
from gateway.http.connection import GatewayRunner
from gateway.http.reload import Reloader
from gateway.metrics import in_worker, multiprocess_dir, worker_exited
from gateway.ratelimit.shared import shared_table

log = structlog.get_logger(__name__)

DRAIN_POLL_S = 0.02
CANCEL_WAIT_S = 2.0  # past drain_s: how long cancelled requests get to write their records


class ListenError(Exception):
    """The listen address cannot be bound (in use, not local, no permission)."""


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    """Header limits, keep-alive and slow-client timeouts from `[server]` (`connection.py`)."""
    return GatewayRunner(app, config.server, handle_signals=False, shutdown_timeout=1.0)


async def run_worker(config: Config, *, worker: int = 0, workers: int = 1,
                     on_ready: Callable[[], None] | None = None, watch_s: float | None = None,
                     relay: HangupRelay | None = None) -> int:
    """Serves until a signal; returns the process exit code. SIGHUP reloads the config."""
    app = create_app(config, worker=worker, workers=workers)
    reloader = Reloader(app[RUNTIME], watch_s=watch_s)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.request)
    runner = make_runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port,
                       reuse_port=workers > 1 or None, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError(f"cannot listen on {config.server.listen}: "
                          f"{exc.strerror or exc}") from None
    log.info("gateway.listening", listen=config.server.listen, worker=worker, pid=os.getpid())
    reloader.start()
    if relay is not None and relay.worker_ready(worker):
        reloader.request()  # a SIGHUP came while this worker was starting
    if on_ready is not None:
        on_ready()
    stop = asyncio.Event()
    _install_signals(stop, halt=app[RUNTIME].audit.halt, supervised=relay is not None)
    await stop.wait()
    await reloader.aclose()
    rt = app[RUNTIME]
    rt.draining = True
    log.info("gateway.draining", in_flight=rt.in_flight, drain_s=config.server.drain_s)
    deadline = time.monotonic() + config.server.drain_s
    while rt.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    if rt.in_flight:
        log.warning("gateway.drain_timeout", in_flight=rt.in_flight)
        await rt.cancel_in_flight(CANCEL_WAIT_S)  # they audit their end before the log closes
    await runner.cleanup()
    log.info("gateway.stopped", worker=worker)
    return 0


def _install_signals(stop: asyncio.Event, halt: Callable[[], bool], *,
                     supervised: bool = False) -> None:
    """A supervised worker ignores SIGINT: Ctrl-C in a terminal reaches the whole process
    group, and the supervisor turns it into one SIGTERM per worker (so the drain happens)."""
    loop = asyncio.get_running_loop()
    if supervised:
        loop.add_signal_handler(signal.SIGINT, lambda: None)

    def on_signal(signum: int) -> None:
        if stop.is_set():
            halted = halt()  # an audit write in progress finishes first: no torn line
            log.warning("gateway.killed", signal=signal.Signals(signum).name, audit_halted=halted)
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGTERM,) if supervised else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def serve(config: Config, workers: int = 1, *, watch_s: float | None = None) -> int:
    # Both set before spawning: the workers share their metrics and what Kore.ai's rate-limit
    # answers taught (`ratelimit/shared.py`).
    with multiprocess_dir(workers), shared_table(config.rate_limit, workers):
        if workers <= 1:
            return event_loop.run(run_worker(config, watch_s=watch_s))
        config = _claim_port(config)
        ctx = (multiprocessing.get_context("fork") if start_method() == "fork"
               else multiprocessing.get_context("spawn"))
        relay = HangupRelay(ctx, workers)
        procs = [ctx.Process(target=_worker_main, args=(config, n, workers, watch_s, relay),
                             name=f"worker-{n}")
                 for n in range(workers)]
        for proc in procs:
            proc.start()
        return _supervise(procs, relay)


def _worker_main(config: Config, worker: int, workers: int, watch_s: float | None,
                 relay: HangupRelay) -> None:
    from gateway.logs import configure

    in_worker()
    configure(config.logging.level, config.logging.format)
    structlog.contextvars.bind_contextvars(worker=worker)
    try:
        code = event_loop.run(run_worker(config, worker=worker, workers=workers,
                                         watch_s=watch_s, relay=relay))
    except AuditOpenError as exc:  # a clear line, not a traceback from every worker
        print(f"configuration error:\n{config.source}: audit.path: {exc}", file=sys.stderr)
        code = 2
    except ListenError as exc:
        print(f"listen error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


class HangupRelay:
    """SIGHUP from the supervisor to its workers, never fatal to a worker still starting.

    SIGHUP's default action ends a process, so only workers that have installed their handler
    are signalled; a worker that gets ready after a SIGHUP reloads by itself.
    """

    def __init__(self, ctx: BaseContext, workers: int) -> None:
        self.hangups = ctx.Value("q", 0, lock=False)  # lock-free: written in a signal handler
        self.ready = [ctx.Value("b", 0, lock=False) for _ in range(workers)]

    def worker_ready(self, worker: int) -> bool:
        """Marks `worker` ready; True when a SIGHUP came before (it runs a stale config)."""
        self.ready[worker].value = 1
        return bool(self.hangups.value)

    def forward(self, procs: Sequence[multiprocessing.process.BaseProcess]) -> None:
        self.hangups.value += 1
        for flag, proc in zip(self.ready, procs, strict=True):
            if flag.value and proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)


def _supervise(procs: Sequence[multiprocessing.process.BaseProcess], relay: HangupRelay) -> int:
    """Forwards SIGTERM/SIGINT/SIGHUP to the workers and waits for all of them."""
    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)  # SIGINT too: workers drain on SIGTERM only

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: relay.forward(procs))
    codes = []
    waiting = list(procs)
    while waiting:  # in exit order: a worker's live gauges go as soon as it does
        ready = multiprocessing.connection.wait([proc.sentinel for proc in waiting])
        for proc in [p for p in waiting if p.sentinel in ready]:
            waiting.remove(proc)
            proc.join()
            if proc.pid is not None:
                worker_exited(proc.pid)
            codes.append(proc.exitcode or 0)
    return max(codes)


def start_method() -> str:
    """How workers start: "fork" copies the supervisor, modules already imported, so a worker
    is ready in milliseconds rather than after a second of imports of its own ("spawn"); spawn
    is kept for a supervisor in which some library started a thread, which a fork would copy
    mid-use."""
    return "fork" if threading.active_count() == 1 else "spawn"


def _claim_port(config: Config) -> Config:
    """SO_REUSEPORT would let workers share a port another program already holds: refuse it.

    Port 0 is resolved here, once, so that every worker listens on the same port."""
    host = config.server.host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, config.server.port))
        port = probe.getsockname()[1]
    if port == config.server.port:
        return config
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    claimed: Config = with_changes(config, server=with_changes(config.server, listen=listen))
    return claimed
