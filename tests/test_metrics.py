"""Metrics: each one moves where its thing happens, in the registry it was given."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.audit.log import AuditLog
from gateway.breaker import MAX_BOT_SERIES, CircuitBreaker
from gateway.config.model import KoreApp, Secret
from gateway.errors import AuditUnavailable, RateLimited
from gateway.kore.tokens import TokenCache
from gateway.metrics import MULTIPROC_ENV, Metrics, multiprocess_dir
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


class TestMultiprocessDir:
    def test_fresh_directory_for_several_workers_removed_at_exit(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(MULTIPROC_ENV, raising=False)
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
        (tmp_path / "notes.txt").write_text("keep")
        monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
        with multiprocess_dir(4) as path:
            assert path == tmp_path
            assert not (tmp_path / "counter_123.db").exists()
        assert (tmp_path / "notes.txt").exists() and os.environ[MULTIPROC_ENV] == str(tmp_path)

