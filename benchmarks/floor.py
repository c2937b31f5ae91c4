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

With `--audit-dir DIR --contract-minimum` it is the **contract minimum**: the floor plus each
duty the contract sets on one successful deactivation, hard-wired in its cheapest correct form
(`minimum`, a handler of its own; the two modes above are untouched): the request ID (kept if
valid, else 16 random bytes in hex; answered, sent upstream and audited), the caller key (its
SHA-256 compared in constant time with the one digest of `$BENCH_FLOOR_CALLER_KEY`; 401
otherwise), the caller's bots glob `st-*` (each botId's match remembered) and the botId rule,
the input rules (415, 400), a cached JWT checked against its renewal time (the static token,
"renewed" from itself), a fixed-window rate limit and a consecutive-failure breaker per bot, two
audit records built as dicts, each given `ts`, `seq` and `prev` and hash-chained on the event
loop and written by the writer thread above (the first fsynced before the PUT, the second not
waited for; one file a worker, verifiable with `kore-gateway audit verify`), the Kore.ai PUT
with the request ID and its answer read and checked, one JSON access line a request (the lines
of one turn of the event loop in one `write`), and in-process metrics (a request counter by
route, status and caller, a duration histogram, the requests in flight). No configuration, no
failure handling beyond answering, no recovery; refusals are answered, logged and counted, not
audited. What it costs above the floor is the least any gateway bound by the contract spends on
its features, a lower bound for the gateway's.

With `--kept-behaviours` as well it is the **contract minimum with the gateway's two kept
behaviours**, the two things the gateway does on a successful deactivation beyond the contract,
in their cheapest form: the audit file's path looked at (`os.stat`, compared with the open
file's device and inode; a moved or replaced file is reopened) before each write, by the event
loop while the writer thread has nothing to do, else by the thread; and the terminal record
written into the file by the event loop itself before the answer while the thread has nothing
to do (the thread then fsyncs it, not waited for), else handed to the thread as before. What it
costs above the contract minimum is what those two behaviours cost any gateway, and a lower
bound for the gateway with them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway.http import loop as event_loop

if TYPE_CHECKING:  # imported at start-up by the contract minimum alone (`_import_minimum`)
    import hmac  # noqa: TC004

    import orjson  # noqa: TC004

    from gateway.jsoncodec import one_line  # noqa: TC004
    from gateway.logs import utc_timestamp  # noqa: TC004

