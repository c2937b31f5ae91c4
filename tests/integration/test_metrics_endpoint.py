"""`GET /metrics` on the real gateway in front of the real sandbox: what callers and Kore.ai
did shows up under the right labels, and nothing unbounded becomes a label."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.http.app import create_app
from gateway.metrics import Metrics
from tests.conftest import BOT, OTHER_KEY
from tests.integration.conftest import StartGateway

SIMPLE = "/v1/bots/{botId}/sessions/deactivate"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a /metrics answer, by name and labels."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: Any) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return parse(await resp.text())


async def deactivate(client: Any, headers: dict[str, str], user: str = "u-1",
                     bot: str = BOT) -> int:
    resp = await client.post(f"/v1/bots/{bot}/sessions/deactivate", json={"userId": user},
                             headers=headers)
    await resp.read()
    return int(resp.status)


async def test_metrics_need_no_key_and_are_prometheus_text(gateway: Any) -> None:
    resp = await gateway.get("/metrics")
    text = await resp.text()
    assert resp.status == 200, text
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "X-Request-ID" in resp.headers
    assert "# TYPE kore_gateway_requests_total counter" in text
    assert "# TYPE kore_gateway_upstream_latency_seconds histogram" in text


async def test_requests_are_labelled_by_route_template_status_and_caller(
        gateway: Any, auth_headers: dict[str, str]) -> None:
    assert await deactivate(gateway, auth_headers) == 200
    assert await deactivate(gateway, {}) == 401
    assert await deactivate(gateway, {"Authorization": f"Bearer {OTHER_KEY}"}) == 403
    await (await gateway.get("/v1/bots/st-x/no-such-route-u-secret")).read()
    samples = await scrape(gateway)
    count = "kore_gateway_requests_total"
    assert sample(samples, count, route=SIMPLE, status="200", caller="crm-service") == 1
    assert sample(samples, count, route=SIMPLE, status="401", caller="anonymous") == 1
    assert sample(samples, count, route=SIMPLE, status="403", caller="narrow-service") == 1
    assert sample(samples, count, route="unmatched", status="404", caller="anonymous") == 1
    labels = {value for _, label_set in samples for _, value in label_set}
    assert not any(BOT in v or "no-such-route" in v or "u-1" == v for v in labels), labels


async def test_upstream_attempts_by_status_and_latency(
        gateway: Any, sandbox: Any, auth_headers: dict[str, str]) -> None:
    sandbox.faults.error_status, sandbox.faults.fail_first = 503, 1
    assert await deactivate(gateway, auth_headers) == 200  # after one retry
    samples = await scrape(gateway)
    assert sample(samples, "kore_gateway_upstream_requests_total", status="503") == 1
    assert sample(samples, "kore_gateway_upstream_requests_total", status="200") == 1
    assert sample(samples, "kore_gateway_upstream_latency_seconds_count") == 2
    assert len(sandbox.calls) == 2


async def test_token_minted_once_then_cache_hits(gateway: Any,
                                                 auth_headers: dict[str, str]) -> None:
    for i in range(3):
        assert await deactivate(gateway, auth_headers, user=f"u-{i}") == 200
    samples = await scrape(gateway)
    assert sample(samples, "kore_gateway_token_mints_total", app="sessions") == 1
    assert sample(samples, "kore_gateway_token_cache_hits_total", app="sessions") == 2


async def test_audit_commits_cover_every_record(gateway: Any, auth_headers: dict[str, str],
                                                audit_records: Any) -> None:
    await asyncio.gather(*(deactivate(gateway, auth_headers, user=f"u-{i}") for i in range(8)))
    for _ in range(100):  # a terminal record is answered once written: its fsync may follow
        samples = await scrape(gateway)
        if sample(samples, "kore_gateway_audit_batch_records_sum") == 16:
            break
        await asyncio.sleep(0.05)
    commits = sample(samples, "kore_gateway_audit_batch_records_count")
    assert sample(samples, "kore_gateway_audit_batch_records_sum") == len(audit_records()) == 16
    assert 1 <= commits <= 16
    assert sample(samples, "kore_gateway_audit_write_seconds_count") == commits


async def test_rate_limit_rejection_is_counted(start_gateway: StartGateway,
                                               auth_headers: dict[str, str]) -> None:
    client = await start_gateway(rate_limit={"windows": [{"calls": 1, "per_s": 3600}]})
    assert await deactivate(client, auth_headers) == 200
    assert await deactivate(client, auth_headers) == 429
    samples = await scrape(client)
    assert sample(samples, "kore_gateway_ratelimit_rejections_total") == 1
    assert sample(samples, "kore_gateway_ratelimit_waits_total") == 0


async def test_rate_limit_wait_is_counted(start_gateway: StartGateway,
                                          auth_headers: dict[str, str]) -> None:
    client = await start_gateway(rate_limit={"windows": [{"calls": 1, "per_s": 1}]})
    statuses = await asyncio.gather(deactivate(client, auth_headers, user="u-1"),
                                    deactivate(client, auth_headers, user="u-2"))
    assert statuses == [200, 200]
    samples = await scrape(client)
    assert sample(samples, "kore_gateway_ratelimit_waits_total") >= 1
    assert sample(samples, "kore_gateway_ratelimit_rejections_total") == 0


async def test_in_flight_counts_requests_being_handled(
        gateway: Any, sandbox: Any, auth_headers: dict[str, str]) -> None:
    sandbox.faults.latency_ms = 500
    call = asyncio.create_task(deactivate(gateway, auth_headers))
    deadline = time.monotonic() + 5
    seen = 0.0
    while time.monotonic() < deadline and not seen:
        seen = sample(await scrape(gateway), "kore_gateway_in_flight")
        await asyncio.sleep(0.02)
    assert seen == 1
    assert await call == 200
    assert sample(await scrape(gateway), "kore_gateway_in_flight") == 0


async def test_circuit_state_open_after_failures(start_gateway: StartGateway, sandbox: Any,
                                                 auth_headers: dict[str, str]) -> None:
    client = await start_gateway(upstream={"breaker_failures": 1, "max_attempts": 1})
    host = sandbox.url.removeprefix("http://")
    assert sample(await scrape(client), "kore_gateway_circuit_state", host=host, bot="*") == 0
    assert "bot=\"" + BOT not in (await (await client.get("/metrics")).text())
    sandbox.faults.error_status, sandbox.faults.fail_first = 503, 1
    assert await deactivate(client, auth_headers) == 502
    samples = await scrape(client)
    assert sample(samples, "kore_gateway_circuit_state", host=host, bot=BOT) == 2
    assert sample(samples, "kore_gateway_circuit_state", host=host, bot="*") == 0
    assert sample(samples, "kore_gateway_circuit_open_bots") == 1


async def test_injected_registry_gets_the_counts(
        aiohttp_client: Any, make_config: Any, sandbox: Any,
        auth_headers: dict[str, str]) -> None:
    registry = CollectorRegistry()
    client = await aiohttp_client(create_app(make_config(sandbox.url),
                                             metrics=Metrics(registry)),
                                  server_kwargs={"host": "127.0.0.1"})
    assert await deactivate(client, auth_headers) == 200
    assert registry.get_sample_value("kore_gateway_requests_total", {
        "route": SIMPLE, "status": "200", "caller": "crm-service"}) == 1
