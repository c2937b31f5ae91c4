"""Prometheus metrics: the registry, every metric, and the text `GET /metrics` serves.

The only module that imports `prometheus_client`. Other modules call the small methods of
`Metrics` where a thing happens (a request answered, an upstream attempt, a token minted, an
audit batch committed …) and never see a metric object. Each `Metrics` has its own registry
unless one is given, so tests and several apps in one process never share counts.

Every value lives in the process that moves it (prometheus-client's in-process values, never
its multiprocess memory-mapped files: those cost a lock and a file write per increment).
Several workers (`serve --workers N`) share a directory (`multiprocess_dir`, set up by the
supervisor before the workers start): each worker's `Metrics` publishes a snapshot of its
registry there, one small JSON file per worker, every `PUBLISH_EVERY_S` off the request path
and at shutdown, and whichever worker answers `/metrics` publishes its own fresh snapshot and
merges all of them (`render`). Counters and histograms are summed over workers (finished ones
included); gauges follow their `multiprocess_mode` (`kore_gateway_in_flight` is summed and
`kore_gateway_circuit_state` is the maximum over live workers). Another worker's counts are at
most `PUBLISH_EVERY_S` old in a scrape; a counter never goes down from one scrape to the next,
whichever worker answers, because every file only ever grows and each scrape reads each file
as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import accumulate
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# In-process values always, even when the environment names a multiprocess directory.
values.ValueClass = values.MutexValue

MULTIPROC_ENV = "KORE_GATEWAY_METRICS_DIR"  # set by the supervisor for its workers
LEGACY_ENV = "PROMETHEUS_MULTIPROC_DIR"  # an operator's choice of directory, still honoured
PUBLISH_EVERY_S = 1.0
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
    truth (one worker answers the scrape), not a value each worker last wrote (so they are
    left out of the workers' snapshots)."""

    NAMES = frozenset({"kore_gateway_ratelimit_learned_budget",
                       "kore_gateway_ratelimit_pause_seconds",
                       "kore_gateway_ratelimit_paused_bots"})

    def __init__(self) -> None:
        self.view: LearnedView = lambda: ()

    def collect(self) -> Iterable[Metric]:
        budgets = GaugeMetricFamily(
            "kore_gateway_ratelimit_learned_budget", "A bot's budget in the shortest window, "
            "learned from Kore.ai's rate-limit answers (only while below the configured one).",
            labels=["bot"])
        pauses = GaugeMetricFamily(
            "kore_gateway_ratelimit_pause_seconds", "Seconds left of a bot's pause after "
            "Kore.ai's rate-limit answer: no call for it goes to Kore.ai until then (only while "
            "paused).", labels=["bot"])
        paused = 0
        for bot, budget, pause_s in self.view():
            if budget is not None:
                budgets.add_metric([bot], budget)
            if pause_s > 0:
                pauses.add_metric([bot], round(pause_s, 3))
                paused += 1
        yield budgets
        yield pauses
        yield GaugeMetricFamily("kore_gateway_ratelimit_paused_bots", "Bots for which no call "
                                "goes to Kore.ai until its rate-limit pause ends.", value=paused)