TOKEN_ENV = "BENCH_FLOOR_AUTH"
CALLER_KEY_ENV = "BENCH_FLOOR_CALLER_KEY"  # --contract-minimum: the one caller's key
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
    by one thread in group commits; `durable(line)` resolves once its line is on the disk.

    `kept`: the gateway's two kept behaviours (`--kept-behaviours`): the path looked at before
    each write (`_follow`), and `write_now` for a terminal record."""

    def __init__(self, path: str, kept: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.path, self.kept = path, kept
        self.fd = self._open()
        self.waiting: list[tuple[bytes, asyncio.Future[None] | None]] = []
        self.ready = threading.Condition()
        self.committing = False  # the thread has taken a batch and not finished it
        self.looked = False  # the loop looked at the path for the lines waiting (`kept`)
        self.closed = False
        self.thread = threading.Thread(target=self._commits, name="audit-io", daemon=True)
        self.thread.start()

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(fd)
        self.identity = (st.st_dev, st.st_ino)
        return fd

    def _follow(self) -> None:
        """The look at the path: a moved, removed or replaced file is left for a new one
        there. Called by whoever touches the file now (the loop only while the thread is
        idle, under the lock)."""
        try:
            st = os.stat(self.path)
            current = (st.st_dev, st.st_ino) == self.identity
        except OSError:
            current = False
        if not current:
            os.close(self.fd)
            self.fd = self._open()

    def durable(self, line: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()
        self._append(line, future)
        return future

    def later(self, line: bytes) -> None:
        self._append(line, None)

    def _append(self, line: bytes, future: asyncio.Future[None] | None) -> None:
        with self.ready:
            if self.kept and not self.waiting and not self.committing:
                self._follow()  # on the loop: the thread has nothing to do
                self.looked = True  # once for the write of every line that joins these
            self.waiting.append((line, future))
            self.ready.notify()

    def write_now(self, line: bytes) -> bool:
        """The line written by the loop itself, now, when the thread has nothing to do; its
        fsync is handed to the thread and not waited for. False: the thread is at work (or
        has work), and the line must go the usual way."""
        with self.ready:
            if self.waiting or self.committing:
                return False
            self._follow()
            os.write(self.fd, line)
            self.waiting.append((b"", None))  # its fsync, which needs no look; a line that
            self.looked = False  # joins it before the thread takes it is looked at by the thread
            self.ready.notify()
        return True

    def _commits(self) -> None:
        while True:
            with self.ready:
                while not self.waiting and not self.closed:
                    self.ready.wait()
                if not self.waiting:
                    return
                batch, self.waiting = self.waiting, []
                looked, self.looked = self.looked, False
                self.committing = self.kept
            failed: OSError | None = None
            try:
                data = b"".join(line for line, _ in batch)
                if self.kept and data and not looked:
                    self._follow()  # the thread's look: the loop could not make it
                os.write(self.fd, data)
                os.fsync(self.fd)
            except OSError as exc:  # the waiting requests fail (500): never left hanging
                failed = exc
            if self.kept:
                with self.ready:
                    self.committing = False
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


# --- the contract minimum (`--contract-minimum`) ------------------------------------------
# Every piece of state is per process (each worker has its own): one caller, one app, no
# configuration. Module globals; the session, the upstream URL and the audit I/O are the app's,
# looked up as the floor does.

ROUTE = "/v1/bots/{botId}/sessions/deactivate"
AUDIT_ROUTE = "POST " + ROUTE
CALLER = "bench-caller"
CALLER_BOTS = "st-*"
APP_NAME = "bench"
ANONYMOUS = "anonymous"  # the metrics' caller of a request without a valid key
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
BOT_ID_RE = re.compile(r"st-[A-Za-z0-9-]{1,100}")  # also rules out "." and ".."
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode Cc
CHANNEL_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_USER_ID = 256
TOKEN_TTL_S, RENEW_BEFORE_S = 600.0, 60.0
RATE_LIMIT, RATE_WINDOW_S = 1_000_000_000, 60.0  # on, never reached in a benchmark
BREAKER_FAILURES, BREAKER_OPEN_S = 5, 30.0
BOT_CACHE_MAX = 16_384
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ZERO_HASH = "0" * 64

_caller_digest = b""  # SHA-256 of the caller key: the key itself is never kept
_static_token = ""
_jwt: tuple[str, float] = ("", 0.0)  # the cached token and when to renew it (monotonic)
_bot_allowed: dict[str, bool] = {}  # botId → fnmatchcase(botId, CALLER_BOTS)
_windows: dict[str, list[float]] = {}  # botId → [window start, calls in it]
_failures: dict[str, list[float]] = {}  # botId → [consecutive failures, time of the last]
_seq, _prev = 0, ZERO_HASH  # the audit chain, advanced on the event loop: append order
_access: list[bytes] = []  # access lines of this turn of the event loop
_requests: dict[tuple[str, int, str], int] = {}  # (route, status, caller) → count
_duration_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)  # per bucket (le), the last one +Inf
_duration_sum = 0.0
_in_flight = 0


def _import_minimum() -> None:
    """The contract minimum's own modules, imported in its processes only: the floor's stay as
    they were (orjson is 0.3 MiB of RSS; the gateway's `logs` brings structlog)."""
    global hmac, orjson, one_line, utc_timestamp
    import hmac

    import orjson

    from gateway.jsoncodec import one_line
    from gateway.logs import utc_timestamp


def _mint() -> str:
    """The cached JWT renewed: the static token again, for another TTL."""
    global _jwt
    _jwt = (_static_token, time.monotonic() + TOKEN_TTL_S - RENEW_BEFORE_S)
    return _static_token


def _chained(record: dict[str, Any]) -> bytes:
    """`record` given ts, seq and prev, as its audit line: canonical form plus hash."""
    global _seq, _prev
    _seq += 1
    record["ts"], record["seq"], record["prev"] = utc_timestamp(), _seq, _prev
    canonical = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    _prev = hashlib.sha256(_prev.encode() + canonical).hexdigest()
    line = canonical[:-1] + b',"hash":"' + _prev.encode() + b'"}\n'
    return line if line.isascii() else one_line(line)  # U+2028 and the like escaped


class TurnBatch:
    """The contract minimum's audit appends: the lines of one turn of the event loop go to the
    writer thread together (one wake-up, one commit for all of them; what arrives while a
    commit runs waits for the next), as the gateway's group commit gathers them."""

    def __init__(self, io: AuditIO) -> None:
        self.io = io
        self.lines: list[bytes] = []
        self.future: asyncio.Future[None] | None = None  # shared by the turn's durable lines

    def durable(self, line: bytes) -> asyncio.Future[None]:
        self.later(line)
        if self.future is None:
            self.future = self.io.loop.create_future()
        return self.future

    def later(self, line: bytes) -> None:
        if not self.lines:
            self.io.loop.call_soon(self._hand_over)
        self.lines.append(line)

    def _hand_over(self) -> None:
        data, future = b"".join(self.lines), self.future
        self.lines, self.future = [], None
        self.io._append(data, future)


_batch: TurnBatch | None = None  # set by the first request (the app's AuditIO)


def _flush_access() -> None:
    lines = b"\n".join(_access) + b"\n"
    _access.clear()
    os.write(2, lines)


def _refusal(status: int, code: str, message: str, request_id: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message, "requestId": request_id}})
    response = web.Response(body=body, status=status, content_type="application/json")
    response.headers["X-Request-ID"] = request_id
    return response


