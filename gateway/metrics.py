"""Prometheus metrics: the registry, every metric, and the text `GET /metrics` serves.

The only module that imports `prometheus_client`. Other modules call the small methods of
`Metrics` where a thing happens (a request answered, an upstream attempt, a token minted, an
audit batch committed …) and never see a metric object. Each `Metrics` has its own registry
unless one is given, so tests and several apps in one process never share counts.

Several workers (`serve --workers N`) use prometheus-client's multiprocess mode: the supervisor
points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before spawning them
(`multiprocess_dir`), every worker writes its samples to memory-mapped files there, and
whichever worker answers `/metrics` merges all of them. Counters and histograms are summed
over workers (finished ones included); `in_flight` is summed and `circuit_state` is the
maximum over live workers. In that mode a worker must hold a single `Metrics` (the runtime's):
each instance keeps its own copy of a series' value and writes it whole to the shared file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
ANONYMOUS = "anonymous"  # the caller label of a request that was not authenticated
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}  # kore_gateway_circuit_state values

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
AUDIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# (bot, learned budget or None, seconds of pause left) for each bot Kore.ai refused lately
LearnedView = Callable[[], Iterable[tuple[str, int | None, float]]]


class _LearnedCollector:
    """The rate-limit learning gauges, read from the limiter whenever /metrics is scraped:
    learned budgets come and go with time, and with several workers the shared state is the
    truth (one worker answers the scrape), not a value each worker last wrote."""

    def __init__(self) -> None:
        self.view: LearnedView = lambda: ()

    def collect(self) -> Iterable[Metric]:
        budgets = GaugeMetricFamily(
            "kore_gateway_ratelimit_learned_budget", "A bot's budget in the shortest window, "
            "learned from Kore.ai's rate-limit answers (only while below the configured one).",
            labels=["bot"])
        paused = 0
        for bot, budget, pause_s in self.view():
            if budget is not None:
                budgets.add_metric([bot], budget)
            paused += pause_s > 0
        yield budgets
        yield GaugeMetricFamily("kore_gateway_ratelimit_paused_bots", "Bots for which no call "
                                "goes to Kore.ai until its rate-limit pause ends.", value=paused)


class Metrics:
    """Every metric of one process, registered in `registry` (a private one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "kore_gateway_requests_total", "HTTP requests answered, by route template, "
            "status and caller (anonymous when not authenticated).",
            ("route", "status", "caller"), registry=r)
        self._request_seconds = Histogram(
            "kore_gateway_request_duration_seconds", "Time from request to response in the "
            "gateway, by route template.", ("route",), buckets=LATENCY_BUCKETS_S, registry=r)
        self._upstream = Counter(
            "kore_gateway_upstream_requests_total", "Attempts sent to Kore.ai, by its HTTP "
            "status (timeout or error when there was none).", ("status",), registry=r)
        self._upstream_seconds = Histogram(
            "kore_gateway_upstream_latency_seconds", "Duration of one attempt sent to Kore.ai.",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self._mints = Counter("kore_gateway_token_mints_total",
                              "JWTs signed, by Kore.ai app.", ("app",), registry=r)
        self._hits = Counter("kore_gateway_token_cache_hits_total",
                             "Upstream attempts served by a cached JWT, by Kore.ai app.",
                             ("app",), registry=r)
        self._audit_seconds = Histogram(
            "kore_gateway_audit_write_seconds", "Duration of one audit group commit "
            "(write and fsync).", buckets=AUDIT_BUCKETS_S, registry=r)
        self._audit_batch = Histogram(
            "kore_gateway_audit_batch_records", "Records made durable by one audit group "
            "commit.", buckets=BATCH_BUCKETS, registry=r)
        self._audit_errors = Counter("kore_gateway_audit_write_errors_total",
                                     "Audit group commits that failed.", registry=r)
        self._waits = Counter("kore_gateway_ratelimit_waits_total", "Upstream calls that "
                              "waited for the per-bot rate limit.", registry=r)
        self._rejections = Counter("kore_gateway_ratelimit_rejections_total", "Calls refused "
                                   "because the per-bot rate limit was spent.", registry=r)
        self._in_flight = Gauge("kore_gateway_in_flight", "Deactivation requests being "
                                "handled (compare with server.max_in_flight).",
                                multiprocess_mode="livesum", registry=r)
        self._circuit = Gauge("kore_gateway_circuit_state", "Circuit breaker of the upstream: "
                              "0 closed, 1 half-open, 2 open (worst worker); bot=\"*\" is the "
                              "host as a whole, other bots have a series only while not closed.",
                              ("host", "bot"), multiprocess_mode="livemax", registry=r)
        self._open_bots = Gauge("kore_gateway_circuit_open_bots", "Bots whose own circuit is "
                                "open or half-open.", multiprocess_mode="livesum", registry=r)
        self._redis_fallback = Gauge(
            "kore_gateway_ratelimit_redis_fallback", "1 while the Redis rate-limit backend is "
            "unreachable and a local share of the budget is used, else 0 (worst worker).",
            multiprocess_mode="livemax", registry=r)
        self._pauses = Counter("kore_gateway_ratelimit_pauses_total", "Pauses started by "
                               "Kore.ai's rate-limit answers (429, or its rate-limit message).",
                               registry=r)
        self._learned = _LearnedCollector()
        r.register(self._learned)
        self._worker_restarts = Counter(
            "kgw_worker_restarts_total", "Workers of `serve --workers N` started again after "
            "one died (crash, SIGKILL, OOM kill); each restarted worker counts itself.",
            registry=r)
        self._suppressed = Counter(
            "kore_gateway_audit_unauthenticated_suppressed", "Keyless requests (no key, an "
            "unknown key) counted into an audit.unauthenticated_suppressed record instead of "
            "getting a record of their own.", registry=r)
        self._disk_free = Gauge(
            "kore_gateway_audit_disk_free_bytes", "Bytes free for the gateway on the audit "
            "log's volume (lowest worker).", multiprocess_mode="livemin", registry=r)
        self._held = Counter(
            "kore_gateway_unauthenticated_held", "Keyless answers held back because their "
            "client address was over its keyless budget.", registry=r)
        self._connections = Gauge("kore_gateway_connections", "Open client connections "
                                  "(compare with server.max_connections).",
                                  multiprocess_mode="livesum", registry=r)
        self._closed = Counter(
            "kore_gateway_connections_closed", "Client connections the gateway closed or "
            "refused on its own, by reason.", ("reason",), registry=r)
        self._reload_failed = Gauge(
            "kgw_config_reload_failed", "1 while the last config reload failed (the running "
            "config is kept, whole), 0 after a good one (worst worker).",
            multiprocess_mode="livemax", registry=r)
        # Label children are looked up once and kept: a request pays a dict lookup, no lock.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, route: str, status: int, caller: str | None, seconds: float) -> None:
        self._child(self._requests, route, str(status), caller or ANONYMOUS).inc()
        self._child(self._request_seconds, route).observe(seconds)

    def request_started(self) -> None:
        self._in_flight.inc()

    def request_finished(self) -> None:
        self._in_flight.dec()

    def upstream_attempt(self, status: int | str, seconds: float) -> None:
        self._child(self._upstream, str(status)).inc()
        self._upstream_seconds.observe(seconds)

    def token_minted(self, app: str) -> None:
        self._child(self._mints, app).inc()

    def token_cache_hit(self, app: str) -> None:
        self._child(self._hits, app).inc()

    def audit_committed(self, records: int, seconds: float) -> None:
        self._audit_batch.observe(records)
        self._audit_seconds.observe(seconds)

    def audit_failed(self) -> None:
        self._audit_errors.inc()

    def ratelimit_waited(self) -> None:
        self._waits.inc()

    def ratelimit_rejected(self) -> None:
        self._rejections.inc()

    def circuit_state(self, host: str, bot: str, state: str) -> None:
        """A bot's circuit (bot "*": the host's). A bot's closed circuit drops its series; in
        multiprocess mode the worker's file keeps it, at 0, until the worker exits."""
        child = self._child(self._circuit, host, bot)
        child.set(CIRCUIT_STATES[state])
        if state == "closed" and bot != "*":
            self._children.pop((id(self._circuit), host, bot), None)
            self._circuit.remove(host, bot)

    def circuit_open_bots(self, count: int) -> None:
        self._open_bots.set(count)

    def config_reload_failed(self, failed: bool) -> None:
        self._reload_failed.set(1 if failed else 0)

    def ratelimit_redis_fallback(self, active: bool) -> None:
        self._redis_fallback.set(1 if active else 0)

    def ratelimit_paused(self) -> None:
        self._pauses.inc()

    def ratelimit_learned(self, view: LearnedView) -> None:
        """Where the learning gauges are read from (the process's rate limiter)."""
        self._learned.view = view
    def worker_restarted(self) -> None:
        self._worker_restarts.inc()
    def audit_unauthenticated_suppressed(self) -> None:
        self._suppressed.inc()

    def audit_disk_free(self, free_bytes: int) -> None:
        self._disk_free.set(free_bytes)

    def unauthenticated_held(self) -> None:
        self._held.inc()

    def connections(self, open_now: int) -> None:
        self._connections.set(open_now)

    def connection_closed(self, reason: str) -> None:
        self._child(self._closed, reason).inc()

    def render(self) -> bytes:
        """The Prometheus text format: this registry, or every worker's samples merged."""
        if not os.environ.get(MULTIPROC_ENV):
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
        merged.register(self._learned)
        return generate_latest(merged)


@contextmanager
def multiprocess_dir(workers: int) -> Iterator[Path | None]:
    """Multiprocess mode for the workers about to be spawned; enter it before spawning.

    A `PROMETHEUS_MULTIPROC_DIR` set by the operator is used, emptied of old samples first.
    Otherwise, with several workers, a fresh temporary directory is made and removed at exit.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        yield path
        return
    if workers <= 1:
        yield None
        return
    made = Path(tempfile.mkdtemp(prefix="kore-gateway-metrics-"))
    os.environ[MULTIPROC_ENV] = str(made)
    try:
        yield made
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(made, ignore_errors=True)


def worker_exited(pid: int) -> None:
    """Drops a finished worker's live gauges; its counters still count in the sums."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def in_worker() -> None:
    """First thing in a worker process. A forked worker inherits prometheus-client as the
    supervisor imported it, before `multiprocess_dir` set the environment: pick its value
    class again so that this worker's metrics go to the shared files."""
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