class Metrics:
    """Every metric of one process, registered in `registry` (a private one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 shared_dir: Path | None = None) -> None:
        """`shared_dir`: publish to and merge from the workers' directory (one `Metrics` per
        worker process may do so: the runtime's)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self._shared = _Shared(shared_dir, self) if shared_dir is not None else None
        r = self.registry
        # Moved by every request: plain counts (`FastCounter`, `FastHistogram`).
        self._requests = FastCounter(
            "kore_gateway_requests_total", "HTTP requests answered, by route template, "
            "status and caller (anonymous when not authenticated).",
            ("route", "status", "caller"), registry=r)
        self._request_seconds = FastHistogram(
            "kore_gateway_request_duration_seconds", "Time from request to response in the "
            "gateway, by route template.", ("route",), LATENCY_BUCKETS_S, registry=r)
        self._upstream = FastCounter(
            "kore_gateway_upstream_requests_total", "Attempts sent to Kore.ai, by its HTTP "
            "status (timeout or error when there was none).", ("status",), registry=r)
        self._upstream_seconds = FastHistogram(
            "kore_gateway_upstream_latency_seconds", "Duration of one attempt sent to Kore.ai.",
            (), LATENCY_BUCKETS_S, registry=r)
        self._mints = Counter("kore_gateway_token_mints_total",
                              "JWTs signed, by Kore.ai app.", ("app",), registry=r)
        self._hits = FastCounter("kore_gateway_token_cache_hits_total",
                                 "Upstream attempts served by a cached JWT, by Kore.ai app.",
                                 ("app",), registry=r)
        self._audit_seconds = FastHistogram(
            "kore_gateway_audit_write_seconds", "Duration of one audit group commit "
            "(write and fsync).", (), AUDIT_BUCKETS_S, registry=r)
        self._audit_batch = FastHistogram(
            "kore_gateway_audit_batch_records", "Records made durable by one audit group "
            "commit.", (), BATCH_BUCKETS, registry=r)
        self._audit_errors = Counter("kore_gateway_audit_write_errors_total",
                                     "Audit group commits that failed.", registry=r)
        self._waits = Counter("kore_gateway_ratelimit_waits_total", "Upstream calls that "
                              "waited for the per-bot rate limit.", registry=r)
        self._rejections = Counter("kore_gateway_ratelimit_rejections_total", "Calls refused "
                                   "because the per-bot rate limit was spent.", registry=r)
        self._in_flight = Gauge("kore_gateway_in_flight", "Deactivation requests being "
                                "handled (compare with server.max_in_flight).",
                                multiprocess_mode="livesum", registry=r)
        self.in_flight = 0  # read by the gauge when collected: no gauge write per request
        self._in_flight.set_function(lambda: self.in_flight)
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
        self._requests.inc((route, str(status), caller or ANONYMOUS))
        self._request_seconds.observe(seconds, (route,))

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self) -> None:
        self.in_flight -= 1

    def upstream_attempt(self, status: int | str, seconds: float) -> None:
        self._upstream.inc((str(status),))
        self._upstream_seconds.observe(seconds)

    def token_minted(self, app: str) -> None:
        self._child(self._mints, app).inc()

    def token_cache_hit(self, app: str) -> None:
        self._hits.inc((app,))

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
        """A bot's circuit (bot "*": the host's). A bot's closed circuit drops its series."""
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
        """The Prometheus text format: this registry, or every worker's snapshot merged."""
        if self._shared is None:
            return generate_latest(self.registry)
        self._shared.publish()
        merged = CollectorRegistry()
        merged.register(_Families(self._shared.merged()))
        merged.register(self._learned)  # read live here: the shared state is the truth
        return generate_latest(merged)

    def publish(self) -> None:
        """Writes this worker's snapshot to the shared directory (nothing for one worker)."""
        if self._shared is not None:
            self._shared.publish()

    async def publish_every(self, seconds: float = PUBLISH_EVERY_S) -> None:
        """Publishes until cancelled (a task of the runtime's); nothing for one worker."""
        if self._shared is None:
            return
        while True:
            await asyncio.sleep(seconds)
            self._shared.publish()

    def gauge_modes(self) -> dict[str, str]:
        """How each gauge of this `Metrics` merges over workers (its `multiprocess_mode`)."""
        return {g._name: g._multiprocess_mode for g in vars(self).values()
                if isinstance(g, Gauge)}


class FastCounter(Collector):
    """A labelled counter for the request path: a dict of counts, no lock and no exemplar.

    Moved from the event loop's thread only (the audit writer thread never counts), so a
    plain `+=` cannot race. Collected like any prometheus-client counter (no `_created`).
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], *,
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.counts: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...] = ()) -> None:
        counts = self.counts
        counts[labels] = counts.get(labels, 0.0) + 1.0

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in list(self.counts.items()):
            family.add_metric(labels, value)
        return [family]


class FastHistogram(Collector):
    """A labelled histogram for the request path: per series, one count per bucket and the
    sum, found with one `bisect`; event-loop thread only, like `FastCounter`."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...],
                 buckets: Sequence[float], *, registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.bounds = tuple(float(b) for b in buckets)
        les = [floatToGoString(b) for b in self.bounds]  # type: ignore[no-untyped-call]
        self._les = [*les, "+Inf"]
        self.series: dict[tuple[str, ...], list[float]] = {}  # buckets …, +Inf, sum
        registry.register(self)

    def observe(self, value: float, labels: tuple[str, ...] = ()) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        series[bisect_left(self.bounds, value)] += 1.0  # the first bound ≥ value: "le"
        series[-1] += value

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, series in list(self.series.items()):
            cumulative = list(accumulate(series[:-1]))
            family.add_metric(list(labels), list(zip(self._les, cumulative, strict=True)),
                              sum_value=series[-1])
        return [family]


# --- several workers -------------------------------------------------------------------------

_LIVE = "worker-"  # worker-<pid>.json: a live worker's snapshot
_EXITED = "exited-"  # renamed by the supervisor once the worker is gone (`worker_exited`)


