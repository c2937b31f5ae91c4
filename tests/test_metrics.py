"""Metrics: each one moves where its thing happens, in the registry it was given."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit.log import AuditLog
from gateway.breaker import MAX_BOT_SERIES, CircuitBreaker
from gateway.config.model import KoreApp, Secret
from gateway.errors import AuditUnavailable, RateLimited
from gateway.kore.tokens import TokenCache
from gateway.metrics import (
    LEGACY_ENV,
    MULTIPROC_ENV,
    Metrics,
    multiprocess_dir,
    worker_exited,
)
from gateway.ratelimit.memory import MemoryRateLimiter
from tests.conftest import FakeClock

SECRET = "metrics-test-secret-" + "0123456789abcdef" * 4


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value, 0 when it was never set."""
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


class TestMetrics:
    def test_request_counted_by_route_status_and_caller(
            self, metrics: Metrics, registry: CollectorRegistry) -> None:
        metrics.request("/v1/bots/{botId}/sessions/deactivate", 200, "crm-service", 0.01)
        metrics.request("/v1/bots/{botId}/sessions/deactivate", 200, "crm-service", 0.02)
        metrics.request("/v1/bots/{botId}/sessions/deactivate", 401, None, 0.001)
        route = "/v1/bots/{botId}/sessions/deactivate"
        assert value(registry, "kore_gateway_requests_total", route=route, status="200",
                     caller="crm-service") == 2
        assert value(registry, "kore_gateway_requests_total", route=route, status="401",
                     caller="anonymous") == 1
        assert value(registry, "kore_gateway_request_duration_seconds_count", route=route) == 3

    def test_instances_do_not_share_counts(self) -> None:
        first, second = CollectorRegistry(), CollectorRegistry()
        Metrics(first).ratelimit_rejected()
        Metrics(second)
        assert value(first, "kore_gateway_ratelimit_rejections_total") == 1
        assert value(second, "kore_gateway_ratelimit_rejections_total") == 0

    def test_render_is_prometheus_text_with_every_metric(self, metrics: Metrics) -> None:
        metrics.request("/healthz", 200, None, 0.001)
        names = {family.name for family in text_string_to_metric_families(
            metrics.render().decode())}
        assert names >= {
            "kore_gateway_requests", "kore_gateway_request_duration_seconds",
            "kore_gateway_upstream_requests", "kore_gateway_upstream_latency_seconds",
            "kore_gateway_token_mints", "kore_gateway_token_cache_hits",
            "kore_gateway_audit_write_seconds", "kore_gateway_audit_batch_records",
            "kore_gateway_audit_write_errors", "kore_gateway_ratelimit_waits",
            "kore_gateway_ratelimit_rejections", "kore_gateway_in_flight",
            "kore_gateway_circuit_state", "kore_gateway_circuit_open_bots"}

    def test_in_flight_goes_up_and_down(self, metrics: Metrics,
                                        registry: CollectorRegistry) -> None:
        metrics.request_started()
        metrics.request_started()
        metrics.request_finished()
        assert value(registry, "kore_gateway_in_flight") == 1