async def minimum(request: web.Request) -> web.Response:
    """The floor plus the contract's per-request duties, in the contract's order."""
    global _in_flight, _duration_sum, _batch
    started = time.monotonic()
    request_id = request.headers.get("X-Request-ID")
    if request_id is None or REQUEST_ID_RE.fullmatch(request_id) is None:
        request_id = os.urandom(16).hex()
    logged_id = request_id if "eyj" not in request_id.lower() else "[redacted-jwt]"  # no JWT logged
    caller: str | None = None
    status = 500  # unless set below: an exception aiohttp answers
    _in_flight += 1
    try:
        scheme, _, key = (request.headers.get("Authorization") or "").partition(" ")
        digest = hashlib.sha256(key.strip().encode("utf-8", "surrogateescape")).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, _caller_digest):
            status = 401
            response = _refusal(401, "unauthenticated", "the API key is missing or not valid",
                                request_id)
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        caller = CALLER

        bot_id = request.match_info["botId"]
        if BOT_ID_RE.fullmatch(bot_id) is None:
            status = 400
            return _refusal(400, "invalid_request", "botId is not valid", request_id)
        allowed = _bot_allowed.get(bot_id)
        if allowed is None:
            if len(_bot_allowed) >= BOT_CACHE_MAX:
                _bot_allowed.clear()
            allowed = _bot_allowed[bot_id] = fnmatchcase(bot_id, CALLER_BOTS)
        if not allowed:
            status = 403
            return _refusal(403, "forbidden", f"caller {CALLER} may not touch bot {bot_id}",
                            request_id)

        if request.content_type != "application/json":
            status = 415
            return _refusal(415, "unsupported_media_type",
                            "send the body as Content-Type: application/json", request_id)
        try:
            body = orjson.loads(await request.read())
        except ValueError:
            body = None
        user_id = channel = None
        has_channel = False  # optional as a key; when present, a string (null is refused)
        if type(body) is dict:
            has_channel = "channel" in body
            if len(body) == 1 + has_channel:  # no other key
                user_id, channel = body.get("userId"), body.get("channel")
        if (type(user_id) is not str or not 0 < len(user_id) <= MAX_USER_ID
                or CONTROL_RE.search(user_id) is not None
                or has_channel and (type(channel) is not str
                                    or CHANNEL_RE.fullmatch(channel) is None)):
            status = 400
            return _refusal(400, "invalid_request", "the body must be a JSON object with "
                            "userId (1-256 characters) and an optional channel", request_id)

        token, renew_at = _jwt
        if started >= renew_at:
            token = _mint()

        window = _windows.get(bot_id)
        if window is None or started - window[0] >= RATE_WINDOW_S:
            window = _windows[bot_id] = [started, 0]
        if window[1] >= RATE_LIMIT:
            status = 429
            response = _refusal(429, "rate_limited", "too many calls for this bot", request_id)
            response.headers["Retry-After"] = str(int(window[0] + RATE_WINDOW_S - started) + 1)
            return response
        window[1] += 1
        failures = _failures.get(bot_id)
        if (failures is not None and failures[0] >= BREAKER_FAILURES
                and started - failures[1] < BREAKER_OPEN_S):
            status = 503
            return _refusal(503, "upstream_unavailable", "Kore.ai is failing for this bot; "
                            "calls are paused", request_id)

        app = request.app
        audit = _batch if _batch is not None else TurnBatch(app[AUDIT])
        _batch = audit
        record: dict[str, Any] = {
            "event": "deactivate.requested", "requestId": request_id, "caller": CALLER,
            "client": request.remote, "route": AUDIT_ROUTE, "botId": bot_id, "userId": user_id,
            "channel": channel, "app": APP_NAME}
        await audit.durable(_chained(record))  # durable before the PUT

        kore_body = {"userId": user_id, "status": "inactive"}
        if channel is not None:  # Kore.ai takes a channel as a string or not at all
            kore_body["channel"] = channel
        upstream_status: int | None = None
        ok = False
        try:
            async with app[SESSION].put(
                    f"{app[UPSTREAM]}/api/public/bot/{bot_id}/session",
                    data=orjson.dumps(kore_body),
                    headers={"auth": token, "X-Request-ID": request_id,
                             "Content-Type": "application/json"}) as resp:
                upstream_status = resp.status
                raw = await resp.read()
            if 200 <= upstream_status < 300:
                answer = orjson.loads(raw)
                ok = type(answer) is dict and answer.get("success") is True
        except (aiohttp.ClientError, TimeoutError, ValueError):
            pass
        status = 200 if ok else 502
        record["event"] = "deactivate.completed"
        record["outcome"] = "success" if ok else "failed"
        record["status"] = status
        record["upstreamStatus"] = upstream_status
        record["attempts"] = 1
        record["durationMs"] = round((time.monotonic() - started) * 1000, 3)
        record["error"] = None if ok else "upstream_unavailable"
        line = _chained(record)  # the terminal record: the answer does not wait for it
        if not (audit.io.kept and not audit.lines and audit.io.write_now(line)):
            audit.later(line)  # (with the kept behaviours: in the file before the answer)
        if ok:
            if failures is not None:
                _failures.pop(bot_id, None)
        elif upstream_status is None or upstream_status >= 500:  # an outage, not a refusal
            failures = _failures.setdefault(bot_id, [0, 0.0])
            failures[0] += 1
            failures[1] = time.monotonic()
        if not ok:
            return _refusal(502, "upstream_unavailable", "Kore.ai did not close the session",
                            request_id)

        response = web.Response(
            body=orjson.dumps({"success": True, "botId": bot_id, "userId": user_id,
                               "channel": channel, "requestId": request_id}),
            content_type="application/json")
        response.headers["X-Request-ID"] = request_id
        return response
    finally:
        _in_flight -= 1
        seconds = time.monotonic() - started
        if not _access:
            asyncio.get_running_loop().call_soon(_flush_access)
        _access.append(orjson.dumps({
            "event": "request", "method": request.method, "route": ROUTE, "status": status,
            "caller": caller, "duration_ms": round(seconds * 1000, 3), "request_id": logged_id,
            "level": "info", "timestamp": utc_timestamp()}))
        counted = (ROUTE, status, caller or ANONYMOUS)
        _requests[counted] = _requests.get(counted, 0) + 1
        _duration_counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        _duration_sum += seconds


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _session(app: web.Application) -> Any:
    app[SESSION] = aiohttp.ClientSession()
    yield
    await app[SESSION].close()


