"""The HTTP-free core of one deactivation: authorize → app → rate limit → audit(requested)
→ upstream → audit(completed). Every ask ends with exactly one terminal audit record.

The `requested` record is durable before the call goes upstream. The `completed` record of a
call that went upstream is written before the answer when the audit log is idle, or queued
for the commit under way, and made durable by its group commit's fsync after the answer
(contract §3: the answer need not wait for it; `AuditLog.append(durable=False)`); a restart closes
every `requested` record a crash left without its terminal one with `"outcome": "unknown"`
(`close_left_open`). Refusals (`deactivate.denied`) are durable before the answer. Knows nothing of aiohttp: `app.py` parses the request into an `Ask` and
renders the result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from gateway.audit.keyless import UnauthenticatedAudit
from gateway.audit.log import AuditLog
from gateway.auth import Caller
from gateway.breaker import CircuitBreaker
from gateway.errors import AuditUnavailable, GatewayError, Unauthenticated, UpstreamError
from gateway.kore.client import CallTrace, KoreClient
from gateway.kore.tokens import TokenCache
from gateway.ratelimit.memory import RateLimiter
from gateway.validation import Deactivation

log = structlog.get_logger(__name__)

ROUTE_SIMPLE = "POST /v1/bots/{botId}/sessions/deactivate"
ROUTE_BATCH = "POST /v1/sessions/deactivate"
ROUTE_KORE = "PUT /api/public/bot/{botId}/session"
MAX_RAW_CHARS = 256  # what a denied record keeps of an invalid value
RESTARTED = "gateway_restarted"  # the error of a record closed at restart
# Not carried from a `requested` record into the record that closes it at restart.
_NOT_CARRIED = frozenset({"ts", "seq", "event", "prev", "hash", "chain"})


@dataclass(slots=True)
class Ask:
    """One deactivation as far as it is known; filled in as the request is parsed."""

    request_id: str
    route: str
    started: float = field(default_factory=time.monotonic)
    caller: str | None = None
    client: str | None = None  # who knocked: the peer, or X-Forwarded-For behind a trusted proxy
    bot_id: Any = None
    user_id: Any = None
    channel: Any = None
    app: str | None = None  # set once the requested record is durable: the ask went upstream
    trace: CallTrace = field(default_factory=CallTrace)
    settled: bool = False  # its terminal record was written (or attempted); never a second
    # botId, userId and channel, then each as a record keeps it (`_raw`): made for the first
    # record, reused by the second while the three are the same objects
    _raws: tuple[Any, Any, Any, Any, Any, Any] | None = None

    def learn(self, d: Deactivation) -> None:
        self.bot_id, self.user_id, self.channel = d.bot_id, d.user_id, d.channel

    def record(self, event: str, app: str | None) -> dict[str, Any]:
        """The start of its audit record: the event, who asked what, and through which app."""
        raws = self._raws
        if (raws is None or raws[0] is not self.bot_id or raws[1] is not self.user_id
                or raws[2] is not self.channel):
            raws = self._raws = (self.bot_id, self.user_id, self.channel, _raw(self.bot_id),
                                 _raw(self.user_id), _raw(self.channel))
        return {"event": event, "requestId": self.request_id, "caller": self.caller,
                "client": self.client, "route": self.route, "botId": raws[3],
                "userId": raws[4], "channel": raws[5], "app": app}

    def duration_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 3)


def _raw(value: Any) -> Any:
    if type(value) is str and len(value) <= MAX_RAW_CHARS and value.isascii():
        return value  # the common case, without `_encodable`'s call
    if value is None or isinstance(value, str) and len(value) <= MAX_RAW_CHARS:
        return _encodable(value)
    return _encodable((value if isinstance(value, str) else repr(value))[:MAX_RAW_CHARS] + "…")


def _encodable(value: str | None) -> str | None:
    """A refused value as UTF-8 can carry it: a lone surrogate is kept as its `\\udXXX` escape."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class Deactivator:
    """Carries one deactivation through the gateway; one instance per process."""

    def __init__(self, *, audit: AuditLog, tokens: TokenCache, limiter: RateLimiter,
                 client: KoreClient, breaker: CircuitBreaker, timeout_s: float,
                 unauthenticated: UnauthenticatedAudit | None = None) -> None:
        self.audit = audit
        self.unauthenticated = unauthenticated  # keyless denials: one by one, then counted
        self.tokens = tokens
        self.limiter = limiter
        self.client = client
        self.breaker = breaker
        self.timeout_s = timeout_s

    async def deactivate(self, ask: Ask, caller: Caller, d: Deactivation) -> Any:
        """Returns Kore.ai's answer body; raises GatewayError. Audits either way."""
        deadline = ask.started + self.timeout_s
        try:
            caller.authorize(d.bot_id)
            app = self.tokens.app_for(d.bot_id)
            ask.trace.grant = await self.limiter.acquire(d.bot_id, deadline)
            ticket = self.breaker.before_call(d.bot_id)
        except GatewayError as exc:
            await self.deny(ask, exc)
            raise
        try:
            await self.audit.durable(ask.record("deactivate.requested", app.name))
        except AuditUnavailable:
            self.breaker.release(ticket)
            await self.deny(ask, AuditUnavailable("the audit log cannot be written; "
                                                  "nothing was sent to Kore.ai"))
            raise
        except BaseException:
            self.breaker.release(ticket)  # a half-open probe slot must never be lost
            raise
        ask.app = app.name
        try:
            body = await self.client.deactivate(app, d, ask.request_id, deadline, ask.trace)
        except GatewayError as exc:  # upstream errors, and a retry refused by the rate limit
            if ask.trace.attempts:
                self.breaker.record(ticket, ok=not is_outage(exc))
            else:  # the deadline was spent before the PUT (a slow disk is not Kore.ai failing)
                self.breaker.release(ticket)
            await self._complete(ask, exc.status, exc)
            raise
        except BaseException:
            self.breaker.release(ticket)  # cut short (shutdown): `abandon` writes the record
            raise
        self.breaker.record(ticket, ok=True)
        # `_complete(ask, 200, None)` inline: one coroutine fewer a success.
        ask.settled = True
        record = ask.record("deactivate.completed", ask.app)
        _add_result(record, ask, 200, None, ask.trace)
        try:
            await self.audit.append(record, durable=False)
        except AuditUnavailable:
            raise self._completion_lost(ask, record, 200) from None
        return body

    async def _complete(self, ask: Ask, status: int, error: GatewayError | None, *,
                        durable: bool = False) -> None:
        """The terminal record: the answer does not wait for its fsync (`durable=False`)."""
        ask.settled = True
        record = ask.record("deactivate.completed", ask.app)
        _add_result(record, ask, status, error, ask.trace)
        try:
            await self.audit.append(record, durable=durable)
        except AuditUnavailable:
            raise self._completion_lost(ask, record, status) from None

    def _completion_lost(self, ask: Ask, record: dict[str, Any], status: int
                         ) -> AuditUnavailable:
        """The terminal record could not be written: the error the caller gets instead.

        The PUT went out and its requested record is durable; the caller must not believe a
        result we could not record, so it sees audit_unavailable and retries. What it saw is
        kept for the log's next commit (with Kore.ai's status). (`append` wrote a copy:
        `record` itself is still as built by the caller.)"""
        refused = AuditUnavailable("the call reached Kore.ai but its result could not be "
                                   "audited; retry when the gateway is ready")
        _add_result(record, ask, refused.status, refused, ask.trace)
        log.error("audit.completion_lost", request_id=ask.request_id, status=status,
                  kept=self.audit.retain(record))
        return refused

    async def deny(self, ask: Ask, error: GatewayError) -> None:
        """The terminal record of an ask stopped before going upstream (best effort)."""
        ask.settled = True
        record = ask.record("deactivate.denied", None)
        _add_result(record, ask, error.status, error, CallTrace())
        try:
            if isinstance(error, Unauthenticated) and self.unauthenticated is not None:
                await self.unauthenticated.deny(record)
            else:
                await self.audit.append(record)
        except AuditUnavailable:  # kept for the log's next commit (a keyless one: counted)
            kept = not isinstance(error, Unauthenticated) and self.audit.retain(record)
            log.error("audit.denial_lost", request_id=ask.request_id, error=error.code,
                      kept=kept)

    async def abandon(self, ask: Ask, error: GatewayError) -> None:
        """The terminal record of an ask cut short (shutdown past drain_s, a bug), if none yet."""
        if ask.settled:
            return
        if ask.app is None:
            await self.deny(ask, error)
            return
        try:  # durable: a shutdown waits for the requests it cut short to be recorded
            await self._complete(ask, error.status, error, durable=True)
        except AuditUnavailable:
            pass  # logged by _complete

    async def close_left_open(self, requested: Sequence[dict[str, Any]]) -> None:
        await close_left_open(self.audit, requested)


