"""Load generators: wrk for saturation, and a paced open-loop client for latency at a fixed rate.

wrk (closed loop, `-c` connections kept busy) finds the saturation throughput; its Lua script
sets method, body and headers and prints its summary as one JSON line. Latency at a fixed rate
comes from `paced()`: requests leave on a fixed schedule (open loop, whatever the answers do)
over kept-alive connections, written byte for byte, each timed from its write to the last byte
of its answer with `time.perf_counter_ns`.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WRK_MARK = "BENCH_JSON "
INSTALL_HINT = "apt-get install -y wrk nginx"

_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\\n',
    "{mark}", summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class Request:
    """One HTTP request, the same every time."""

    method: str
    path: str
    body: bytes
    headers: Mapping[str, str]

    def raw(self, host: str) -> bytes:
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}",
                 f"Content-Length: {len(self.body)}"]
        lines += [f"{name}: {value}" for name, value in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def wrk_script(request: Request, path: Path) -> Path:
    lines = [f"wrk.method = {lua_string(request.method)}",
             f"wrk.body = {lua_string(request.body.decode())}"]
    lines += [f"wrk.headers[{lua_string(k)}] = {lua_string(v)}"
              for k, v in request.headers.items()]
    path.write_text("\n".join(lines) + _DONE.replace("{mark}", WRK_MARK))
    return path


@dataclass(frozen=True)
class WrkResult:
    requests: int  # answers received
    ok: int  # answers with a 2xx/3xx status
    errors: dict[str, int]
    duration_s: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0


def require_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit(f"wrk is not installed: {INSTALL_HINT}")
    return found


def run_wrk(url: str, script: Path, *, connections: int, duration_s: float,
            threads: int = 1) -> WrkResult:
    seconds = max(1, math.ceil(duration_s))  # wrk takes whole seconds only
    argv = [require_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
            "--timeout", "5s", "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                          check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(WRK_MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(line[len(WRK_MARK):])
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout")}
    return WrkResult(requests=raw["requests"], ok=raw["requests"] - raw["status"],
                     errors=errors, duration_s=raw["duration_us"] / 1e6,
                     p50_ms=raw["p50_us"] / 1000, p99_ms=raw["p99_us"] / 1000)


# --- paced open-loop client ------------------------------------------------------------------

class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection; answers are read by Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    def send(self, data: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        status = _complete_answer(self._buffer)
        if status is not None and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(status)


def _complete_answer(buffer: bytearray) -> int | None:
    """The status once a whole answer is in `buffer` (which is then consumed), else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    length = 0
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
        elif name.strip().lower() == "transfer-encoding":
            raise RuntimeError("chunked answers are not supported by the paced client")
    if len(buffer) < end + 4 + length:
        return None
    del buffer[:end + 4 + length]
    return int(head[0].split()[1])


@dataclass
class PacedResult:
    rate: float
    sent: int = 0
    ok: int = 0
    failed: int = 0
    late_ms_max: float = 0.0  # how far behind its schedule the generator ever fell
    latencies_ms: list[float] = field(default_factory=list)


async def paced(host: str, port: int, request: Request, *, rate: float, duration_s: float,
                connections: int = 8) -> PacedResult:
    """Sends `rate` requests per second for `duration_s`, open loop; times each answer."""
    loop = asyncio.get_running_loop()
    data = request.raw(f"{host}:{port}")
    idle: deque[_Connection] = deque()
    for _ in range(connections):
        idle.append((await loop.create_connection(_Connection, host, port))[1])
    result = PacedResult(rate=rate)
    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    for i in range(int(rate * duration_s)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        result.late_ms_max = max(result.late_ms_max, -delay * 1000)
        conn = idle.popleft() if idle else (await loop.create_connection(
            _Connection, host, port))[1]
        tasks.append(asyncio.create_task(_one(conn, data, idle, result)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return result


async def _one(conn: _Connection, data: bytes, idle: deque[_Connection],
               result: PacedResult) -> None:
    result.sent += 1
    began = time.perf_counter_ns()
    try:
        status = await conn.send(data)
    except ConnectionError:
        result.failed += 1
        return
    result.latencies_ms.append((time.perf_counter_ns() - began) / 1e6)
    if 200 <= status < 300:
        result.ok += 1
    else:
        result.failed += 1
    if not conn.closed:
        idle.append(conn)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {"samples": len(values), "p50_ms": round(percentile(values, 50), 3),
            "p99_ms": round(percentile(values, 99), 3)}
