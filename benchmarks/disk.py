"""`python -m benchmarks.disk`: what one durable write costs on the disk of the audit files.

Every deactivation waits for one durable write before its PUT (contract §3), so the p50 limit
of `python -m benchmarks` (the floor + 0.5 ms) holds that write and everything else the gateway
does. What the write costs is the disk's, not the code's, and on this shared host it moves by
several times between hours. The harness calls `probe` before and after its paced phase and
reports both readings beside the targets.

Run alone, it times, in random turns in one directory, each way a log line can be made
durable (`WAYS`):

- ``append+fsync``: what the audit log does (`AuditLog`: `O_APPEND`, `write`, `fsync`);
- ``append+fdatasync``: an append changes the file's size, which `fdatasync` must make durable
  as well;
- ``overwrite+fdatasync``: a file written full of zeros and synced first, then overwritten in
  place (no size change, so no metadata to sync: how databases prepare their write-ahead logs);
- ``O_DSYNC overwrite``: the same, each `pwrite` durable on return;
- ``O_DIRECT+O_DSYNC 4 KiB``: a whole aligned block written past the page cache (where the file
  system allows `O_DIRECT`).

The last three would need a file that is not the audit's JSON Lines (a tail of zeros, or whole
blocks); they are timed to learn whether any durable write is cheaper here. Each time is the
wall clock around the calls that make the line durable, in this process, with nothing else
running in it. Bounded: at most `MAX_COUNT` writes a way, `MAX_GAP_S` apart.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import load

LINE_BYTES = 400  # about one audit record
BLOCK = 4096  # O_DIRECT's alignment on this file system
MAX_COUNT = 10_000
MAX_GAP_S = 0.1
PROBE_COUNT = 250  # the harness's reading: 250 writes 4 ms apart, about 1.2 s
PROBE_GAP_S = 0.004  # the audit's rhythm at 200 req/s over 2 workers (about 1 commit / 5 ms)


def _line(size: int) -> bytes:
    return b'{"probe":"' + b"x" * max(0, size - 13) + b'"}\n'


class _Way:
    """One way to make a line durable: `write()` returns the seconds it took, `close()`."""

    def __init__(self, directory: Path, name: str, count: int, line: bytes) -> None:
        self.name, self.line = name, line
        self.times: list[float] = []
        self._path = directory / (name.replace("+", "-").replace(" ", "-")
                                  + ".probe")
        self._offset = 0
        self._fd = -1
        self._count = count

    def open(self) -> None:
        raise NotImplementedError

    def write(self) -> float:
        raise NotImplementedError

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _prefilled(self, size: int, flags: int) -> int:
        """The file written full of zeros and synced, reopened with `flags`."""
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            zeros = b"\0" * (1 << 20)
            left = size
            while left > 0:
                left -= os.write(fd, zeros[:min(left, len(zeros))])
            os.fsync(fd)
        finally:
            os.close(fd)
        return os.open(self._path, os.O_RDWR | flags)


class _Append(_Way):
    def __init__(self, directory: Path, name: str, count: int, line: bytes,
                 sync: Callable[[int], None]) -> None:
        super().__init__(directory, name, count, line)
        self._sync = sync

    def open(self) -> None:
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC,
                           0o600)

    def write(self) -> float:
        started = time.perf_counter()
        os.write(self._fd, self.line)
        self._sync(self._fd)
        return time.perf_counter() - started


class _Overwrite(_Way):
    def __init__(self, directory: Path, name: str, count: int, line: bytes,
                 dsync: bool) -> None:
        super().__init__(directory, name, count, line)
        self._dsync = dsync

    def open(self) -> None:
        self._fd = self._prefilled(len(self.line) * (self._count + 1),
                                   os.O_DSYNC if self._dsync else 0)

    def write(self) -> float:
        started = time.perf_counter()
        os.pwrite(self._fd, self.line, self._offset)
        if not self._dsync:
            os.fdatasync(self._fd)
        self._offset += len(self.line)
        return time.perf_counter() - started


class _Direct(_Way):
    _block: mmap.mmap | None = None

    def open(self) -> None:
        self._fd = self._prefilled(BLOCK * (self._count + 1), os.O_DIRECT | os.O_DSYNC)
        block = self._block = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT needs
        block.write(self.line.ljust(BLOCK, b" "))

    def write(self) -> float:
        assert self._block is not None
        started = time.perf_counter()
        os.pwritev(self._fd, [self._block], self._offset)
        self._offset += BLOCK
        return time.perf_counter() - started

    def close(self) -> None:
        super().close()
        if self._block is not None:
            self._block.close()
            self._block = None


WAYS = ("append+fsync", "append+fdatasync", "overwrite+fdatasync", "O_DSYNC overwrite",
        "O_DIRECT+O_DSYNC 4 KiB")


def _make(name: str, directory: Path, count: int, line: bytes) -> _Way:
    if name == "append+fsync":
        return _Append(directory, name, count, line, os.fsync)
    if name == "append+fdatasync":
        return _Append(directory, name, count, line, os.fdatasync)
    if name == "overwrite+fdatasync":
        return _Overwrite(directory, name, count, line, dsync=False)
    if name == "O_DSYNC overwrite":
        return _Overwrite(directory, name, count, line, dsync=True)
    if name == "O_DIRECT+O_DSYNC 4 KiB":
        return _Direct(directory, name, count, line)
    raise ValueError(f"unknown way: {name}")


def summary(seconds: Sequence[float]) -> dict[str, Any]:
    """Count, p50, p90 and p99 in ms (nearest rank, `load.percentile`), and the mean."""
    if not seconds:
        return {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None}
    ms = [s * 1000 for s in seconds]
    return {"count": len(ms), **{f"p{q}_ms": round(load.percentile(ms, q), 3)
                                 for q in (50, 90, 99)},
            "mean_ms": round(statistics.fmean(ms), 3)}


def _bounded(count: int, gap_s: float) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be 1..{MAX_COUNT}")
    if not 0 <= gap_s <= MAX_GAP_S:
        raise ValueError(f"gap must be 0..{MAX_GAP_S} s")


def probe(directory: Path, *, count: int = PROBE_COUNT, gap_s: float = PROBE_GAP_S,
          line_bytes: int = LINE_BYTES) -> dict[str, Any]:
    """The harness's reading: `count` appends of a `line_bytes` line, each fsynced, `gap_s`
    apart, in a file of its own in `directory` (removed after)."""
    return ways(directory, ("append+fsync",), count=count, gap_s=gap_s,
                line_bytes=line_bytes)["append+fsync"]


def ways(directory: Path, names: Sequence[str] = WAYS, *, count: int = 1000,
         gap_s: float = PROBE_GAP_S, line_bytes: int = LINE_BYTES,
         rng: random.Random | None = None) -> dict[str, dict[str, Any]]:
    """Each way in `names` timed `count` times, the ways taking turns at random, `gap_s`
    apart. A way the file system refuses (`O_DIRECT` on some file systems) gets `{"refused": reason}`."""
    _bounded(count, gap_s)
    rng = rng or random.Random()
    line = _line(line_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="disk-", dir=directory) as name:
        here = Path(name)
        opened: list[_Way] = []
        out: dict[str, dict[str, Any]] = {}
        try:
            for way_name in names:
                way = _make(way_name, here, count, line)
                try:
                    way.open()
                except OSError as exc:
                    way.close()
                    out[way_name] = {"refused": f"{type(exc).__name__}: {exc.strerror or exc}"}
                    continue
                opened.append(way)
            turns = [way for way in opened for _ in range(count)]
            rng.shuffle(turns)
            for way in turns:
                way.times.append(way.write())
                if gap_s:
                    time.sleep(gap_s)
        finally:
            for way in opened:
                way.close()
        for way in opened:
            out[way.name] = summary(way.times)
        return {way_name: out[way_name] for way_name in names}


def report(results: dict[str, dict[str, Any]], *, count: int, gap_s: float,
           line_bytes: int, where: str) -> str:
    head = (f"One {line_bytes}-byte line made durable, {count} times a way, the ways in random "
            f"turns {gap_s * 1000:g} ms apart, in {where}:")
    lines = [head, "",
             "| way | p50 (ms) | p90 (ms) | p99 (ms) | mean (ms) |", "|---|---:|---:|---:|---:|"]
    for name, figures in results.items():
        if "refused" in figures:
            lines.append(f"| {name} | refused: {figures['refused']} | | | |")
            continue
        lines.append(f"| {name} | {figures['p50_ms']:.3f} | {figures['p90_ms']:.3f} | "
                     f"{figures['p99_ms']:.3f} | {figures['mean_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.disk",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("."),
                        help="a directory on the disk to time (default: the current one); "
                             "the probe's files are made in a temporary directory inside it")
    parser.add_argument("--count", type=int, default=1000, help=f"writes a way (1..{MAX_COUNT})")
    parser.add_argument("--gap-ms", type=float, default=PROBE_GAP_S * 1000,
                        help=f"pause between writes (0..{MAX_GAP_S * 1000:g} ms)")
    parser.add_argument("--way", action="append", choices=WAYS,
                        help="time only this way (repeatable; default: every way)")
    args = parser.parse_args(argv)
    gap_s = args.gap_ms / 1000
    try:
        _bounded(args.count, gap_s)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.dir.is_dir():
        parser.error(f"{args.dir}: not a directory")
    results = ways(args.dir, args.way or WAYS, count=args.count, gap_s=gap_s)
    sys.stdout.write(report(results, count=args.count, gap_s=gap_s, line_bytes=LINE_BYTES,
                            where=str(args.dir.resolve())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
