"""Running the gateway: one worker per process on a shared port, signals and graceful drain.

Each worker serves the API on `server.listen` and, when `server.admin_listen` is set, the
operations routes (`create_admin_app`) on that second address, both shared by the workers of
`--workers N` through SO_REUSEPORT. Starting, relaying signals to and restarting the workers
is `supervisor.py`'s.

SIGTERM/SIGINT: readiness turns 503 and new deactivations are shed at once, in-flight ones
finish (bounded by `server.drain_s`; past it they are cancelled and audited as cut short), the
audit log is flushed and closed, exit 0. A second signal exits at once, after any audit write
in progress has finished (`AuditLog.halt`), so no line is torn by it.
SIGHUP (and `--watch-config`): the config is re-read and callers and apps swapped live
(`reload.py`); the supervisor of `--workers N` forwards it to every worker.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import structlog
from aiohttp import web

from gateway.audit.log import AuditOpenError
from gateway.config.model import Config, split_listen, with_changes
from gateway.errors import ListenError
from gateway.http import loop as event_loop
from gateway.http.app import RUNTIME, create_admin_app, create_app, unmatched_expectation
from gateway.http.connection import GatewayRunner
from gateway.http.gate import FD_RESERVED, fd_capped, raise_fd_limit
from gateway.http.reload import Reloader
from gateway.http.runtime import Runtime
from gateway.http.supervisor import HangupRelay, Supervisor, worker_signals
from gateway.logs import LogFile, LogFileError, configure, flush_access, worker_file
from gateway.metrics import in_worker, multiprocess_dir
from gateway.ratelimit.shared import shared_table

log = structlog.get_logger(__name__)

DRAIN_POLL_S = 0.02
CANCEL_WAIT_S = 2.0  # past drain_s: how long cancelled requests get to write their records


def make_runner(app: web.Application, config: Config, *, admin: bool = False
                ) -> web.AppRunner:
    """Header limits, connection limits, keep-alive and slow-client timeouts from `[server]`
    (`connection.py`); `max_connections` within the file-descriptor limit (`gate.py`). The
    connection metrics are the API listener's: the admin listener counts its own apart."""
    reserved = FD_RESERVED + config.upstream.max_connections
    return GatewayRunner(app, config.server, handle_signals=False, shutdown_timeout=1.0,
                         max_connections=fd_capped(config.server.max_connections, reserved),
                         metrics=None if admin else app[RUNTIME].metrics,
                         unmet_expectation=unmatched_expectation)


async def run_worker(config: Config, *, worker: int = 0, workers: int = 1,
                     on_ready: Callable[[], None] | None = None, watch_s: float | None = None,
                     relay: HangupRelay | None = None, restarted: bool = False) -> int:
    """Serves until a signal; returns the process exit code. SIGHUP reloads the config."""
    app = create_app(config, worker=worker, workers=workers)
    rt = app[RUNTIME]
    if restarted:
        rt.metrics.worker_restarted()
    reloader = Reloader(rt, watch_s=watch_s)
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.request)
    runners = await _listen(app, config, reuse_port=workers > 1)
    settle_heap()
    log.info("gateway.listening", worker=worker, pid=os.getpid(),
             **{key: _address(runner) for key, runner in zip(("listen", "admin_listen"),
                                                            runners, strict=False)})
    reloader.start()
    if relay is not None and relay.worker_ready(worker):
        reloader.request()  # a SIGHUP came while this worker was starting
    if on_ready is not None:
        on_ready()
    stop = asyncio.Event()
    _install_signals(stop, halt=rt.audit.halt, supervised=relay is not None)
    await stop.wait()
    await reloader.aclose()
    await _drain(rt, config.server.drain_s)
    for runner in reversed(runners):  # the admin site first: the API app closes the runtime
        await runner.cleanup()
    log.info("gateway.stopped", worker=worker)
    flush_access()
    return 0


# Net new container objects between two young collections (CPython's default is 700). The
# requests in flight keep a few thousand objects alive, so at 700 the collector walked them
# again about every 17 requests, and then again in every middle collection, to find almost
# no garbage (requests make no cycles worth collecting). 4.6 % of a deactivation's
# instructions, 8 % of its CPU time under load (`docs/benchmarks/README.md`).
GC_YOUNG_THRESHOLD = 20_000


