"""`python -m benchmarks.calls`: calls per deactivation of the floor, the contract minimum and
the gateway, each served for real under cProfile."""

from __future__ import annotations

import argparse
import asyncio
import collections
import tempfile
from pathlib import Path

from benchmarks.calls import Calls, measure, package_of, report


def test_a_file_is_charged_to_its_package() -> None:
    site = "/x/.venv/lib/python3.11/site-packages/aiohttp/web_protocol.py"
    assert package_of(site) == ("aiohttp", "aiohttp/web_protocol.py")
    stdlib = "/usr/lib/python3.11/asyncio/tasks.py"
    assert package_of(stdlib) == ("asyncio", "asyncio/tasks.py")
    assert package_of("/usr/lib/python3.11/json/decoder.py") == ("other", "json/decoder.py")
    own = str(Path(__file__).resolve().parent.parent / "gateway" / "audit" / "log.py")
    assert package_of(own) == ("gateway", "gateway/audit/log.py")


def test_the_report_gives_calls_per_deactivation_by_package() -> None:
    floor = Calls("aiohttp floor", 2, collections.Counter({"aiohttp:aiohttp/a.py:1:f": 6}),
                  collections.Counter({"~:len": 4}))
    gateway = Calls("gateway", 2, collections.Counter({
        "aiohttp:aiohttp/a.py:1:f": 8, "gateway:gateway/b.py:7:g": 4,
        "gateway:gateway/c.py:9:h": 2, "other:json/d.py:3:i": 2}), collections.Counter())
    text = report([floor, gateway], top=1)
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ")]
    assert rows[0][:3] == ["| target", "Python functions", "built-ins"]
    assert rows[1][:4] == ["| aiohttp floor", "3.0", "2.0", "3.0"]
    assert rows[2][:4] == ["| gateway", "8.0", "0.0", "4.0"]
    assert rows[2][-1] == "1.0 |"  # other
    assert text.rstrip().endswith("2.0  g (gateway/b.py:7)")
    assert "h (gateway/c.py:9)" not in text  # beyond the top 1


def test_real_targets_are_counted_and_the_gateway_runs_its_own_code() -> None:
    args = argparse.Namespace(requests=30, warmup=10, concurrency=1, top=10)
    with tempfile.TemporaryDirectory() as name:
        counts = asyncio.run(measure(args, Path(name)))
    by_name = {c.name: c for c in counts}
    assert list(by_name) == ["aiohttp floor", "contract minimum", "gateway"]
    floor, minimum, gateway = by_name.values()
    for c in counts:
        assert c.requests == 30 and c.per_request(c.python, "aiohttp:") > 50, c.name
    assert floor.per_request(floor.python, "gateway:") == 0
    assert minimum.per_request(minimum.python, "benchmarks:") > 0  # its duties: floor.py's
    assert gateway.per_request(gateway.python, "gateway:") > 50
    assert gateway.per_request(gateway.python) > floor.per_request(floor.python)
