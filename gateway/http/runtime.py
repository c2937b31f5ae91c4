"""The serving state of one process: `Runtime` builds and owns every part a request uses.

Auth, validation, audit log, token cache, rate limiter, upstream client and circuit breaker,
started and closed together, reloaded in one step, with the in-flight count, drain flag and
readiness verdict. Turning HTTP into calls on it is `app.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from pathlib import Path
from typing import Any

import structlog

from gateway.audit.anchors import Anchors
from gateway.audit.keyless import UnauthenticatedAudit
from gateway.audit.log import AuditLog, AuditOpenError, ChainKey, rotated_files
from gateway.audit.recovery import unclosed
from gateway.auth import Authenticator
from gateway.breaker import CircuitBreaker
from gateway.config.model import Config
from gateway.deactivation import Deactivator, close_left_open
from gateway.errors import Overloaded
from gateway.http.forwarded import TrustedProxies
from gateway.http.keyless import KeylessBudget
from gateway.http.reload import ConfigChange, ReloadStatus, diff, live_config
from gateway.kore.client import KoreClient
from gateway.kore.tokens import TokenCache
from gateway.metrics import Metrics, shared_dir
from gateway.ratelimit.learning import Policy
from gateway.ratelimit.memory import (
    SPACING_MARGIN_S,
    MemoryRateLimiter,
    RateLimiter,
    Unlimited,
    spaced,
)
from gateway.ratelimit.redis import RedisRateLimiter
from gateway.ratelimit.shared import attach
from gateway.validation import Validator

log = structlog.get_logger(__name__)

READY_CACHE_S = 1.0  # readiness probes are cheap but not free: reuse a verdict this long
# Beyond a request's own deadline (upstream.timeout_s, or server.drain_s at shutdown): how
# much older than a log's last record an open `requested` record may be (`audit.recovery`).
RECOVERY_MARGIN_S = 60.0
MIN_KEYLESS_SHARE = 16  # keyless answers held back at once: at least this, or max_in_flight/10


class Runtime:
    """Everything one process serves with; built at start-up, closed at shutdown."""

    def __init__(self, config: Config, *, worker: int = 0, workers: int = 1,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.worker, self.workers = worker, workers
        self.metrics = metrics if metrics is not None else Metrics(shared_dir=shared_dir())
        self.auth = Authenticator(config.callers, config.server.auth)
        self.validator = Validator(config.upstream.bot_id_pattern)
        self.audit = AuditLog(audit_path(config, worker, workers),
                              hash_user_ids=config.audit.hash_user_ids,
                              max_bytes=config.audit.max_bytes, fsync=config.audit.fsync,
                              metrics=self.metrics, chain_key=chain_key(config))
        self.anchors = Anchors(self.audit, config.audit.anchor_every_s,
                               logging.getLevelNamesMapping()[config.logging.level.upper()])
        self.unauthenticated = UnauthenticatedAudit(
            self.audit, config.audit.max_unauthenticated_per_s, metrics=self.metrics)
        self.proxies = TrustedProxies(config.server.trusted_proxies)
        self.keyless = KeylessBudget(max(MIN_KEYLESS_SHARE, config.server.max_in_flight // 10))
        self.tokens = TokenCache(config.apps, metrics=self.metrics)
        self.limiter = make_limiter(config, workers, self.metrics)
        self.metrics.ratelimit_learned(
            lambda: ((v.bot_id, v.budget, v.paused_s) for v in self.limiter.learned()))
        self.client = KoreClient(config.upstream, self.tokens, self.limiter,
                                 metrics=self.metrics, max_pause_s=config.rate_limit.max_pause_s)
        self.breaker = CircuitBreaker(self.client.host,
                                      failures=config.upstream.breaker_failures,
                                      cooldown_s=config.upstream.breaker_cooldown_s,
                                      host_bots=config.upstream.breaker_host_bots,
                                      window_s=config.upstream.breaker_window_s,
                                      metrics=self.metrics)
        self.deactivator = Deactivator(audit=self.audit, tokens=self.tokens,
                                       limiter=self.limiter, client=self.client,
                                       breaker=self.breaker, timeout_s=config.upstream.timeout_s,
                                       unauthenticated=self.unauthenticated)
        self.reload_status = ReloadStatus(self.metrics)
        self.in_flight = 0
        self.tasks: set[asyncio.Task[Any] | None] = set()  # handlers of in-flight requests
        self.draining = False
        self._ready: tuple[float, dict[str, Any]] | None = None  # (when, checks)
        self._publisher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.audit.open()
        await self.deactivator.close_left_open(
            unclosed(self.audit.path, window_s=recovery_window_s(self.config)))
        if self.worker == 0:
            await close_orphans(self.config, self.workers)
        await self.client.start()
        await self.limiter.start()
        self.anchors.start()
        self._publisher = asyncio.create_task(self.metrics.publish_every())

    async def close(self) -> None:
        await self.client.close()
        await self.tokens.aclose()
        await self.limiter.aclose()
        await self.unauthenticated.aclose()
        await self.anchors.stop()
        await self.audit.close()
        await self.anchors.emit()  # the last anchor covers every record written
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        self.metrics.publish()  # the final counts of this worker, for the others' scrapes

    def reload(self, new: Config) -> ConfigChange:
        """Takes new callers and apps (secrets included) in one step; other settings stay.

        Synchronous, so no request sees half of it; a request already past authentication and
        app selection finishes with the caller and app it started with.
        """
        change = diff(self.config, new)
        self.auth = Authenticator(new.callers, self.config.server.auth)
        self.tokens.reload(new.apps)
        self.config = live_config(self.config, new)
        self._ready = None
        return change

    async def cancel_in_flight(self, wait_s: float) -> None:
        """Past `drain_s`: cancels the requests still running, each of which writes its
        terminal record on the way out (`InFlight`), and waits for them up to `wait_s`."""
        tasks = [task for task in self.tasks if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)

    def admit(self, task: asyncio.Task[Any] | None) -> None:
        """Counts a deactivation request (handled by `task`) in, or sheds it (draining / over
        max_in_flight). An admitted request ends with `leave`."""
        if self.draining:
            raise Overloaded("the gateway is shutting down; retry on another instance",
                             retry_after_s=1)
        if self.in_flight >= self.config.server.max_in_flight:
            raise Overloaded("the gateway is at its in-flight limit; retry shortly",
                             retry_after_s=1)
        self.in_flight += 1
        self.metrics.request_started()
        self.tasks.add(task)

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        """The end of a request `admit` counted in."""
        self.in_flight -= 1
        self.metrics.request_finished()
        self.tasks.discard(task)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        # The checks are reused for a moment; draining and a failed audit write show at once,
        # and the circuit and rate-limit detail is always live.
        cached = self._ready is not None and now - self._ready[0] < READY_CACHE_S
        if not cached or self.draining or not self.audit.healthy:
            checks = {"config": True, "audit": await self.audit.probe(),
                      "token": self.tokens.check(), "draining": self.draining}
            self._ready = (now, checks)
        assert self._ready is not None
        checks = self._ready[1]
        ok = bool(checks["audit"] and checks["token"] and not self.draining)
        detail = {"status": "ready" if ok else "not_ready", "checks": checks,
                  "circuit": self.breaker.detail(), "rateLimit": self.limiter.detail(),
                  "configReload": self.reload_status.detail(),
                  "auditDiskFreeBytes": self.audit_disk_free(),
                  "pausedBots": sum(v.paused_s > 0 for v in self.limiter.learned())}
        return ok, detail

    def audit_disk_free(self) -> int | None:
        """Bytes free for us on the audit volume (also the metric); None when unknown."""
        free = self.audit.disk_free()
        if free is not None:
            self.metrics.audit_disk_free(free)
        return free


def chain_key(config: Config) -> ChainKey | None:
    key = config.audit.chain_key
    return None if key is None else ChainKey(key.reveal().encode("utf-8"))


def audit_path(config: Config, worker: int, workers: int) -> str:
    """With several workers each writes its own chain: `name-w{n}.jsonl`."""
    if workers <= 1:
        return config.audit.path
    path = Path(config.audit.path)
    return str(path.with_name(f"{path.stem}-w{worker}{path.suffix}"))


def recovery_window_s(config: Config) -> float:
    return config.upstream.timeout_s + config.server.drain_s + RECOVERY_MARGIN_S


def orphan_paths(config: Config, workers: int) -> list[Path]:
    """Audit files of this config that no worker of this run writes: another worker count
    ran before (`name.jsonl` with one worker, `name-w{n}.jsonl` with several)."""
    base = Path(config.audit.path)
    ours = {Path(audit_path(config, n, workers)) for n in range(workers)}
    per_worker = re.compile(re.escape(base.stem) + r"-w\d+" + re.escape(base.suffix))
    try:
        siblings = [p for p in base.parent.iterdir() if per_worker.fullmatch(p.name)]
    except OSError:
        siblings = []
    candidates = {base, *siblings} - ours
    return sorted(p for p in candidates if rotated_files(p))


async def close_orphans(config: Config, workers: int) -> None:
    """Closes what a crash left open in the audit files no worker of this run writes."""
    for path in orphan_paths(config, workers):
        requested = unclosed(path, window_s=recovery_window_s(config))
        if not requested:
            continue
        orphan = AuditLog(path, hash_user_ids=config.audit.hash_user_ids,
                          max_bytes=config.audit.max_bytes, fsync=config.audit.fsync,
                          chain_key=chain_key(config))
        try:
            orphan.open()
        except AuditOpenError as exc:  # e.g. still held by a gateway that is running
            log.warning("audit.orphan_not_closed", path=str(path), error=str(exc))
            continue
        try:
            await close_left_open(orphan, requested)
        finally:
            await orphan.close()


def make_limiter(config: Config, workers: int, metrics: Metrics | None = None) -> RateLimiter:
    """Memory: each of N workers takes 1/N of the budget, and what Kore.ai's refusals teach is
    shared through the supervisor's table. Redis: the budget and the learning are global, and
    while Redis is lost each worker takes 1/N of the replica's `local_fallback_fraction`."""
    rl = config.rate_limit
    if not rl.enabled:
        return Unlimited()
    if rl.backend == "redis":
        return RedisRateLimiter(rl, fallback_share=rl.local_fallback_fraction / workers,
                                metrics=metrics)
    policy = Policy.of(rl.windows, rl.backoff_s, rl.max_pause_s)
    shared = attach(policy, SPACING_MARGIN_S) if workers > 1 else None
    return MemoryRateLimiter(spaced(rl.windows), share=1 / workers, metrics=metrics,
                             backoff_s=rl.backoff_s, max_pause_s=rl.max_pause_s,
                             margin_s=SPACING_MARGIN_S, store=shared)
