"""`python -m benchmarks --smoke`: the whole harness end to end in seconds, so it cannot rot.

Real nginx (stub and peer), the real gateway with two workers, wrk and the paced client, with
a tiny load; the figures are not judged here (a CI machine is too noisy for that), only that
every one of them was measured and every request answered."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.report import README_BEGIN, README_END, TARGETS, compare, update_readme

REPO = Path(__file__).resolve().parent.parent
MISSING = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None
           and not Path(f"/usr/sbin/{tool}").exists()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if MISSING:
        reason = (f"{' and '.join(MISSING)} not installed (apt-get install -y nginx wrk; "
                  ".ci/run installs them)")
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs them: a skip there would hide a rotting harness
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results: dict[str, Any] = json.loads((out / "latest.json").read_text())
    results["_out"] = str(out)
    results["_stdout"] = done.stdout
    return results


def test_every_figure_is_measured(smoke: dict[str, Any]) -> None:
    r = smoke
    sat = r["saturation"]
    for name in ("gateway", "floor", "floor_audit", "floor_minimum", "nginx"):
        assert sat[name]["ok"] > 0 and sat[name]["errors"]["status"] == 0, name
        assert r["cpu_us_per_request"][name] > 0, name
    for key in ("ratio_floor", "ratio_nginx"):
        assert r["cpu_us_per_request"][key] > 0 and sat[key] > 0
    for target in ("direct", "nginx", "floor", "floor_audit", "floor_minimum", "gateway"):
        latency = r["latency_200"][target]
        assert isinstance(latency, dict)
        assert latency["samples"] > 0 and latency["failed"] == 0 and latency["p99_ms"] > 0
    assert isinstance(r["latency_200"]["over_floor_p50_ms"], float)
    assert len(r["rss_mib"]["gateway_workers"]) == 2
    assert len(r["rss_mib"]["floor_workers"]) == 2
    assert 0 < r["ready_s"]["gateway_first"] <= r["ready_s"]["gateway_all_workers"]
    assert r["ready_s"]["floor"] > 0 and r["ready_s"]["floor_audit"] > 0
    assert r["ready_s"]["floor_minimum"] > 0
    assert r["jwt"]["mints"] >= 1 and r["jwt"]["over_allowed"] == 0
    assert r["jwt"]["mints_from_metrics"] == r["jwt"]["mints"]  # logs and /metrics agree
    assert r["audit"]["records_per_commit_saturation"] >= 1
    assert r["settings"]["stub"] == "nginx" and r["settings"]["peer"] is True


def test_the_audit_disk_is_timed_around_the_paced_phase(smoke: dict[str, Any]) -> None:
    """The disk's own fsync, the part of the p50 limit no code takes back, in every run."""
    probed = smoke["disk"]
    for phase in ("before_paced", "after_paced"):
        figures = probed[phase]
        assert figures["count"] == 20  # --smoke's reading
        assert 0 < figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"]
    assert "The audit files' disk alone" in smoke["_stdout"]


def test_targets_are_judged_against_the_floor_of_the_same_run(smoke: dict[str, Any]) -> None:
    by_key = {t["key"]: t for t in smoke["targets"]}
    cpu = smoke["cpu_us_per_request"]
    assert by_key["cpu_ratio_floor"]["value"] == cpu["ratio_floor"]
    assert abs(cpu["ratio_floor"] - cpu["gateway"] / cpu["floor"]) < 0.01
    lat = smoke["latency_200"]
    assert abs(lat["over_floor_p50_ms"]
               - (lat["gateway"]["p50_ms"] - lat["floor"]["p50_ms"])) < 0.002
    assert all(t["met"] in (True, False) for t in smoke["targets"])


@pytest.mark.parametrize(("peer", "column"), [("floor_audit", "contract_io"),
                                              ("floor_minimum", "contract_minimum")])
def test_the_contracts_peers_are_measured_on_each_timed_targets_scale(
        smoke: dict[str, Any], peer: str, column: str) -> None:
    """The floor with the contract's audit I/O, and the contract minimum (every duty, barest):
    their figures are shown beside each timed target, computed against the same run's floor."""
    cpu, sat, lat = smoke["cpu_us_per_request"], smoke["saturation"], smoke["latency_200"]
    by_key = {t["key"]: t[column] for t in smoke["targets"]}
    assert by_key["cpu_ratio_floor"] == cpu[f"{peer}_ratio_floor"]
    assert abs(cpu[f"{peer}_ratio_floor"] - cpu[peer] / cpu["floor"]) < 0.01
    assert by_key["throughput_ratio_floor"] == sat[f"{peer}_ratio_floor"]
    assert abs(by_key["over_floor_p50_ms"]
               - (lat[peer]["p50_ms"] - lat["floor"]["p50_ms"])) < 0.002
    assert by_key["over_floor_p99_ms"] == lat[f"{peer}_over_floor_p99_ms"]
    assert by_key["rss_mib_max"] is None


def test_the_contracts_peers_really_wrote_their_records(smoke: dict[str, Any]) -> None:
    """Two records a deactivation each; the contract minimum's chains verify."""
    sat, lat, audit = smoke["saturation"], smoke["latency_200"], smoke["audit"]
    written = audit["contract_io"]
    answered = sat["floor_audit"]["ok"] + lat["floor_audit"]["samples"]
    assert written["files"] == 2 and written["records"] >= 2 * answered
    answered = sat["floor_minimum"]["ok"] + lat["floor_minimum"]["samples"]
    assert audit["minimum_chains_ok"] is True and audit["minimum_records"] >= 2 * answered