class _Shared:
    """One worker's side of the shared directory: its snapshot file, and the merge."""

    def __init__(self, directory: Path, metrics: Metrics) -> None:
        self.directory = directory
        self.metrics = metrics
        self.path = directory / f"{_LIVE}{os.getpid()}.json"
        self._modes: dict[str, str] | None = None

    def publish(self) -> None:
        if self._modes is None:
            self._modes = self.metrics.gauge_modes()
        families = [_family_dict(family, self._modes) for family in self.metrics.registry.collect()
                    if family.name not in _LearnedCollector.NAMES]
        text = json.dumps({"pid": os.getpid(), "time": time.time(), "families": families})
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.path)  # a reader sees the old snapshot or the new one

    def merged(self) -> list[Metric]:
        snapshots = sorted(_read_snapshots(self.directory),
                           key=lambda snap: snap["pid"] != os.getpid())  # ours first: its order
        return merge(snapshots)


def _family_dict(family: Metric, modes: dict[str, str]) -> dict[str, Any]:
    return {"name": family.name, "type": family.type, "help": family.documentation,
            "mode": modes.get(family.name) if family.type == "gauge" else None,
            "samples": [[s.name, s.labels, s.value] for s in family.samples
                        if not s.name.endswith("_created")]}


def _read_snapshots(directory: Path) -> Iterator[dict[str, Any]]:
    for path in directory.glob("*.json"):
        if not path.name.startswith((_LIVE, _EXITED)):
            continue
        try:
            snapshot = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # renamed away between listing and reading, or not ours
        if isinstance(snapshot, dict) and isinstance(snapshot.get("families"), list):
            snapshot["exited"] = path.name.startswith(_EXITED)
            yield snapshot


def merge(snapshots: Iterable[dict[str, Any]]) -> list[Metric]:
    """Worker snapshots → one family each: counters and histograms summed, gauges by mode."""
    families: dict[str, Metric] = {}
    merged: dict[str, dict[tuple[Any, ...], tuple[float, float]]] = {}
    for snap in snapshots:
        for fam in snap["families"]:
            mode = fam.get("mode") or "sum"
            if snap["exited"] and mode.startswith("live"):
                continue  # a gone worker's gauges no longer describe anything
            if fam["name"] not in families:
                families[fam["name"]] = Metric(fam["name"], fam["help"], fam["type"])
                merged[fam["name"]] = {}
            samples = merged[fam["name"]]
            for name, labels, value in fam["samples"]:
                if mode in ("all", "liveall"):
                    labels = {**labels, "pid": str(snap["pid"])}
                key = (name, *sorted(labels.items()))
                samples[key] = _combine(mode, samples.get(key), (float(value), snap["time"]))
    for name, family in families.items():
        for (sample, *labels), (value, _) in merged[name].items():
            family.add_sample(sample, dict(labels), value)
    return list(families.values())


def _combine(mode: str, old: tuple[float, float] | None, new: tuple[float, float]
             ) -> tuple[float, float]:
    """(value, snapshot time) of one sample over two workers."""
    if old is None:
        return new
    kind = mode.removeprefix("live")
    if kind == "max":
        return max(old, new)
    if kind == "min":
        return min(old, new)
    if kind == "mostrecent":
        return old if old[1] >= new[1] else new
    return old[0] + new[0], max(old[1], new[1])  # sum, and counters and histograms


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def shared_dir() -> Path | None:
    """The workers' directory set up by `multiprocess_dir`, or None (a single process)."""
    given = os.environ.get(MULTIPROC_ENV)
    return Path(given) if given else None


@contextmanager
def multiprocess_dir(workers: int) -> Iterator[Path | None]:
    """The directory the workers about to be started share; enter it before starting them.

    With several workers: the operator's `PROMETHEUS_MULTIPROC_DIR` when set, emptied of old
    snapshots first, otherwise a fresh temporary directory, removed at exit. Its path is
    handed to the workers in `KORE_GATEWAY_METRICS_DIR`.
    """
    if workers <= 1:
        yield None
        return
    given = os.environ.get(LEGACY_ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in [*path.glob("*.db"), *path.glob(f"{_LIVE}*.json"),
                      *path.glob(f"{_EXITED}*.json")]:
            stale.unlink()
    else:
        path = Path(tempfile.mkdtemp(prefix="kore-gateway-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        if not given:
            shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int) -> None:
    """Drops a finished worker's live gauges; its counters still count in the sums."""
    directory = shared_dir()
    if directory is not None:
        with contextlib.suppress(OSError):
            os.replace(directory / f"{_LIVE}{pid}.json", directory / f"{_EXITED}{pid}.json")


def in_worker() -> None:
    """First thing in a worker process: in-process metric values (a spawned worker imports
    prometheus-client afresh, and it picks memory-mapped values when the environment names a
    multiprocess directory)."""
    values.ValueClass = values.MutexValue