def _audit_io(directory: str, kept: bool = False) -> Any:
    async def ctx(app: web.Application) -> Any:
        app[AUDIT] = AuditIO(os.path.join(directory, f"audit-{os.getpid()}.jsonl"), kept)
        yield
        app[AUDIT].close()
    return ctx


def make_app(upstream: str, token: str, audit_dir: str | None = None,
             caller_digest: bytes | None = None, kept: bool = False) -> web.Application:
    """`caller_digest` (the SHA-256 of the caller key) selects the contract minimum, which
    needs `audit_dir`; `kept` adds the gateway's two kept behaviours to it."""
    global _caller_digest, _static_token
    if kept and caller_digest is None:
        raise ValueError("the kept behaviours are the contract minimum's")
    app = web.Application()
    app[UPSTREAM], app[TOKEN] = upstream.rstrip("/"), token
    app.cleanup_ctx.append(_session)
    if audit_dir is not None:
        app.cleanup_ctx.append(_audit_io(audit_dir, kept))
    handler = deactivate
    if caller_digest is not None:
        if audit_dir is None:
            raise ValueError("the contract minimum needs an audit directory")
        _import_minimum()
        _caller_digest, _static_token = caller_digest, token
        _mint()
        handler = minimum
    app.router.add_post(ROUTE, handler)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(host: str, port: int, upstream: str, token: str,
                audit_dir: str | None = None, caller_digest: bytes | None = None,
                kept: bool = False) -> None:
    runner = web.AppRunner(make_app(upstream, token, audit_dir, caller_digest, kept),
                           access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=True, backlog=1024).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def _worker(host: str, port: int, upstream: str, token: str, audit_dir: str | None,
            caller_digest: bytes | None, kept: bool) -> None:
    event_loop.run(serve(host, port, upstream, token, audit_dir, caller_digest, kept))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--upstream", required=True, help="base URL of the session API stub")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--audit-dir", help="add the contract's audit I/O, one file a worker here")
    parser.add_argument("--contract-minimum", action="store_true",
                        help=f"add every per-request duty of the contract, cheapest form "
                             f"(needs --audit-dir; the caller key in ${CALLER_KEY_ENV})")
    parser.add_argument("--kept-behaviours", action="store_true",
                        help="add the gateway's two kept behaviours to the contract minimum "
                             "(needs --contract-minimum)")
    args = parser.parse_args(argv)
    if args.contract_minimum and args.audit_dir is None:
        parser.error("--contract-minimum needs --audit-dir")
    if args.kept_behaviours and not args.contract_minimum:
        parser.error("--kept-behaviours needs --contract-minimum")
    host, port = args.listen.rsplit(":", 1)
    token = os.environ[TOKEN_ENV]
    digest = None
    if args.contract_minimum:
        digest = hashlib.sha256(os.environ[CALLER_KEY_ENV].encode("utf-8")).digest()
    if args.workers == 1:  # served by this process (`benchmarks.instructions` counts it)
        event_loop.run(serve(host, int(port), args.upstream, token, args.audit_dir, digest,
                             args.kept_behaviours))
        return 0
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker,
                         args=(host, int(port), args.upstream, token, args.audit_dir, digest,
                               args.kept_behaviours))
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
