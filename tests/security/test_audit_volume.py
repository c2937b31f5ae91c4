"""The audit volume's free space is watched (issue 11, finding 1): a metric and a `/readyz`
detail, so that an operator sees a filling disk before the gateway refuses every call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gateway.http.app import RUNTIME


async def test_free_bytes_of_the_audit_volume_are_a_metric_and_a_readiness_detail(
        gateway: Any) -> None:
    audit_dir = Path(gateway.server.app[RUNTIME].audit.path).parent
    stats = os.statvfs(audit_dir)
    expected = stats.f_bavail * stats.f_frsize
    resp = await gateway.get("/readyz")
    detail = await resp.json()
    assert resp.status == 200
    assert abs(detail["auditDiskFreeBytes"] - expected) < 256 * 1024 * 1024
    assert set(detail) >= {"status", "checks", "circuit", "rateLimit"}  # existing keys kept
    text = await (await gateway.get("/metrics")).text()
    [line] = [x for x in text.splitlines() if x.startswith("kore_gateway_audit_disk_free_bytes")]
    assert abs(float(line.split()[-1]) - expected) < 256 * 1024 * 1024