def settle_heap() -> None:
    """Moves what start-up allocated (modules, config, the app: about 67,000 objects) out of
    the cyclic collector's reach: each full collection under load walked all of them again,
    about 8 % of a request's CPU time (`docs/benchmarks/README.md`). Young collections then
    run every `GC_YOUNG_THRESHOLD` net new objects instead of 700."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


async def _listen(app: web.Application, config: Config, *, reuse_port: bool
                  ) -> list[web.AppRunner]:
    """Starts the API site, then the admin site when `server.admin_listen` is set."""
    runners: list[web.AppRunner] = []
    sites = [(app, config.server.listen)]
    if config.server.admin_listen:
        sites.append((create_admin_app(app[RUNTIME]), config.server.admin_listen))
    try:
        for site_app, listen in sites:
            runner = make_runner(site_app, config, admin=site_app is not app)
            runners.append(runner)
            await runner.setup()  # the API app's setup starts the runtime (audit log open …)
            host, port = split_listen(listen)
            site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=1024)
            try:
                await site.start()
            except OSError as exc:
                raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    except BaseException:
        for runner in reversed(runners):
            await runner.cleanup()
        raise
    return runners


def _address(runner: web.AppRunner) -> str:
    """HOST:PORT a runner's site is bound to (port 0 resolved)."""
    host, port = runner.addresses[0][:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _drain(rt: Runtime, drain_s: float) -> None:
    """Readiness 503 and new calls shed at once; in-flight calls get `drain_s` to finish."""
    rt.draining = True
    log.info("gateway.draining", in_flight=rt.in_flight, drain_s=drain_s)
    deadline = time.monotonic() + drain_s
    while rt.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    if rt.in_flight:
        log.warning("gateway.drain_timeout", in_flight=rt.in_flight)
        await rt.cancel_in_flight(CANCEL_WAIT_S)  # they audit their end before the log closes


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
    raise_fd_limit()  # every client connection is a descriptor; workers inherit the limit
    # Both set before spawning: the workers share their metrics and what Kore.ai's rate-limit
    # answers taught (`ratelimit/shared.py`).
    with multiprocess_dir(workers), shared_table(config.rate_limit, workers):
        if workers <= 1:
            return event_loop.run(run_worker(config, watch_s=watch_s))
        config = _claim_ports(config)
        ctx = (multiprocessing.get_context("fork") if start_method() == "fork"
               else multiprocessing.get_context("spawn"))
        relay = HangupRelay(ctx, workers)

        def start(worker: int, restarts: int) -> BaseProcess:
            proc = ctx.Process(target=_worker_main, name=f"worker-{worker}",
                               args=(config, worker, workers, watch_s, relay, restarts))
            proc.start()
            return proc

        return Supervisor(start, workers, relay).run()


def open_log_file(config: Config, worker: int | None = None) -> LogFile | None:
    """The `logging.file` of this process: the path itself for a single process or the
    supervisor, `{stem}-w{n}{suffix}` for worker n. Raises LogFileError."""
    if not config.logging.file:
        return None
    path = config.logging.file if worker is None else worker_file(config.logging.file, worker)
    return LogFile(path, config.logging.file_max_bytes)


def _worker_main(config: Config, worker: int, workers: int, watch_s: float | None,
                 relay: HangupRelay, restarts: int = 0) -> None:
    worker_signals()
    in_worker()
    try:
        configure(config.logging.level, config.logging.format, open_log_file(config, worker))
    except LogFileError as exc:
        print(f"configuration error:\n{config.source}: logging.file: {exc}", file=sys.stderr)
        sys.exit(2)
    structlog.contextvars.bind_contextvars(worker=worker)
    try:
        code = event_loop.run(run_worker(config, worker=worker, workers=workers,
                                         watch_s=watch_s, relay=relay,
                                         restarted=restarts > 0))
    except AuditOpenError as exc:  # a clear line, not a traceback from every worker
        print(f"configuration error:\n{config.source}: audit.path: {exc}", file=sys.stderr)
        code = 2
    except ListenError as exc:
        print(f"listen error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


def start_method() -> str:
    """How workers start: "fork" copies the supervisor, modules already imported, so a worker
    is ready in milliseconds rather than after a second of imports of its own ("spawn"); spawn
    is kept for a supervisor in which some library started a thread, which a fork would copy
    mid-use."""
    return "fork" if threading.active_count() == 1 else "spawn"


def _claim_ports(config: Config) -> Config:
    """`server.listen` and `server.admin_listen` with port 0 resolved, once for every worker."""
    server = with_changes(config.server, listen=_claim_port(config.server.listen))
    if server.admin_listen:
        server = with_changes(server, admin_listen=_claim_port(server.admin_listen))
    claimed: Config = with_changes(config, server=server)
    return claimed


def _claim_port(listen: str) -> str:
    """SO_REUSEPORT would let workers share a port another program already holds: refuse it.

    Port 0 is resolved here, once, so that every worker listens on the same port."""
    host, wanted = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, wanted))
            port = probe.getsockname()[1]
    except OSError as exc:
        raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    if port == wanted:
        return listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
