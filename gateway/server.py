"""Running the gateway: one worker per process on a shared port, signals and graceful drain.

SIGTERM/SIGINT: readiness turns 503 and new deactivations are shed at once, in-flight ones
finish (bounded by `server.drain_s`), the audit log is flushed and closed, exit 0. A second
signal exits at once; every audit line is one `write()`, so none is torn by it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

import structlog
from aiohttp import web

from gateway.app import RUNTIME, create_app
from gateway.config import Config

log = structlog.get_logger(__name__)

DRAIN_POLL_S = 0.02


def make_runner(app: web.Application, config: Config) -> web.AppRunner:
    server = config.server
    return web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=1.0,
        max_line_size=server.max_header_bytes, max_field_size=server.max_header_bytes,
        max_headers=server.max_headers, keepalive_timeout=75)


async def run_worker(config: Config, *, worker: int = 0, workers: int = 1,
                     on_ready: Callable[[], None] | None = None) -> int:
    """Serves until a signal; returns the process exit code."""
    app = create_app(config, worker=worker, workers=workers)
    runner = make_runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port,
                       reuse_port=workers > 1 or None, backlog=1024)
    await site.start()
    log.info("gateway.listening", listen=config.server.listen, worker=worker, pid=os.getpid())
    if on_ready is not None:
        on_ready()
    stop = asyncio.Event()
    _install_signals(stop)
    await stop.wait()
    rt = app[RUNTIME]
    rt.draining = True
    log.info("gateway.draining", in_flight=rt.in_flight, drain_s=config.server.drain_s)
    deadline = time.monotonic() + config.server.drain_s
    while rt.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    if rt.in_flight:
        log.warning("gateway.drain_timeout", in_flight=rt.in_flight)
    await runner.cleanup()
    log.info("gateway.stopped", worker=worker)
    return 0


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("gateway.killed", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def serve(config: Config, workers: int = 1) -> int:
    if workers <= 1:
        return asyncio.run(run_worker(config))
    _check_port_free(config)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(config, n, workers), name=f"worker-{n}")
             for n in range(workers)]
    for proc in procs:
        proc.start()
    return _supervise(procs)


def _worker_main(config: Config, worker: int, workers: int) -> None:
    from gateway.logs import configure

    configure(config.logging.level, config.logging.format)
    structlog.contextvars.bind_contextvars(worker=worker)
    sys.exit(asyncio.run(run_worker(config, worker=worker, workers=workers)))


def _supervise(procs: list[multiprocessing.process.BaseProcess]) -> int:
    """Forwards SIGTERM/SIGINT to the workers and waits for all of them."""
    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for proc in procs:
        proc.join()
        codes.append(proc.exitcode or 0)
    return max(codes)


def _check_port_free(config: Config) -> None:
    """SO_REUSEPORT would let workers share a port another program already holds."""
    family = socket.AF_INET6 if ":" in config.server.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((config.server.host, config.server.port))
