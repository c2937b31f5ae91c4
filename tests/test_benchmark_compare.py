"""`python -m benchmarks.compare`: two checkouts' gateways served at once and timed in turns.

The real run serves this checkout against a copy of its own `gateway/` that marks where it was
imported from, so the test sees that the base's gateway is really the base's code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import compare, harness
from gateway.audit.log import AuditLog

REPO = Path(__file__).resolve().parent.parent
MISSING = [tool for tool in ("wrk",) if shutil.which(tool) is None]


def test_the_order_alternates_from_round_to_round() -> None:
    assert [compare.order(i) for i in range(4)] == [
        ("base", "this"), ("this", "base"), ("base", "this"), ("this", "base")]


def test_paired_figures_are_the_medians_of_each_rounds_ratio_or_difference() -> None:
    base, this = [100.0, 200.0, 400.0], [110.0, 180.0, 480.0]
    assert compare.paired(base, this, "ratio") == pytest.approx(1.1)  # 1.1, 0.9, 1.2
    assert compare.paired(base, this, "difference") == 10.0  # 10, -20, 80


def test_the_report_shows_medians_ratios_and_every_round() -> None:
    sides = {"base": compare.Side([1000.0, 1200.0], [400.0, 420.0], [1.0, 1.2], [2.0, 2.4],
                                  [20.0, 24.0]),
             "this": compare.Side([1100.0, 1200.0], [380.0, 420.0], [1.1, 1.0], [2.0, 2.0],
                                  [22.0, 24.0])}
    settings = {"base": "/b", "workers": 2, "rounds": 2, "connections": 64,
                "saturation_s": 8.0, "rate": 200.0, "latency_s": 5.0}
    text = compare.report(sides, settings)
    assert "| saturation throughput (req/s) | 1,100.000 | 1,150.000 | × 1.050 |" in text
    assert "| CPU time per deactivation (µs) | 410.000 | 400.000 | × 0.975 |" in text
    assert "| paced p50 (ms) | 1.100 | 1.050 | -0.050 |" in text
    assert "| audit records per group commit at saturation | 22.000 | 23.000 | × 1.050 |" in text
    assert ("round 1 (base first): 1,000 / 1,100   400.0 / 380.0   1.000 / 1.100   "
            "2.000 / 2.000   20.0 / 22.0") in text
    assert "round 2 (this first)" in text


def test_a_base_that_is_not_a_checkout_is_refused(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--base", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "not a checkout of the project" in done.stderr


@pytest.mark.parametrize("together", [False, True], ids=["in-turns", "paced-together"])
def test_two_checkouts_served_and_timed_in_turns(tmp_path: Path, together: bool) -> None:
    if MISSING:
        reason = "wrk not installed (apt-get install -y wrk; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    base = tmp_path / "base"
    shutil.copytree(REPO / "gateway", base / "gateway",
                    ignore=shutil.ignore_patterns("__pycache__"))
    mark = tmp_path / "imported-from"
    with (base / "gateway" / "__init__.py").open("a") as init:
        init.write("\nimport os as _os\n"
                   "if _os.environ.get('KGW_COMPARE_MARK'):\n"
                   "    with open(_os.environ['KGW_COMPARE_MARK'], 'a') as _f:\n"
                   "        _f.write(__file__ + '\\n')\n")
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.compare", "--base", str(base), "--rounds", "2",
         "--saturation-s", "1", "--latency-s", "1", "--rate", "40", "--workers", "1",
         "--connections", "4", "--json", str(out), *(["--together"] if together else [])],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "KGW_COMPARE_MARK": str(mark)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert set(mark.read_text().splitlines()) == {str(base / "gateway" / "__init__.py")}
    figures = json.loads(out.read_text())
    assert figures["settings"]["together"] is together
    for name in ("base", "this"):
        rounds = figures["rounds"][name]
        assert len(rounds["rps"]) == len(rounds["p50_ms"]) == 2, name
        assert all(x > 0 for x in rounds["rps"] + rounds["cpu_us"] + rounds["p99_ms"]
                   + rounds["per_commit"]), name
        assert rounds["failed"] == 0, name
        assert figures["audit"][name]["chains_ok"] and figures["audit"][name]["records"] > 0
    assert "× " in done.stdout and "round 2 (this first)" in done.stdout


async def test_the_audit_check_follows_each_chain_over_its_rotated_files(tmp_path: Path) -> None:
    (tmp_path / "audit").mkdir()
    for worker in (0, 1):
        log = AuditLog(tmp_path / "audit" / f"deactivations-w{worker}.jsonl", max_bytes=1024)
        log.open()
        for i in range(12):  # about 300 bytes each: rotated every three or so
            await log.append({"event": "deactivate.requested", "requestId": f"r-{i}",
                              "pad": "x" * 200})
        await log.close()
    files = sorted((tmp_path / "audit").glob("*.jsonl"))
    assert len(files) > 4
    assert compare.audit_ok(tmp_path) == {"files": len(files), "records": 24, "chains_ok": True}
    chains = harness.verify_chains(tmp_path / "audit")  # the harness's own audit check
    assert {name: r.records for name, r in chains.items()} == {
        "deactivations-w0.jsonl": 12, "deactivations-w1.jsonl": 12}
    files[1].write_bytes(files[1].read_bytes().replace(b"r-", b"R-", 1))
    assert not compare.audit_ok(tmp_path)["chains_ok"]