class TestInstrumentedParts:
    async def test_token_minted_once_then_served_from_cache(
            self, metrics: Metrics, registry: CollectorRegistry) -> None:
        app = KoreApp(name="main", client_id="cs-main", client_secret=Secret(SECRET))
        cache = TokenCache([app], metrics=metrics)
        try:
            for _ in range(3):
                await cache.token(app)
        finally:
            await cache.aclose()
        assert value(registry, "kore_gateway_token_mints_total", app="main") == 1
        assert value(registry, "kore_gateway_token_cache_hits_total", app="main") == 2

    async def test_jti_app_mints_every_time_and_never_hits(
            self, metrics: Metrics, registry: CollectorRegistry) -> None:
        app = KoreApp(name="jti", client_id="cs-jti", client_secret=Secret(SECRET), jti=True)
        cache = TokenCache([app], metrics=metrics)
        for _ in range(3):
            await cache.token(app)
        assert value(registry, "kore_gateway_token_mints_total", app="jti") == 3
        assert value(registry, "kore_gateway_token_cache_hits_total", app="jti") == 0

    def test_circuit_state_follows_the_breaker(self, metrics: Metrics,
                                               registry: CollectorRegistry) -> None:
        """A bot has a series only while its circuit is not closed; bot="*" is the host's."""
        clock = FakeClock(100.0)
        breaker = CircuitBreaker("kore.test", failures=2, cooldown_s=5, clock=clock,
                                 metrics=metrics)

        def state(bot: str = "st-a") -> float | None:
            return registry.get_sample_value("kore_gateway_circuit_state",
                                             {"host": "kore.test", "bot": bot})

        assert state("*") == 0  # present from the start
        breaker.record(breaker.before_call("st-a"), ok=False)
        assert state() is None
        breaker.record(breaker.before_call("st-a"), ok=False)
        assert state() == 2 and value(registry, "kore_gateway_circuit_open_bots") == 1
        clock.advance(5)
        ticket = breaker.before_call("st-a")
        assert state() == 1
        breaker.record(ticket, ok=True)
        assert state() is None and value(registry, "kore_gateway_circuit_open_bots") == 0
        assert state("*") == 0

    def test_bot_series_are_capped(self, metrics: Metrics,
                                   registry: CollectorRegistry) -> None:
        breaker = CircuitBreaker("kore.test", failures=1, cooldown_s=5, host_bots=10**6,
                                 clock=FakeClock(100.0), metrics=metrics)
        for n in range(MAX_BOT_SERIES + 50):
            breaker.record(breaker.before_call(f"st-{n}"), ok=False)
        text = metrics.render().decode()
        assert text.count("kore_gateway_circuit_state{") == MAX_BOT_SERIES + 1  # + the host's
        assert value(registry, "kore_gateway_circuit_open_bots") == MAX_BOT_SERIES + 50

    async def test_rate_limit_waits_and_rejections_are_counted(
            self, metrics: Metrics, registry: CollectorRegistry) -> None:
        clock = FakeClock(0.0)
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)

        limiter = MemoryRateLimiter([(1, 10.0)], clock=clock, sleep=sleep, metrics=metrics)
        await limiter.acquire("st-a", deadline=100.0)  # room: no wait
        await limiter.acquire("st-a", deadline=100.0)  # waits 10 s for the next slot
        with pytest.raises(RateLimited):
            await limiter.acquire("st-a", deadline=1.0)  # the slot comes too late
        assert slept == [10.0]
        assert value(registry, "kore_gateway_ratelimit_waits_total") == 1
        assert value(registry, "kore_gateway_ratelimit_rejections_total") == 1

    async def test_audit_group_commit_size_and_latency(
            self, tmp_path: Path, metrics: Metrics, registry: CollectorRegistry) -> None:
        log = AuditLog(tmp_path / "audit.jsonl", metrics=metrics)
        log.open()
        try:
            await asyncio.gather(*(log.append({"event": "e", "n": i}) for i in range(5)))
            await log.append({"event": "e", "n": 5})
        finally:
            await log.close()
        commits = value(registry, "kore_gateway_audit_batch_records_count")
        assert value(registry, "kore_gateway_audit_batch_records_sum") == 6
        assert 2 <= commits < 6, "concurrent appends share a commit"
        assert value(registry, "kore_gateway_audit_write_seconds_count") == commits
        assert value(registry, "kore_gateway_audit_write_seconds_sum") > 0

    async def test_failed_audit_commit_is_counted(self, metrics: Metrics,
                                                  registry: CollectorRegistry) -> None:
        log = AuditLog(Path("/dev/full"), metrics=metrics)
        log.open()
        try:
            with pytest.raises(AuditUnavailable):
                await log.append({"event": "e"})
        finally:
            await log.close()
        assert value(registry, "kore_gateway_audit_write_errors_total") == 1
        assert value(registry, "kore_gateway_audit_batch_records_count") == 0


class TestFastMetrics:
    """The request path's counters and histograms expose exactly what prometheus-client's do."""

    def test_histogram_matches_prometheus_client_at_and_between_bounds(self) -> None:
        from prometheus_client import Histogram

        from gateway.metrics import LATENCY_BUCKETS_S, FastHistogram

        ours, theirs = CollectorRegistry(), CollectorRegistry()
        fast = FastHistogram("h_seconds", "h", ("route",), LATENCY_BUCKETS_S, registry=ours)
        reference = Histogram("h_seconds", "h", ("route",), buckets=LATENCY_BUCKETS_S,
                              registry=theirs)
        for seconds in (0.0, 0.001, 0.005, 0.0050001, 0.3, 1.0, 29.9, 30.0, 31.0, 1e9):
            for route in ("/a", "/b"):
                fast.observe(seconds, (route,))
                reference.labels(route).observe(seconds)

        def samples(registry: CollectorRegistry) -> list[tuple[str, str, float]]:
            return sorted((s.name, repr(sorted(s.labels.items())), s.value)
                          for f in registry.collect() for s in f.samples
                          if not s.name.endswith("_created"))

        assert samples(ours) == samples(theirs)

    def test_counter_matches_prometheus_client(self) -> None:
        from prometheus_client import Counter

        from gateway.metrics import FastCounter

        ours, theirs = CollectorRegistry(), CollectorRegistry()
        fast = FastCounter("c_total", "c", ("status",), registry=ours)
        reference = Counter("c_total", "c", ("status",), registry=theirs)
        for status in ("200", "200", "503"):
            fast.inc((status,))
            reference.labels(status).inc()
        text = [line for line in generate_latest(theirs).decode().splitlines()
                if "_created" not in line]
        assert generate_latest(ours).decode().splitlines() == text


