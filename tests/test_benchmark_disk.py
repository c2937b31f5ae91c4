"""`python -m benchmarks.disk`: what one durable write costs on the audit files' disk."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import disk, report

REPO = Path(__file__).resolve().parent.parent
DIRECT = "O_DIRECT+O_DSYNC 4 KiB"


def direct_refused(directory: Path) -> bool:
    """Whether the file system of `directory` refuses O_DIRECT (ext4 and tmpfs here take it)."""
    path = directory / "direct-check"
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return True
    finally:
        path.unlink(missing_ok=True)
    return False


def test_every_way_is_timed_in_turns_and_leaves_nothing_behind(tmp_path: Path) -> None:
    refused = direct_refused(tmp_path)
    results = disk.ways(tmp_path, count=5, gap_s=0, rng=random.Random(7))
    assert list(results) == list(disk.WAYS)
    for name, figures in results.items():
        if name == DIRECT and refused:
            assert "refused" in figures
            continue
        assert figures["count"] == 5, name
        assert 0 < figures["p50_ms"] <= figures["p90_ms"] <= figures["p99_ms"], name
    assert list(tmp_path.iterdir()) == []  # the probe's directory is removed


@pytest.mark.parametrize("name", disk.WAYS)
def test_each_way_writes_its_lines_where_it_says(tmp_path: Path, name: str) -> None:
    if name == DIRECT and direct_refused(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    line = disk._line(100)
    assert len(line) == 100 and line.endswith(b"\n")
    way = disk._make(name, tmp_path, 3, line)
    way.open()
    try:
        seconds = [way.write() for _ in range(3)]
    finally:
        way.close()
    assert all(s > 0 for s in seconds)
    data = next(tmp_path.iterdir()).read_bytes()
    if name.startswith("append"):
        assert data == line * 3  # appended: the file is the lines, nothing else
    elif name.startswith("O_DIRECT"):
        block = line.ljust(disk.BLOCK, b" ")
        assert data[:3 * disk.BLOCK] == block * 3  # whole blocks, in place
        assert data[3 * disk.BLOCK:] == b"\0" * disk.BLOCK
    else:  # overwritten in place: the zeros written first are left after the lines
        assert data == line * 3 + b"\0" * len(line)


def test_a_way_the_file_system_refuses_is_reported_and_the_rest_still_timed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: disk._Way) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(disk._Direct, "open", refuse)  # as a file system without O_DIRECT
    results = disk.ways(tmp_path, count=2, gap_s=0)
    assert results[DIRECT] == {"refused": "OSError: Invalid argument"}
    assert results["append+fsync"]["count"] == 2
    text = disk.report(results, count=2, gap_s=0, line_bytes=400, where="here")
    assert "| O_DIRECT+O_DSYNC 4 KiB | refused: OSError: Invalid argument | | | |" in text


def test_the_harness_reading_is_the_audit_logs_own_way(tmp_path: Path) -> None:
    figures = disk.probe(tmp_path, count=4, gap_s=0.001)
    assert figures["count"] == 4 and figures["p50_ms"] > 0


def test_the_percentiles_are_nearest_rank() -> None:
    figures = disk.summary([i / 1000 for i in range(1, 101)])  # 1 … 100 ms
    assert (figures["p50_ms"], figures["p90_ms"], figures["p99_ms"]) == (50.0, 90.0, 99.0)
    assert disk.summary([])["p50_ms"] is None


def test_every_loop_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="count"):
        disk.ways(tmp_path, count=0)
    with pytest.raises(ValueError, match="count"):
        disk.ways(tmp_path, count=disk.MAX_COUNT + 1)
    with pytest.raises(ValueError, match="gap"):
        disk.ways(tmp_path, count=1, gap_s=1.0)


def test_the_command_prints_every_way_and_refuses_bad_bounds(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.disk", "--dir", str(tmp_path),
                           "--count", "3", "--gap-ms", "0"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    for name in disk.WAYS:
        assert f"| {name} | " in done.stdout
    bad = subprocess.run([sys.executable, "-m", "benchmarks.disk", "--dir", str(tmp_path),
                          "--count", "0"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=False)
    assert bad.returncode == 2 and "count must be" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "benchmarks.disk", "--dir",
                              str(tmp_path / "no")], cwd=REPO, capture_output=True, text=True,
                             timeout=60, check=False)
    assert missing.returncode == 2 and "not a directory" in missing.stderr


def test_the_run_report_carries_the_disk_reading() -> None:
    probed = {"before_paced": {"count": 250, "p50_ms": 0.65, "p99_ms": 1.9},
              "after_paced": {"count": 250, "p50_ms": 1.1, "p99_ms": 2.0},
              "gap_ms": 4.0, "line_bytes": 400}
    note = report._disk_note(probed)
    assert note == (" The audit files' disk alone (`benchmarks.disk`: a 400-byte append and its "
                    "fsync, 250 times 4 ms apart): p50 0.650 / p99 1.900 ms before the paced "
                    "phase, 1.100 / 2.000 ms after it.")
    assert report._disk_note(None) == ""  # a run from before the reading
