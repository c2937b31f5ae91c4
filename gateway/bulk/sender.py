"""Sending rows to a running gateway: the engine of `kore-gateway deactivate`.

Owns the sending side of a bulk run: bounded concurrency over one aiohttp session,
honouring 429/503 `Retry-After`, and a clean stop on Ctrl-C. Speaks to the gateway only
through its public route; knows nothing of Kore.ai, tokens or the audit log. The command
line is `bulk_cli.py`, the input and results files `rows.py`, the live display `progress.py`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from gateway.bulk.progress import Progress
from gateway.bulk.rows import FAILED, NOT_DONE, SUCCEEDED, Result, ResultsFile, Row
from gateway.config.model import Secret

# Errors a rerun would only repeat: the row itself is wrong or refused. Every other error
# (401, 429, 5xx, no answer …) leaves the row not done, so that a rerun sends it again.
FINAL_CODES = frozenset({"invalid_request", "forbidden", "bot_not_configured",
                         "upstream_rejected", "payload_too_large", "not_found"})
WAIT_STATUSES = (429, 503)  # answers whose Retry-After the run waits out, then retries

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_KEY_ENV = "KORE_GATEWAY_KEY"
DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MAX_WAIT_S = 60.0  # a longer Retry-After is cut to this
DEFAULT_TIMEOUT_S = 30.0  # one request; the gateway's own deadline is shorter
DEFAULT_GRACE_S = 5.0  # after Ctrl-C, in-flight rows get this long before they are abandoned
DEFAULT_RETRY_AFTER_S = 1.0  # a 429/503 without a usable Retry-After
MAX_ANSWER_BYTES = 65536
CONNECT_BACKOFF_S = 0.5  # first wait after a connection error, doubled per attempt


@dataclass(frozen=True, slots=True)
class Options:
    url: str = DEFAULT_URL
    key: Secret | None = None  # None: the gateway runs with auth = "none"
    concurrency: int = DEFAULT_CONCURRENCY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_wait_s: float = DEFAULT_MAX_WAIT_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    grace_s: float = DEFAULT_GRACE_S


@dataclass(slots=True)
class Summary:
    succeeded: int = 0
    failed: int = 0
    not_done: int = 0
    skipped_succeeded: int = 0
    skipped_failed: int = 0
    unsent: int = 0  # rows never sent because the run was stopped
    stopped_by: str | None = None  # "SIGINT"/"SIGTERM", or why the run gave up
    last: Result | None = None

    def count(self, result: Result) -> None:
        if result.status == SUCCEEDED:
            self.succeeded += 1
        elif result.status == FAILED:
            self.failed += 1
        else:
            self.not_done += 1

    def exit_code(self, signum: int | None = None) -> int:
        if signum is not None:
            return 128 + signum
        return 1 if self.failed or self.not_done or self.unsent or self.skipped_failed else 0

    def line(self) -> str:
        sent = self.succeeded + self.failed + self.not_done
        text = (f"{sent} row(s) sent: {self.succeeded} succeeded, {self.failed} failed, "
                f"{self.not_done} not done")
        if self.unsent:
            text += f"; {self.unsent} not sent"
        skipped = self.skipped_succeeded + self.skipped_failed
        if skipped:
            text += (f"; {skipped} skipped as already done ({self.skipped_succeeded} succeeded, "
                     f"{self.skipped_failed} failed)")
        return text


# --- sending --------------------------------------------------------------------------------

@dataclass(slots=True)
class Answer:
    status: int  # 0: no HTTP answer
    code: str
    request_id: str
    wait_s: float | None  # set when the row may be retried after this long


class Stop:
    """Ctrl-C once: stop sending, let in-flight rows finish for `grace_s`. Twice: at once."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.now = asyncio.Event()
        self.reason: str | None = None
        self.signum: int | None = None

    def signal(self, signum: int) -> None:
        if self.requested.is_set():
            self.now.set()
        self.signum = signum
        self.stop(signal.Signals(signum).name)

    def stop(self, reason: str) -> None:
        if not self.requested.is_set():
            self.reason = reason
            self.requested.set()


class Pacer:
    """One "not before" time for the whole run: a Retry-After holds back every row."""

    def __init__(self) -> None:
        self.not_before = 0.0

    def hold(self, seconds: float) -> None:
        self.not_before = max(self.not_before, time.monotonic() + seconds)

    async def wait(self, stop: Stop) -> bool:
        """Sleeps until sending is allowed; True when the run was stopped meanwhile."""
        while (delay := self.not_before - time.monotonic()) > 0 and not stop.requested.is_set():
            try:
                await asyncio.wait_for(stop.requested.wait(), timeout=delay)
            except TimeoutError:
                pass
        return stop.requested.is_set()


