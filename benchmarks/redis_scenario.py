"""Scenario: several gateway replicas share Kore.ai's per-bot budgets through one Redis.

One `redis-server`, the sandbox enforcing Kore.ai's per-bot limits (scaled down to 60 calls per
6 s) and three `kore-gateway serve` processes run on loopback; a bulk job of 6,000
deactivations over 10 bots is spread round-robin over the three gateways. It passes with zero
upstream 429s and a completion time within 10 % of the minimum the limits allow.

    python -m benchmarks.redis_scenario [--quick] [--out docs/benchmarks/redis-scenario.json]

Self-contained (needs only `redis-server` on PATH); `tests/integration/test_redis_replicas.py`
runs a seconds-long version of it and reuses `RedisServer` and `Cluster`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp

from benchmarks.ports import free_port
from gateway.audit.log import verify_files
from gateway.auth import hash_key

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "redis-scenario.json"
CLIENT_ID = "cs-redis-scenario"
CLIENT_SECRET = "redis-scenario-secret-loopback-only"
CALLER_KEY = "kgw_redis_scenario_loopback_only"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Scenario:
    gateways: int = 3
    bots: int = 10
    deactivations: int = 6000
    calls: int = 60  # Kore.ai's per-bot window, scaled down: `calls` per `per_s`
    per_s: float = 6.0
    concurrency: int = 200  # the bulk job's requests in flight, over all gateways
    timeout_s: float = 30.0  # the gateways' upstream.timeout_s: a call may wait for its slot
    local_fallback_fraction: float = 0.25
    max_run_s: float = 180.0  # the job is abandoned past this

    def minimum_s(self) -> float:
        """Each bot's calls at the rate its limit allows: `calls` per `per_s`, evenly."""
        return math.ceil(self.deactivations / self.bots) * self.per_s / self.calls

    def burst_bound_s(self) -> float:
        """When the last call could start if each window's whole budget left in one instant."""
        per_bot = math.ceil(self.deactivations / self.bots)
        return (math.ceil(per_bot / self.calls) - 1) * self.per_s


QUICK = Scenario(bots=4, deactivations=160, calls=20, per_s=2.0, concurrency=40,
                 timeout_s=10.0, max_run_s=30.0)


def redis_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    """A throw-away `redis-server` on a loopback port: no persistence, killable, restartable."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}; see "
                                   f"{self.workdir / 'redis.log'}")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: every key is lost, as with a crashed Redis without persistence."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.proc = None


def gateway_toml(s: Scenario, port: int, sandbox_url: str, audit: Path) -> str:
    return f"""
[server]
listen = "127.0.0.1:{port}"
max_in_flight = {max(1000, s.concurrency)}
[upstream]
base_url = "{sandbox_url}"
allow_insecure_http = true
timeout_s = {s.timeout_s}
[audit]
path = "{audit}"
[rate_limit]
backend = "redis"
redis_url_env = "SCENARIO_REDIS_URL"
windows = [{{ calls = {s.calls}, per_s = {s.per_s} }}]
local_fallback_fraction = {s.local_fallback_fraction}
[logging]
level = "warning"
format = "json"
[[apps]]
name = "sessions"
client_id = "{CLIENT_ID}"
client_secret_env = "SCENARIO_CLIENT_SECRET"
[[callers]]
name = "bulk-job"
key_sha256 = "{hash_key(CALLER_KEY)}"
"""


class Processes:
    """The `python -m gateway …` processes of a scenario (sandbox first, then the gateways):
    each logs to `workdir/<name>.log`, and all are stopped together."""

    client_secret = CLIENT_SECRET  # the app's secret, given to the sandbox and the gateways

    def __init__(self, workdir: Path, redis: RedisServer | None) -> None:
        self.workdir, self.redis = workdir, redis
        self.sandbox_url = ""
        self.gateway_urls: list[str] = []
        self.audit_paths: list[Path] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, args: Sequence[str], name: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "SCENARIO_CLIENT_SECRET": self.client_secret}
        if self.redis is not None:
            env["SCENARIO_REDIS_URL"] = self.redis.url
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        with open(self.workdir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", *args], cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        self._procs.append(proc)
        return proc

    def _start_gateway(self, n: int, audit_name: str,
                       toml: Callable[[int, Path], str]) -> Coroutine[Any, Any, None]:
        """Gateway `n` on a free port with `toml(port, audit_path)`; waits for its /readyz."""
        port = free_port()
        config = self.workdir / f"gateway-{n}.toml"
        self.audit_paths.append(self.workdir / "audit" / audit_name)
        config.write_text(toml(port, self.audit_paths[-1]))
        proc = self._spawn(["serve", "--config", str(config)], f"gateway-{n}")
        self.gateway_urls.append(f"http://127.0.0.1:{port}")
        return wait_status(self.gateway_urls[-1] + "/readyz", proc)

    async def _stop_all(self) -> list[int | None]:
        """SIGTERM to every process, a kill past `STOP_TIMEOUT_S`; the gateways' exit codes."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self._procs:
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.kill()
        return [p.returncode for p in self._procs[1:]]


