"""`server.admin_listen` on the real `serve` process: while the API listens on loopback,
/metrics is scrapeable on the admin address only, with one worker and with `--workers 2`
(every worker answers there, each with the sum of all of them, the others' counts as
published at most `PUBLISH_EVERY_S` ago)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.metrics import PUBLISH_EVERY_S
from tests.conftest import BOT, CALLER_KEY, base_settings, merge, write_config
from tests.integration.served import Served, fresh
from tests.integration.test_metrics_endpoint import SIMPLE, parse, sample

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT and signals")
CALLS = 12
TRIES = 8  # requests on fresh connections: with two workers, both answer some of them
AUTH = {"Authorization": f"Bearer {CALLER_KEY}"}


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
async def test_metrics_only_on_the_admin_address(sandbox: Any, tmp_path: Path,
                                                 workers: int) -> None:
    settings = merge(base_settings(tmp_path, sandbox.url), {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "logging": {"format": "json"}})
    served = Served(write_config(tmp_path, settings), tmp_path / "gateway.log", workers)
    try:
        lines = await served.listening()
        [listen] = {line["listen"] for line in lines}
        [admin_listen] = {line["admin_listen"] for line in lines}
        assert listen.startswith("127.0.0.1:") and admin_listen.startswith("127.0.0.1:")
        assert listen != admin_listen and not admin_listen.endswith(":0")
        api, admin = f"http://{listen}", f"http://{admin_listen}"
        for i in range(CALLS):
            status, text = await fresh("POST", f"{api}/v1/bots/{BOT}/sessions/deactivate",
                                       json={"userId": f"u-{i}"}, headers=AUTH)
            assert status == 200, text
        await asyncio.sleep(2 * PUBLISH_EVERY_S)  # every worker has published its counts
        for _ in range(TRIES):
            status, text = await fresh("GET", f"{admin}/metrics")
            assert status == 200, text
            assert sample(parse(text), "kore_gateway_requests_total", route=SIMPLE,
                          status="200", caller="crm-service") == CALLS
            assert sample(parse(text), "kgw_worker_restarts_total") == 0
            status, text = await fresh("GET", f"{api}/metrics")
            assert status == 404 and '"code": "not_found"' in text, (status, text)
        for path in ("/healthz", "/readyz", "/openapi.json"):
            for base in (api, admin):
                status, text = await fresh("GET", base + path)
                assert status == 200, (base, path, text)
        status, text = await fresh("POST", f"{admin}/v1/bots/{BOT}/sessions/deactivate",
                                   json={"userId": "u-admin"}, headers=AUTH)
        assert status == 404, text
    finally:
        code = served.stop()
    assert code == 0
    assert len(sandbox.calls) == CALLS  # nothing reached Kore.ai through the admin address
    assert len(served.events("gateway.stopped")) == workers


async def test_admin_address_in_use_stops_the_start(sandbox: Any, tmp_path: Path) -> None:
    """An admin address that cannot be bound is a listen error, as for `listen`."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = merge(base_settings(tmp_path, sandbox.url), {
            "server": {"listen": "127.0.0.1:0", "admin_listen": f"127.0.0.1:{port}"}})
        served = Served(write_config(tmp_path, settings), tmp_path / "gateway.log")
        try:
            code = served.proc.wait(timeout=30)
        finally:
            served.kill_group()
    assert code == 2
    assert f"listen error: cannot listen on 127.0.0.1:{port}" in served.text()