async def close_left_open(audit: AuditLog, requested: Sequence[dict[str, Any]]) -> None:
    """At start-up, before serving: closes each `requested` record a crash left without its
    terminal one (`audit.recovery.unclosed`) with a durable `deactivate.completed` record,
    `"outcome": "unknown"`: whether Kore.ai closed the session cannot be known."""
    if not requested:
        return
    await audit.append_together(closing_record(r) for r in requested)  # one commit
    log.warning("audit.closed_at_restart", path=str(audit.path), records=len(requested),
                request_ids=[r.get("requestId") for r in requested[:20]])


def closing_record(requested: dict[str, Any]) -> dict[str, Any]:
    """What asked (carried from the requested record as written) and an unknown result."""
    carried = {k: v for k, v in requested.items() if k not in _NOT_CARRIED}
    return {"event": "deactivate.completed", **carried, "outcome": "unknown", "status": None,
            "upstreamStatus": None, "attempts": None, "durationMs": None, "error": RESTARTED}


def is_outage(error: GatewayError) -> bool:
    """Counts against the circuit breaker: Kore.ai failed or did not answer."""
    return isinstance(error, UpstreamError) and error.code in ("upstream_unavailable",
                                                               "upstream_timeout")


def _add_result(record: dict[str, Any], ask: Ask, status: int, error: GatewayError | None,
                trace: CallTrace) -> None:
    record["outcome"] = "success" if error is None else error.outcome
    record["status"] = status
    record["upstreamStatus"] = trace.upstream_status
    record["attempts"] = trace.attempts
    record["durationMs"] = ask.duration_ms()
    record["error"] = None if error is None else error.code
