"""`serve --workers 2` as a real subprocess: /metrics sums every worker, whichever answers.

Each worker counts in process and publishes a snapshot at most `PUBLISH_EVERY_S` apart; the
worker that answers a scrape publishes its own first and merges all of them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from benchmarks.ports import free_port
from gateway.metrics import PUBLISH_EVERY_S
from tests.conftest import BOT, CALLER_KEY, base_settings, merge, read_records, write_config
from tests.integration.test_crash import REPO, wait_healthy
from tests.integration.test_metrics_endpoint import SIMPLE, Samples, parse, sample

CALLS = 40
SCRAPES = 8
METRICS_DIRS = "kore-gateway-metrics-*"


async def fresh_connection(method: str, url: str, **kwargs: Any) -> tuple[int, str]:
    """One request on its own connection, so SO_REUSEPORT may hand it to either worker."""
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                      timeout=aiohttp.ClientTimeout(total=10)) as s,
                s.request(method, url, **kwargs) as resp):
        return resp.status, await resp.text()


async def scrape(url: str) -> Samples:
    status, text = await fresh_connection("GET", url + "/metrics")
    assert status == 200, text
    return parse(text)


def start_workers(config_path: Path, tmp: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TMPDIR": str(tmp)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.pop("KORE_GATEWAY_METRICS_DIR", None)
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
             "--workers", "2"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)  # its own process group: the workers go with it


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM and a graceful drain; the whole group is killed if that hangs."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


async def wait_listening(log: Path, workers: int, timeout_s: float = 20) -> None:
    """Until every worker has logged that it listens (SO_REUSEPORT spreads only over those)."""
    deadline = time.monotonic() + timeout_s
    while log.read_text(errors="replace").count("gateway.listening") < workers:
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        await asyncio.sleep(0.05)


@pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT and POSIX signals")
async def test_two_workers_report_summed_counters(sandbox: Any, tmp_path: Path) -> None:
    port = free_port()
    settings = merge(base_settings(tmp_path, sandbox.url),
                     {"server": {"listen": f"127.0.0.1:{port}"}})
    config_path = write_config(tmp_path, settings)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "gateway.log"
    proc = start_workers(config_path, tmp, log)
    try:
        await wait_healthy(url, proc)
        await wait_listening(log, workers=2)
        [metrics_dir] = list(tmp.glob(METRICS_DIRS))
        statuses = await asyncio.gather(*(fresh_connection(
            "POST", f"{url}/v1/bots/{BOT}/sessions/deactivate", json={"userId": f"u-{i}"},
            headers={"Authorization": f"Bearer {CALLER_KEY}"}) for i in range(CALLS)))
        assert [status for status, _ in statuses] == [200] * CALLS
        await asyncio.sleep(PUBLISH_EVERY_S * 2)  # every worker has published its counts
        assert len(list(metrics_dir.glob("worker-*.json"))) == 2, "one snapshot per worker"
        assert not list(metrics_dir.glob("*.db")), "no multiprocess files"
        scrapes = [await scrape(url) for _ in range(SCRAPES)]
        await asyncio.sleep(PUBLISH_EVERY_S * 2)
        settled = await scrape(url)
    finally:
        stop(proc)
    assert proc.returncode == 0

    per_worker = [read_records(tmp_path / "audit" / f"deactivations-w{n}.jsonl") for n in (0, 1)]
    assert all(per_worker), "both workers served deactivations"
    for samples in [*scrapes, settled]:
        assert sample(samples, "kore_gateway_requests_total", route=SIMPLE, status="200",
                      caller="crm-service") == CALLS
        assert sample(samples, "kore_gateway_upstream_requests_total", status="200") == CALLS
        assert sample(samples, "kore_gateway_audit_batch_records_sum") == 2 * CALLS
        assert sample(samples, "kore_gateway_token_mints_total", app="sessions") == 2
        assert sample(samples, "kore_gateway_in_flight") == 0
        assert sample(samples, "kore_gateway_circuit_state",
                      host=sandbox.url.removeprefix("http://"), bot="*") == 0
    scraped = [sample(s, "kore_gateway_requests_total", route="/metrics", status="200",
                      caller="anonymous") for s in [*scrapes, settled]]
    assert scraped == sorted(scraped), "a counter never goes down, whichever worker answers"
    assert scraped[-1] == SCRAPES, "once published, every scrape before is counted"
    assert list(tmp.glob(METRICS_DIRS)) == [], "the metrics directory is removed at exit"
