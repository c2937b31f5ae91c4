"""`serve --workers 2` supervised, as a real subprocess in front of the real sandbox: a worker
SIGKILLed under load is replaced while the port keeps answering, the new worker serves within
2 s and continues its predecessor's audit chain; a worker that keeps dying at start stops the
whole process with a clear error."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BOT, CALLER_KEY, base_settings, merge, read_records, write_config
from tests.integration.served import Served, fresh
from tests.integration.test_metrics_endpoint import parse, sample

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="SO_REUSEPORT and signals")
WORKERS = 2
CONCURRENCY = 6
MAX_CALLS = 4000  # bounds of the load, whatever happens
MAX_LOAD_S = 40.0
SERVING_WITHIN_S = 2.0
KORE_GATEWAY = Path(sys.executable).parent / "kore-gateway"
AUTH = {"Authorization": f"Bearer {CALLER_KEY}"}


def worker_file(audit: Path, n: int) -> Path:
    return audit.with_name(f"{audit.stem}-w{n}{audit.suffix}")


def wall(record: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(record["ts"]).timestamp()


class Load:
    """Deactivations on fresh connections, CONCURRENCY at a time, until stopped or bounded;
    each result is (wall-clock start, status or None when the connection was cut)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[float, int | None]] = []
        self._stop = asyncio.Event()
        self._sent = 0

    async def run(self) -> None:
        await asyncio.gather(*(self._lane() for _ in range(CONCURRENCY)))

    async def _lane(self) -> None:
        deadline = time.monotonic() + MAX_LOAD_S
        while not self._stop.is_set() and self._sent < MAX_CALLS and time.monotonic() < deadline:
            self._sent += 1
            started = time.time()
            status, _ = await fresh("POST", f"{self.url}/v1/bots/{BOT}/sessions/deactivate",
                                    json={"userId": f"u-{self._sent}"}, headers=AUTH)
            self.results.append((started, status))

    def stop(self) -> None:
        self._stop.set()


async def audit_verify(path: Path) -> tuple[int | None, str]:
    """`kore-gateway audit verify PATH`, the command an operator runs."""
    proc = await asyncio.create_subprocess_exec(
        str(KORE_GATEWAY), "audit", "verify", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode()


async def wait_until(check: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_sigkilled_worker_is_replaced_under_load(sandbox: Any, tmp_path: Path) -> None:
    sandbox.faults.latency_ms = 5
    settings = merge(base_settings(tmp_path, sandbox.url), {
        "server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"},
        "rate_limit": {"enabled": False},
        "logging": {"format": "json", "file": str(tmp_path / "log" / "gateway.jsonl")}})
    audit = Path(settings["audit"]["path"])
    served = Served(write_config(tmp_path, settings), tmp_path / "gateway.log", WORKERS)
    try:
        lines = await served.listening()
        victim = next(line for line in lines if line["worker"] == 1)
        api, admin = f"http://{victim['listen']}", f"http://{victim['admin_listen']}"
        load = Load(api)
        running = asyncio.create_task(load.run())
        victim_file = worker_file(audit, 1)
        await wait_until(lambda: len(read_records(victim_file)) >= 40, 20, "the victim serving")

        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.time()
        await served.listening(WORKERS + 1, timeout_s=20)
        await wait_until(lambda: any(wall(r) > killed_at for r in read_records(victim_file)),
                         20, "the new worker's first record")
        first_new = min(wall(r) for r in read_records(victim_file) if wall(r) > killed_at)
        await asyncio.sleep(1.0)  # more load on both workers after the restart
        load.stop()
        await asyncio.wait_for(running, timeout=60)
        status, text = await fresh("GET", f"{admin}/metrics")
    finally:
        code = served.stop()
        served.kill_group()

    assert code == 0, served.text()[-3000:]
    assert first_new - killed_at < SERVING_WITHIN_S, first_new - killed_at
    assert status == 200 and sample(parse(text), "kgw_worker_restarts_total") == 1, text
    # The port kept answering: only calls the killed worker held were cut, or sent to it in
    # the moment before the kernel closed its socket (a caller whose call was cut may send
    # its next one into that moment too); every call started a moment after the kill got
    # its 200.
    cut = [s for s in load.results if s[1] is None]
    assert len(cut) <= 2 * CONCURRENCY, cut
    assert all(started <= killed_at + 0.2 for started, _ in cut), (killed_at, cut)
    later = [status for started, status in load.results if started > killed_at + 0.2]
    assert later and set(later) == {200}, sorted(set(later), key=str)
    assert {s for _, s in load.results} <= {200, None}
    [died] = served.events("worker.died")
    assert (died["worker"], died["pid"], died["cause"]) == (1, victim["pid"], "SIGKILL")
    [restarted] = served.events("worker.restarted")
    assert restarted["worker"] == 1 and restarted["pid"] != victim["pid"]
    assert len(served.events("gateway.stopped")) == WORKERS  # SIGTERM drained both
    for n in range(WORKERS):
        code, out = await audit_verify(worker_file(audit, n))
        assert code == 0, out
    # logging.file: the supervisor's lines in the file itself, each worker's in its own, the
    # replacement appending to its predecessor's.
    logs = {p.name: read_records(p) for p in (tmp_path / "log").iterdir()}
    assert set(logs) == {"gateway.jsonl", "gateway-w0.jsonl", "gateway-w1.jsonl"}
    assert {"worker.died", "worker.restarted"} <= {e["event"] for e in logs["gateway.jsonl"]}
    assert [e["pid"] for e in logs["gateway-w1.jsonl"] if e["event"] == "gateway.listening"] \
        == [victim["pid"], restarted["pid"]]
    seqs = [r["seq"] for r in read_records(victim_file)]
    assert seqs == list(range(1, len(seqs) + 1))  # one chain across both processes
    before = [r for r in read_records(victim_file) if wall(r) <= killed_at]
    assert before and len(before) < len(seqs)


async def test_worker_dying_at_start_stops_serve_with_a_clear_error(sandbox: Any,
                                                                    tmp_path: Path) -> None:
    """Worker 1's audit file is unusable (a directory in its place): it fails at every start,
    and after the sixth failure within 60 s serve drains worker 0 and exits non-zero."""
    settings = merge(base_settings(tmp_path, sandbox.url), {
        "server": {"listen": "127.0.0.1:0"}, "logging": {"format": "json"}})
    audit = Path(settings["audit"]["path"])
    worker_file(audit, 1).mkdir(parents=True)
    served = Served(write_config(tmp_path, settings), tmp_path / "gateway.log", WORKERS)
    started = time.monotonic()
    try:
        code = served.proc.wait(timeout=60)
    finally:
        served.kill_group()
    took = time.monotonic() - started
    text = served.text()
    assert code == 2, text[-3000:]  # the failing worker's own code: a configuration error
    assert "serve: worker 1 died 6 times within 60 s (last: exit code 2); stopping every " \
           "worker" in text
    assert text.count("audit.path: audit log") == 6  # the cause, once per attempt
    assert [e["worker"] for e in served.events("worker.died")] == [1] * 5
    assert [e["restart_in_s"] for e in served.events("worker.died")] == [0.1, 0.2, 0.4, 0.8,
                                                                         1.6]
    assert took >= 3.0  # the backoffs were waited out, no tight loop
    [stopped] = served.events("gateway.stopped")
    assert stopped["worker"] == 0  # the healthy worker was drained, not killed