def test_gateway_shut_down_cleanly_with_intact_audit_chains(smoke: dict[str, Any]) -> None:
    audit, codes = smoke["audit"], smoke["exit_codes"]
    assert codes["gateway"] == 0
    assert audit["chains_ok"] is True and audit["files"] == 2 and audit["records"] > 0


def test_writes_json_table_and_plot(smoke: dict[str, Any]) -> None:
    out = Path(smoke["_out"])
    table = (out / "latest.md").read_text()
    assert "| CPU time per deactivation (µs) |" in table
    assert "| gateway | aiohttp floor | floor + audit I/O | contract minimum | nginx |" in table
    assert "| the contract's audit I/O alone | the contract minimum | verdict |" in table
    assert table.count("| met |") + table.count("| **missed** |") == len(TARGETS)
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| saturation throughput" in smoke["_stdout"]


def test_readme_block_is_replaced_between_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{README_BEGIN}\nold\n{README_END}\n\n## Next\n")
    assert update_readme(readme, "| new table |\n", "docs/benchmarks/latest.png")
    text = readme.read_text()
    assert "old" not in text and "| new table |" in text and text.endswith("## Next\n")
    assert "![benchmark](docs/benchmarks/latest.png)" in text
    bare = tmp_path / "BARE.md"
    bare.write_text("# no block\n")
    assert not update_readme(bare, "t", "i") and bare.read_text() == "# no block\n"


def test_compare_puts_before_and_after_side_by_side() -> None:
    before = {"label": "baseline", "saturation": {"gateway": {"rps": 100.0}}}
    after = {"label": "latest", "saturation": {"gateway": {"rps": 250.0}}}
    table = compare(before, after)
    assert "| saturation throughput, gateway (req/s) | 100 | 250 |" in table
    assert "| CPU ratio gateway ÷ floor | – | – |" in table


def test_profile_charges_each_sample_to_the_nearest_known_part() -> None:
    from benchmarks.profile import parse_collapsed, report

    stacks = [
        # a write in aiohttp's shared writer, under the client: the client's
        ("process 1:x;run (gateway/http/loop.py:27);KoreClient._send (gateway/kore/client.py:250);"
        "ClientRequest.send (aiohttp/client_reqrep.py:1);"
        "StreamWriter._writelines (aiohttp/http_writer.py:106) 3"),
        # JSON under the audit log: the audit log's
        "process 1:x;AuditLog._chain (gateway/audit/log.py:1);canonical (gateway/jsoncodec.py:1) 2",
        "process 2:x;Runner.run (asyncio/runners.py:86) 1",
        "not a sample line",
    ]
    profile = parse_collapsed(line + "\n" for line in stacks)
    assert profile.samples == 6
    assert profile.by_category == {"aiohttp client": 3, "audit log": 2,
                                   "event loop (uvloop, in C: epoll, sockets, callbacks)": 1}
    assert profile.own["StreamWriter._writelines (aiohttp/http_writer.py:106)"] == 3
    text = report(profile, requests=100, cpu_s=0.06, wall_s=1.0, top=3)
    assert "|  50.0% |  300.0 | aiohttp client |" in text


def test_instruction_counts_are_read_from_the_requested_dumps_only(tmp_path: Path) -> None:
    """`benchmarks.instructions`: the dumps asked for with `callgrind_control -d` are summed
    over the processes; the one written at exit (start-up and shutdown in it) is not."""
    from benchmarks.instructions import dumped_total

    def dump(name: str, trigger: str, total: int) -> None:
        (tmp_path / name).write_text(f"# callgrind format\nversion: 1\ndesc: Trigger: {trigger}\n"
                                     f"events: Ir\nsummary: {total}\n\ntotals: {total}\n")

    dump("callgrind-gateway.41", "Program termination", 9_000_000)
    dump("callgrind-gateway.41.1", "Client Request: dump", 1_200_000)
    dump("callgrind-gateway.42.1", "Client Request: dump", 34_000)
    dump("callgrind-floor.43.1", "Client Request: dump", 700_000)
    assert dumped_total(tmp_path, "gateway") == 1_234_000
    assert dumped_total(tmp_path, "floor") == 700_000


async def test_floor_audit_io_writes_durably_and_fails_its_waiters_rather_than_hang(
        tmp_path: Path) -> None:
    """The floor + audit I/O: a line awaited is in the file; a write that fails fails the
    requests waiting on it (a 500 the harness counts), it never leaves them hanging."""
    import asyncio
    import errno

    from benchmarks.floor import AuditIO

    audit = AuditIO(str(tmp_path / "audit.jsonl"))
    audit.later(b"first\n")
    await asyncio.wait_for(audit.durable(b"second\n"), 5)
    assert (tmp_path / "audit.jsonl").read_bytes() == b"first\nsecond\n"
    os.close(audit.fd)  # every write from now on fails (EBADF)
    with pytest.raises(OSError) as failed:
        await asyncio.wait_for(audit.durable(b"third\n"), 5)
    assert failed.value.errno == errno.EBADF  # the write's own error, not a timeout
    audit.fd = os.open(tmp_path / "spare", os.O_WRONLY | os.O_CREAT)  # for close() to close
    audit.close()
    assert not audit.thread.is_alive()