class TestMultiprocessDir:
    def test_fresh_directory_for_several_workers_removed_at_exit(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
        monkeypatch.delenv(LEGACY_ENV, raising=False)
        monkeypatch.setenv("TMPDIR", str(tmp_path))
        monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
        with multiprocess_dir(2) as path:
            assert path is not None and path.is_dir() and path.parent == tmp_path
            assert os.environ[MULTIPROC_ENV] == str(path)
        assert not path.exists()
        assert MULTIPROC_ENV not in os.environ

    def test_single_worker_needs_no_directory(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
        with multiprocess_dir(1) as path:
            assert path is None and MULTIPROC_ENV not in os.environ

    def test_operator_directory_is_kept_but_emptied_of_old_samples(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        (tmp_path / "counter_123.db").write_bytes(b"old")
        (tmp_path / "worker-123.json").write_text("{}")
        (tmp_path / "exited-124.json").write_text("{}")
        (tmp_path / "notes.txt").write_text("keep")
        monkeypatch.setenv(LEGACY_ENV, str(tmp_path))
        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
        with multiprocess_dir(4) as path:
            assert path == tmp_path and os.environ[MULTIPROC_ENV] == str(tmp_path)
            assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
        assert (tmp_path / "notes.txt").exists() and MULTIPROC_ENV not in os.environ


SIMPLE = "/v1/bots/{botId}/sessions/deactivate"


def scraped(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples}


def other_worker(directory: Path, pid: int, *, requests: int, in_flight: int,
                 circuit: str) -> None:
    """What another worker would have published: its snapshot, under its own pid."""
    worker = Metrics(shared_dir=directory)
    for _ in range(requests):
        worker.request(SIMPLE, 200, "crm", 0.01)
    for _ in range(in_flight):
        worker.request_started()
    worker.circuit_state("kore.example", "*", circuit)
    worker.publish()
    os.replace(directory / f"worker-{os.getpid()}.json", directory / f"worker-{pid}.json")


class TestWorkersMerged:
    """Each worker counts in process and publishes a snapshot; a scrape merges them all."""

    def test_counters_and_histograms_are_summed_gauges_follow_their_mode(
            self, tmp_path: Path) -> None:
        other_worker(tmp_path, 4001, requests=3, in_flight=2, circuit="open")
        mine = Metrics(shared_dir=tmp_path)
        mine.request(SIMPLE, 200, "crm", 0.02)
        mine.request_started()
        mine.circuit_state("kore.example", "*", "closed")
        samples = scraped(mine)
        key = (("caller", "crm"), ("route", SIMPLE), ("status", "200"))
        assert samples[("kore_gateway_requests_total", key)] == 4
        assert samples[("kore_gateway_request_duration_seconds_count", (("route", SIMPLE),))] == 4
        assert samples[("kore_gateway_request_duration_seconds_bucket",
                        (("le", "+Inf"), ("route", SIMPLE)))] == 4
        assert samples[("kore_gateway_in_flight", ())] == 3  # livesum
        circuit = ("kore_gateway_circuit_state", (("bot", "*"), ("host", "kore.example")))
        assert samples[circuit] == 2  # livemax
        assert not any(name.endswith("_created") for name, _ in samples)

    def test_an_exited_worker_keeps_its_counts_but_not_its_live_gauges(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        other_worker(tmp_path, 4002, requests=5, in_flight=1, circuit="open")
        monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
        worker_exited(4002)
        mine = Metrics(shared_dir=tmp_path)
        samples = scraped(mine)
        key = (("caller", "crm"), ("route", SIMPLE), ("status", "200"))
        assert samples[("kore_gateway_requests_total", key)] == 5
        assert samples[("kore_gateway_in_flight", ())] == 0
        assert ("kore_gateway_circuit_state", (("bot", "*"), ("host", "kore.example"))) \
            not in samples

    def test_a_scrape_publishes_its_own_counts_first(self, tmp_path: Path) -> None:
        mine = Metrics(shared_dir=tmp_path)
        mine.ratelimit_rejected()
        mine.render()
        published = (tmp_path / f"worker-{os.getpid()}.json").read_text()
        assert "kore_gateway_ratelimit_rejections_total" in published
        mine.ratelimit_rejected()
        assert scraped(mine)[("kore_gateway_ratelimit_rejections_total", ())] == 2

    async def test_publishes_periodically_off_the_request_path(self, tmp_path: Path) -> None:
        mine = Metrics(shared_dir=tmp_path)
        mine.token_minted("sessions")
        task = asyncio.create_task(mine.publish_every(0.01))
        path = tmp_path / f"worker-{os.getpid()}.json"
        for _ in range(200):
            if path.exists():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        assert "kore_gateway_token_mints_total" in path.read_text()

    async def test_a_single_process_publishes_nothing(self, tmp_path: Path) -> None:
        alone = Metrics()
        alone.publish()
        await alone.publish_every(0.01)  # returns at once
        assert b"kore_gateway_requests_total" in alone.render()
