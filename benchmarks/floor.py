"""The aiohttp floor: the barest proxy the gateway's own stack can make, as a benchmark peer.

`python -m benchmarks.floor --listen HOST:PORT --upstream URL --workers N` serves
`POST /v1/bots/{botId}/sessions/deactivate` the way the gateway does, minus every feature:
it parses the JSON body, sends one `PUT /api/public/bot/{botId}/session` with a static `auth`
header (a long-lived JWT read from `$BENCH_FLOOR_AUTH`) on one shared keep-alive
`ClientSession`, reads the answer and answers JSON. The same aiohttp, the same event loop
(`gateway.http.loop`: uvloop) and the same worker model as `serve --workers N` (forked
workers sharing the port with SO_REUSEPORT). Idiomatic aiohttp, no tuning either way: no caller
keys, input rules, audit, token renewal, rate limit, logs or metrics. What the gateway costs
above this is the price of its features.

With `--audit-dir DIR` it is the **floor with the contract's audit I/O** and nothing else of
the audit: per deactivation two lines of the size of the gateway's records, the first written
and fsynced before the PUT, the second after Kore.ai's answer and not waited for (contract §3);
one writer thread per worker, one `write` and one `fsync` for all lines waiting (group commit),
the waiting request released by one `call_soon_threadsafe` per commit. No chain, no hash, no
encoding, no recovery: the least any gateway bound by the contract writes to its disk. What it
costs above the floor is the contract's share of each budget, not the gateway's code.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

from gateway.http import loop as event_loop

TOKEN_ENV = "BENCH_FLOOR_AUTH"
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
TOKEN = web.AppKey("token", str)
# Two records the size of the gateway's in the benchmark (439 and 538 bytes, newline included).
_FIELDS = (b'"app":"bench","botId":"st-bench-bot","caller":"bench-caller","channel":"rtm",'
           b'"client":"127.0.0.1","event":"deactivate.%s","prev":"' + b"0" * 64 + b'",'
           b'"requestId":"' + b"0" * 32 + b'","route":"POST /v1/bots/{botId}/sessions/'
           b'deactivate","seq":1,"ts":"2026-12-04T00:00:00.000000Z","userId":"u-1001"')
REQUESTED = b"{" + _FIELDS % b"requested" + b',"hash":"' + b"0" * 64 + b'"}\n'
COMPLETED = (b"{" + _FIELDS % b"completed" + b',"outcome":"success","status":200,'
             b'"upstreamStatus":200,"attempts":1,"durationMs":1.234,"error":null,'
             b'"hash":"' + b"0" * 64 + b'"}\n')


class AuditIO:
    """The contract's audit I/O alone: lines appended by the event loop, written and fsynced
    by one thread in group commits; `durable(line)` resolves once its line is on the disk."""

    def __init__(self, path: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.waiting: list[tuple[bytes, asyncio.Future[None] | None]] = []
        self.ready = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._commits, name="audit-io", daemon=True)
        self.thread.start()

    def durable(self, line: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()
        self._append(line, future)
        return future

    def later(self, line: bytes) -> None:
        self._append(line, None)

    def _append(self, line: bytes, future: asyncio.Future[None] | None) -> None:
        with self.ready:
            self.waiting.append((line, future))
            self.ready.notify()

    def _commits(self) -> None:
        while True:
            with self.ready:
                while not self.waiting and not self.closed:
                    self.ready.wait()
                if not self.waiting:
                    return
                batch, self.waiting = self.waiting, []
            failed: OSError | None = None
            try:
                os.write(self.fd, b"".join(line for line, _ in batch))
                os.fsync(self.fd)
            except OSError as exc:  # the waiting requests fail (500): never left hanging
                failed = exc
            futures = [f for _, f in batch if f is not None]
            if futures:
                self.loop.call_soon_threadsafe(_release, futures, failed)

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify()
        self.thread.join(timeout=5)
        os.close(self.fd)


def _release(futures: list[asyncio.Future[None]], failed: OSError | None) -> None:
    for future in futures:
        if not future.done():
            if failed is None:
                future.set_result(None)
            else:
                future.set_exception(failed)


AUDIT = web.AppKey("audit", AuditIO)


async def deactivate(request: web.Request) -> web.Response:
    body: dict[str, Any] = await request.json()
    bot_id = request.match_info["botId"]
    app = request.app
    audit = app.get(AUDIT)
    if audit is not None:
        await audit.durable(REQUESTED)  # the requested record, durable before the PUT
    payload = {"userId": body["userId"], "status": "inactive", "channel": body.get("channel")}
    async with app[SESSION].put(f"{app[UPSTREAM]}/api/public/bot/{bot_id}/session",
                                json=payload, headers={"auth": app[TOKEN]}) as resp:
        answer = await resp.json()
    if audit is not None:
        audit.later(COMPLETED)  # the terminal record: the answer need not wait for it
    return web.json_response({"success": answer.get("success") is True, "botId": bot_id,
                              "userId": body["userId"], "channel": body.get("channel")},
                             status=200 if resp.status == 200 else 502)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _session(app: web.Application) -> Any:
    app[SESSION] = aiohttp.ClientSession()
    yield
    await app[SESSION].close()


def _audit_io(directory: str) -> Any:
    async def ctx(app: web.Application) -> Any:
        app[AUDIT] = AuditIO(os.path.join(directory, f"audit-{os.getpid()}.jsonl"))
        yield
        app[AUDIT].close()
    return ctx


def make_app(upstream: str, token: str, audit_dir: str | None = None) -> web.Application:
    app = web.Application()
    app[UPSTREAM], app[TOKEN] = upstream.rstrip("/"), token
    app.cleanup_ctx.append(_session)
    if audit_dir is not None:
        app.cleanup_ctx.append(_audit_io(audit_dir))
    app.router.add_post("/v1/bots/{botId}/sessions/deactivate", deactivate)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int, upstream: str, token: str,
                audit_dir: str | None = None) -> None:
    runner = web.AppRunner(make_app(upstream, token, audit_dir), access_log=None,
                           handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=True, backlog=1024).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def _worker(host: str, port: int, upstream: str, token: str, audit_dir: str | None) -> None:
    event_loop.run(serve(host, port, upstream, token, audit_dir))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="base URL of the session API stub")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--audit-dir", help="add the contract's audit I/O, one file a worker here")
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    token = os.environ[TOKEN_ENV]
    if args.workers == 1:  # served by this process (`benchmarks.instructions` counts it)
        event_loop.run(serve(host, int(port), args.upstream, token, args.audit_dir))
        return 0
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker,
                         args=(host, int(port), args.upstream, token, args.audit_dir))
             for _ in range(args.workers)]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    return max(proc.exitcode or 0 for proc in procs)


if __name__ == "__main__":
    sys.exit(main())