class Cluster(Processes):
    """Redis, the rate-limited sandbox and `gateways` replicas, started and stopped together."""

    redis: RedisServer

    def __init__(self, scenario: Scenario, workdir: Path, redis: str) -> None:
        super().__init__(workdir, RedisServer(redis, workdir / "redis"))
        self.scenario = scenario
        self.gateway_exit_codes: list[int | None] = []

    async def __aenter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            await self._start()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _start(self) -> None:
        s = self.scenario
        self.redis.start()
        port = free_port()
        self.sandbox_url = f"http://127.0.0.1:{port}"
        sandbox = self._spawn(["sandbox", "--listen", f"127.0.0.1:{port}", "--client-id",
                               CLIENT_ID, "--client-secret-env", "SCENARIO_CLIENT_SECRET",
                               "--limit", f"{s.calls}/{s.per_s}"], "sandbox")
        waits = [wait_status(self.sandbox_url + "/healthz", sandbox)]
        for n in range(s.gateways):
            waits.append(self._start_gateway(
                n, f"replica-{n}.jsonl",
                lambda port, audit: gateway_toml(s, port, self.sandbox_url, audit)))
        await asyncio.gather(*waits)

    async def __aexit__(self, *_: object) -> None:
        self.gateway_exit_codes = await self._stop_all()

    async def readiness(self, url: str) -> tuple[int, dict[str, Any]]:
        async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as resp:
            return resp.status, await resp.json()

    async def sandbox_get(self, route: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as s, \
                s.get(self.sandbox_url + route) as resp:
            return await resp.json()


async def wait_status(url: str, proc: subprocess.Popen[bytes], status: int = 200) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with s.get(url) as resp:
                    if resp.status == status:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer {status} within {START_TIMEOUT_S} s")


@dataclass
class JobResult:
    started: float = 0.0
    finished: float = 0.0
    succeeded: int = 0
    failed: int = 0
    deferred: int = 0  # the gateway's own 429 (nothing sent upstream), retried after Retry-After
    statuses: dict[str, int] | None = None
    latencies_s: list[float] | None = None


async def run_job(urls: Sequence[str], s: Scenario) -> JobResult:
    """The bulk job: item i closes user u-i of bot i % bots through gateway i % gateways."""
    result = JobResult(statuses={}, latencies_s=[])
    todo = iter(range(s.deactivations))
    headers = {"Authorization": f"Bearer {CALLER_KEY}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in todo:
            url = f"{urls[i % len(urls)]}/v1/bots/st-bulk-{i % s.bots}/sessions/deactivate"
            status = await one(session, url, {"userId": f"u-{i}"})
            assert result.statuses is not None
            result.statuses[str(status)] = result.statuses.get(str(status), 0) + 1
            if status == 200:
                result.succeeded += 1
            else:
                result.failed += 1

    async def one(session: aiohttp.ClientSession, url: str, body: dict[str, str]) -> int:
        while True:
            started = time.monotonic()
            try:
                async with session.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    assert result.latencies_s is not None
                    result.latencies_s.append(time.monotonic() - started)
                    if resp.status != 429:
                        return resp.status
                    result.deferred += 1
                    await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
            except aiohttp.ClientError:
                return 0

    connector = aiohttp.TCPConnector(limit=s.concurrency)
    timeout = aiohttp.ClientTimeout(total=s.timeout_s + 10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        result.started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(worker(session) for _ in range(s.concurrency))),
                               s.max_run_s)
        result.finished = time.monotonic()
    return result


def max_in_window(times: Sequence[float], per_s: float) -> int:
    """The most calls any span of `per_s` seconds holds, as the sandbox counts them."""
    ordered, most, first = sorted(times), 0, 0
    for last, at in enumerate(ordered):
        while ordered[first] <= at - per_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def run_scenario(s: Scenario, workdir: Path | None = None) -> dict[str, Any]:
    """Runs the scenario once; returns its figures and the verdict."""
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="kore-redis-scenario-")) if workdir is None else workdir
    try:
        async with Cluster(s, workdir, binary) as cluster:
            job = await run_job(cluster.gateway_urls, s)
            stats = await cluster.sandbox_get("/__sandbox/stats")
            calls = await cluster.sandbox_get("/__sandbox/calls")
            keys = _count_keys(cluster.redis.port)
        chains_ok = all(verify_files([p]).ok for p in cluster.audit_paths)
        return figures(s, job, stats, calls, keys, chains_ok, cluster.gateway_exit_codes)
    finally:
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def _count_keys(port: int) -> int:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
    try:
        return sum(1 for _ in client.scan_iter(match="kore-gateway:rl:*", count=1000))
    finally:
        client.close()


