"""Processes under test: start and stop them, and read their CPU time and memory from /proc.

CPU time is `utime + stime` (fields 14 and 15 of `/proc/<pid>/stat`) summed over a server's
whole process tree (master or supervisor and every worker), so one figure covers nginx and the
gateway alike, whatever their process model.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import aiohttp

REPO = Path(__file__).resolve().parent.parent  # cwd of every child: `python -m gateway` finds it
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
STOP_TIMEOUT_S = 10.0


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of `pids`, in seconds (processes that are gone count 0)."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError):
        return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Server:
    """One started program: its process, where it listens, its log."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    started: float  # time.monotonic() just before the process was started

    def tree(self) -> list[int]:
        return descendants(self.proc.pid)

    def workers(self) -> list[int]:
        """The processes that serve requests (not a master/supervisor or helper)."""
        below = [pid for pid in self.tree() if pid != self.proc.pid]
        serving = [pid for pid in below if "resource_tracker" not in cmdline(pid)]
        return serving or [self.proc.pid]

    def cpu(self) -> float:
        return cpu_seconds(self.tree())

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for pid in reversed(self.tree()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        return self.proc.returncode


def start(name: str, argv: Sequence[str], url: str, log: Path,
          env: dict[str, str] | None = None) -> Server:
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                                start_new_session=True)
    return Server(name, proc, url, log, started)


async def wait_status(server: Server, path: str, timeout_s: float, status: int = 200) -> float:
    """Polls `path` until it answers `status`; returns seconds since the process started."""
    deadline = time.monotonic() + timeout_s
    timeout = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}; "
                                   f"see {server.log}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(server.url + path) as resp:
                    if resp.status == status:
                        return time.monotonic() - server.started
            await asyncio.sleep(0.005)
    raise RuntimeError(f"{server.name}: {path} did not answer {status} within {timeout_s} s; "
                       f"see {server.log}")


@dataclass
class RssSampler:
    """Samples the RSS of some processes in a thread; keeps each one's peak."""

    pids: Sequence[int]
    every_s: float = 0.2
    peak: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        for pid in self.pids:
            self.peak[pid] = max(self.peak.get(pid, 0), rss_bytes(pid))
