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
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

from gateway.http import loop as event_loop

TOKEN_ENV = "BENCH_FLOOR_AUTH"
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
TOKEN = web.AppKey("token", str)


async def deactivate(request: web.Request) -> web.Response:
    body: dict[str, Any] = await request.json()
    bot_id = request.match_info["botId"]
    app = request.app
    payload = {"userId": body["userId"], "status": "inactive", "channel": body.get("channel")}
    async with app[SESSION].put(f"{app[UPSTREAM]}/api/public/bot/{bot_id}/session",
                                json=payload, headers={"auth": app[TOKEN]}) as resp:
        answer = await resp.json()
    return web.json_response({"success": answer.get("success") is True, "botId": bot_id,
                              "userId": body["userId"], "channel": body.get("channel")},
                             status=200 if resp.status == 200 else 502)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _session(app: web.Application) -> Any:
    app[SESSION] = aiohttp.ClientSession()
    yield
    await app[SESSION].close()


def make_app(upstream: str, token: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM], app[TOKEN] = upstream.rstrip("/"), token
    app.cleanup_ctx.append(_session)
    app.router.add_post("/v1/bots/{botId}/sessions/deactivate", deactivate)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int, upstream: str, token: str) -> None:
    runner = web.AppRunner(make_app(upstream, token), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=True, backlog=1024).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def _worker(host: str, port: int, upstream: str, token: str) -> None:
    event_loop.run(serve(host, port, upstream, token))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="base URL of the session API stub")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    token = os.environ[TOKEN_ENV]
    if args.workers == 1:  # served by this process (`benchmarks.instructions` counts it)
        event_loop.run(serve(host, int(port), args.upstream, token))
        return 0
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(host, int(port), args.upstream, token))
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