def figures(s: Scenario, job: JobResult, stats: dict[str, Any], calls: list[dict[str, Any]],
            keys: int, chains_ok: bool, exit_codes: list[int | None]) -> dict[str, Any]:
    completion = job.finished - job.started
    minimum = s.minimum_s()
    by_bot: dict[str, list[float]] = {}
    for call in calls:
        if call["status"] == 200:
            by_bot.setdefault(call["bot_id"], []).append(call["at"])
    busiest = max((max_in_window(t, s.per_s) for t in by_bot.values()), default=0)
    latencies = job.latencies_s or []
    out = {
        "scenario": asdict(s),
        "completion_s": round(completion, 3),
        "minimum_s": minimum,
        "completion_over_minimum": round(completion / minimum, 4) if minimum else None,
        "burst_bound_s": s.burst_bound_s(),
        "succeeded": job.succeeded,
        "failed": job.failed,
        "caller_statuses": job.statuses,
        "gateway_deferrals_429": job.deferred,
        "upstream_calls": stats["total"],
        "upstream_429": stats["upstream_429"],
        "upstream_by_status": stats["by_status"],
        "max_upstream_calls_per_bot_in_any_window": busiest,
        "latency_s": {"p50": round(percentile(latencies, 0.5), 4),
                      "p99": round(percentile(latencies, 0.99), 4),
                      "max": round(max(latencies, default=0.0), 4)},
        "redis_keys": keys,
        "audit_chains_ok": chains_ok,
        "gateway_exit_codes": exit_codes,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    out["checks"] = verdict(s, out)
    return out


def verdict(s: Scenario, f: dict[str, Any]) -> dict[str, bool]:
    return {
        "zero_upstream_429": f["upstream_429"] == 0,
        "every_deactivation_succeeded": f["succeeded"] == s.deactivations,
        "no_window_exceeded": f["max_upstream_calls_per_bot_in_any_window"] <= s.calls,
        "within_10_percent_of_minimum": f["completion_s"] <= 1.10 * f["minimum_s"],
        "audit_chains_verify": f["audit_chains_ok"],
        "gateways_exit_0": all(code == 0 for code in f["gateway_exit_codes"]),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_scenario",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long run (4 bots, 20 per 2 s)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"write the figures here (default {DEFAULT_OUT.relative_to(REPO)}; "
                        "--quick writes nowhere unless given)")
    args = parser.parse_args(argv)
    scenario = QUICK if args.quick else Scenario()
    result = asyncio.run(run_scenario(scenario))
    text = json.dumps(result, indent=2)
    print(text)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
