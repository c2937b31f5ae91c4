"""Every metric docs/operations.md names (its metrics table and the PromQL of its alerts) is
served by a real gateway's /metrics: an alert on a metric that does not exist never fires.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
METRIC = re.compile(r"\b(?:kore_gateway|kgw)_[a-z0-9_]*[a-z0-9]")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count")}


def named_in_docs() -> set[str]:
    return set(METRIC.findall(OPERATIONS.read_text(encoding="utf-8")))


def served(text: str) -> set[str]:
    """Every name a query may use: families, with their type's sample suffixes."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def test_the_alerts_use_metrics_at_all() -> None:
    names = named_in_docs()
    assert {"kgw_worker_restarts_total", "kgw_config_reload_failed",
            "kore_gateway_ratelimit_paused_bots", "kore_gateway_ratelimit_learned_budget",
            "kore_gateway_audit_disk_free_bytes",
            "kore_gateway_audit_unauthenticated_suppressed_total"} <= names
    assert len(names) >= 20


async def test_every_metric_the_operations_page_names_is_served(gateway: Any) -> None:
    resp = await gateway.get("/metrics")
    assert resp.status == 200
    missing = sorted(named_in_docs() - served(await resp.text()))
    assert not missing, f"named in {OPERATIONS.name} but not served by /metrics: {missing}"
