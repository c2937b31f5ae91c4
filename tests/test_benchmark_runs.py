"""`python -m benchmarks.runs`: the kept harness runs read back, side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import runs

REPO = Path(__file__).resolve().parent.parent


def harness_json(label: str, when: str, floor_p50: float, p50: tuple[float, float, float],
                 cpu: tuple[float, float, float] = (1.4, 1.2, 1.1)) -> dict[str, Any]:
    """The parts of a `python -m benchmarks` run the tool reads (gateway, minimum, audit I/O)."""
    def target(key: str, values: tuple[float, float, float], limit: float,
               kind: str) -> dict[str, Any]:
        return {"key": key, "value": values[0], "contract_minimum": values[1],
                "contract_io": values[2], "limit": limit, "kind": kind}
    return {"label": label, "when": when, "latency_200": {"floor": {"p50_ms": floor_p50}},
            "targets": [target("cpu_ratio_floor", cpu, 1.5, "max"),
                        target("throughput_ratio_floor", (0.6, 0.8, 0.9), 0.67, "min"),
                        target("over_floor_p50_ms", p50, 0.5, "max"),
                        target("over_floor_p99_ms", (1.2, 0.8, 0.7), 1.5, "max"),
                        target("rss_mib_max", (57.0, 0, 0), 64.0, "max")]}


def write(directory: Path, name: str, data: object) -> None:
    (directory / name).write_text(json.dumps(data))


def test_runs_are_read_oldest_first_and_other_files_are_passed_over(tmp_path: Path) -> None:
    write(tmp_path, "b.json", harness_json("later", "2026-12-06 10:00 UTC", 1.0,
                                           (0.8, 0.45, 0.3)))
    write(tmp_path, "a.json", harness_json("earlier", "2026-12-05 10:00 UTC", 0.5,
                                           (0.45, 0.3, 0.25), cpu=(1.6, 1.3, 1.2)))
    write(tmp_path, "compare.json", {"settings": {}, "rounds": []})  # another tool's
    old = harness_json("before-peers", "2026-12-01 10:00 UTC", 0.5, (0.5, 0.3, 0.2))
    del old["targets"][2]["contract_minimum"]
    write(tmp_path, "old.json", old)
    (tmp_path / "torn.json").write_text("{")
    found = runs.load_runs(tmp_path)
    assert [run.label for run in found] == ["earlier", "later"]
    assert found[1].floor_p50_ms == 1.0
    assert found[1].figures["over_floor_p50_ms"].gateway == 0.8


def test_the_report_counts_the_limits_met_and_prices_the_gateway_over_the_minimum(
        tmp_path: Path) -> None:
    write(tmp_path, "a.json", harness_json("fast", "2026-12-05 10:00 UTC", 0.5,
                                           (0.45, 0.3, 0.25), cpu=(1.6, 1.3, 1.2)))
    slow = harness_json("slow", "2026-12-06 10:00 UTC", 1.0, (0.8, 0.45, 0.3))
    slow["disk"] = {"before_paced": {"p50_ms": 0.6541}, "after_paced": {"p50_ms": 1.1}}
    write(tmp_path, "b.json", slow)
    text = runs.report(runs.load_runs(tmp_path))
    # Met figures in bold: the fast run's CPU missed by the gateway, met by the two peers. It
    # did not time the disk; the slow run did.
    assert ("| `fast` | 2026-12-05 10:00 UTC | 0.500 | – | 1.600 / **1.300** / **1.200** | "
            "0.600 / **0.800** / **0.900** | **0.450** / **0.300** / **0.250** |") in text
    assert "| `slow` | 2026-12-06 10:00 UTC | 1.000 | 0.654 / 1.100 | **1.400** / " in text
    assert "| p50 over floor (ms) | ≤ 0.5 | 1 of 2 | 2 of 2 | 2 of 2 |" in text
    assert "| throughput ÷ floor | ≥ 0.67 | 0 of 2 | 2 of 2 | 2 of 2 |" in text
    # Over the minimum: 0.15 and 0.35 (median 0.25); the limit leaves 0.2 and 0.05.
    assert ("every run, 2 runs: the gateway is +0.250 over the minimum (median; +0.150 to "
            "+0.350); the limit leaves +0.125 (median; +0.050 to +0.200)") in text
    assert "the faster half (floor p50 ≤ 0.500 ms), 1 runs: the gateway is +0.150" in text
    assert "the slower half (floor p50 ≥ 1.000 ms), 1 runs: the gateway is +0.350" in text


def test_an_empty_directory_says_so(tmp_path: Path) -> None:
    assert runs.report(runs.load_runs(tmp_path)).startswith("no harness run")


def test_every_kept_run_reads_back() -> None:
    """The runs docs/benchmarks keeps stay readable: the report's summary is built on them."""
    kept = runs.load_runs(runs.DEFAULT_DIR)
    assert len(kept) >= 39
    assert all(run.when.startswith("2026-") for run in kept)
    assert f"{len(kept)} runs. Limits met" in runs.report(kept)


def test_the_command_prints_the_report_and_refuses_a_missing_directory(tmp_path: Path) -> None:
    write(tmp_path, "a.json", harness_json("one", "2026-12-05 10:00 UTC", 0.5,
                                           (0.45, 0.3, 0.25)))
    done = subprocess.run([sys.executable, "-m", "benchmarks.runs", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "1 runs. Limits met" in done.stdout
    missing = subprocess.run([sys.executable, "-m", "benchmarks.runs", str(tmp_path / "no")],
                             cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode == 2 and "not a directory" in missing.stderr