@dataclass
class Sender:
    """Sends rows to the gateway's simplified route, retrying 429/503 after their Retry-After."""

    session: aiohttp.ClientSession
    options: Options
    stop: Stop
    pacer: Pacer = field(default_factory=Pacer)
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    sending: dict[Row, str] = field(default_factory=dict)  # row → request ID of its attempt

    async def deliver(self, row: Row) -> Result:
        request_id = ""
        for attempt in range(1, self.options.max_attempts + 1):
            if await self.pacer.wait(self.stop):
                return Result(row, NOT_DONE, "interrupted", request_id)
            self.sending[row] = f"bulk-{self.run_id}-{row.line}-{attempt}"
            answer = await self.post(row, self.sending[row])
            del self.sending[row]
            request_id = answer.request_id
            if answer.status == 401:
                self.stop.stop("the gateway refused the key (401 unauthenticated)")
            if answer.wait_s is None or attempt == self.options.max_attempts:
                break
            self.pacer.hold(min(answer.wait_s * (1 if answer.status else 2 ** (attempt - 1)),
                                self.options.max_wait_s))
        if answer.status == 0:  # the gateway is gone: every other row would wait in vain
            self.stop.stop(f"no answer from {self.options.url} after {attempt} attempt(s)")
        return Result(row, judge(answer), answer.code, request_id)

    async def post(self, row: Row, request_id: str) -> Answer:
        body: dict[str, Any] = {"userId": row.user_id}
        if row.channel is not None:
            body["channel"] = row.channel
        try:
            async with self.session.post(route_url(self.options.url, row.bot_id), json=body,
                                         headers={"X-Request-ID": request_id},
                                         allow_redirects=False) as resp:
                raw = await resp.content.read(MAX_ANSWER_BYTES)
                return answer_of(resp.status, raw, resp.headers, request_id)
        except (aiohttp.ClientError, TimeoutError):
            return Answer(0, "connection_error", request_id, CONNECT_BACKOFF_S)


def route_url(base: str, bot_id: str) -> URL:
    """The simplified route with the botId percent-encoded: it can never add a segment."""
    path = f"/v1/bots/{quote(bot_id, safe='')}/sessions/deactivate"
    return URL(base.rstrip("/") + path, encoded=True)


def answer_of(status: int, raw: bytes, headers: Mapping[str, str], request_id: str) -> Answer:
    code = "ok" if status == 200 else error_code(status, raw)
    wait = None
    if status in WAIT_STATUSES:
        wait = retry_after_s(headers.get("Retry-After"))
    return Answer(status, code, headers.get("X-Request-ID", request_id), wait)


def error_code(status: int, raw: bytes) -> str:
    """The envelope's `error.code`, or `http_<status>` for an answer without one."""
    try:
        code = json.loads(raw)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"http_{status}"
    return code if isinstance(code, str) and code.isidentifier() else f"http_{status}"


def retry_after_s(value: str | None) -> float:
    try:
        seconds = float(value or "")
    except ValueError:
        return DEFAULT_RETRY_AFTER_S
    return seconds if 0 <= seconds < float("inf") else DEFAULT_RETRY_AFTER_S


def judge(answer: Answer) -> str:
    if answer.status == 200:
        return SUCCEEDED
    return FAILED if answer.code in FINAL_CODES else NOT_DONE


# --- the run --------------------------------------------------------------------------------

async def run_bulk(rows: Sequence[Row], options: Options, results: ResultsFile | None,
                   stop: Stop, progress: Progress | None = None) -> Summary:
    """Sends every row not already done in `results`; returns what happened."""
    summary = Summary()
    todo = []
    for row in rows:
        outcome = results.done(row) if results is not None else None
        if outcome == SUCCEEDED:
            summary.skipped_succeeded += 1
        elif outcome == FAILED:
            summary.skipped_failed += 1
        else:
            todo.append(row)
    if progress is not None:
        progress.start(len(todo))

    def record(result: Result) -> None:
        if results is not None:
            results.write(result)
        summary.count(result)
        summary.last = result
        if progress is not None:
            progress.advance(result.status == SUCCEEDED)

    try:
        async with _session(options) as session:
            await _send_all(Sender(session, options, stop), iter(todo), record, options)
    finally:
        if progress is not None:
            progress.stop()
    summary.stopped_by = stop.reason
    summary.unsent = len(todo) - summary.succeeded - summary.failed - summary.not_done
    return summary


async def _send_all(sender: Sender, rows: Iterator[Row], record: Callable[[Result], None],
                    options: Options) -> None:
    async def worker() -> None:
        for row in rows:  # one iterator shared by every worker
            if sender.stop.requested.is_set():
                return
            try:
                result = await sender.deliver(row)
            except asyncio.CancelledError:
                record(Result(row, NOT_DONE, "interrupted", sender.sending.get(row, "")))
                raise
            record(result)

    tasks = {asyncio.create_task(worker()) for _ in range(options.concurrency)}
    try:
        pending = await _until(tasks, sender.stop.requested, None)
        if pending:  # stopped: rows in flight get a short grace, then are cancelled
            await _until(pending, sender.stop.now, options.grace_s)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _until(tasks: set[asyncio.Task[None]], event: asyncio.Event, timeout_s: float | None
                 ) -> set[asyncio.Task[Any]]:
    """Waits for `tasks` until `event` is set or `timeout_s` passes; returns those not done.

    A task that failed re-raises its error here.
    """
    waiter: asyncio.Task[Any] = asyncio.create_task(event.wait())
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending: set[asyncio.Task[Any]] = set(tasks)
    try:
        while pending and not waiter.done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            done, pending = await asyncio.wait(pending | {waiter}, timeout=left,
                                               return_when=asyncio.FIRST_COMPLETED)
            pending.discard(waiter)
            for task in done - {waiter}:
                if (error := task.exception()) is not None:
                    raise error
    finally:
        waiter.cancel()
    return pending


def _session(options: Options) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {options.key.reveal()}"} if options.key else {}
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=options.concurrency),
        timeout=aiohttp.ClientTimeout(total=options.timeout_s),
        headers=headers, cookie_jar=aiohttp.DummyCookieJar())
