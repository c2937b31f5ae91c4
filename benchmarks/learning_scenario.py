"""Scenario: the gateway's limit is ten times Kore.ai's real one, and it learns the real one.

The sandbox enforces Kore.ai's documented `kore-bot-sessions` limits (60 per 60 s + 1,800 per
3,600 s, as sliding logs) and answers a refused call as Kore.ai documents it: its message, no
`Retry-After`. The gateways are configured with the default `[rate_limit]` windows (600 per
60 s + 18,000 per 3,600 s). Every window, and `backoff_s`, is scaled down by the same factor
(`--scale`, default 0.1: 60 per 6 s against 600 per 6 s) to keep the run short. 300
deactivations for one bot go out at once, each waiting in the gateway for its slot; the run is
done once with one gateway process (memory backend) and once with three replicas sharing Redis.

    python -m benchmarks.learning_scenario [--quick] [--out docs/benchmarks/learning-scenario.json]

Targets: at most 10 upstream 429s for the bot in all, and completion within 1.10 times the
minimum Kore.ai's real limit allows (its sliding log lets 60 calls go at once, so 300 calls need
four whole windows: 24 s at the default scale). Needs `redis-server` on PATH for the replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Self

import aiohttp

from benchmarks.ports import free_port
from benchmarks.redis_scenario import (
    Processes,
    RedisServer,
    max_in_window,
    redis_binary,
    wait_status,
)
from gateway.audit.log import verify_files
from gateway.auth import hash_key

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "benchmarks" / "learning-scenario.json"
CLIENT_ID = "cs-learning-scenario"
CLIENT_SECRET = "learning-scenario-secret-loopback-only"
CALLER_KEY = "kgw_learning_scenario_loopback_only"
BOT = "st-learning-0"
PRESET = "kore-bot-sessions"  # the sandbox's limit: 60 / 60 s + 1,800 / 3,600 s
REAL_CALLS, REAL_WINDOW_S = 60, 60.0
CONFIGURED = ((600, 60.0), (18000, 3600.0))  # the gateway's default [rate_limit] windows
BACKOFF_S = 5.0  # rate_limit.backoff_s default
MAX_429 = 10
MAX_RATIO = 1.10


@dataclass(frozen=True)
class Run:
    name: str
    gateways: int = 1
    backend: str = "memory"
    deactivations: int = 300
    scale: float = 0.1  # every window and backoff_s times this
    timeout_s: float = 90.0  # upstream.timeout_s: every call may wait for its slot
    max_run_s: float = 150.0
    backoff_s: float | None = None  # rate_limit.backoff_s; default: BACKOFF_S * scale

    @property
    def window_s(self) -> float:
        return REAL_WINDOW_S * self.scale

    def minimum_s(self) -> float:
        """The sliding log's own minimum: `REAL_CALLS` at once, once per window."""
        return (math.ceil(self.deactivations / REAL_CALLS) - 1) * self.window_s

    def even_s(self) -> float:
        """The same calls evenly spaced at the real rate (Kore.ai's advice), for comparison."""
        return (self.deactivations - 1) * self.window_s / REAL_CALLS


RUNS = (Run("1 process, memory backend"),
        Run("3 replicas, Redis backend", gateways=3, backend="redis"))
QUICK = tuple(replace(r, deactivations=90, timeout_s=30.0, max_run_s=40.0) for r in RUNS)


def gateway_toml(run: Run, port: int, sandbox_url: str, audit: Path) -> str:
    windows = ", ".join(f"{{ calls = {c}, per_s = {p * run.scale:g} }}" for c, p in CONFIGURED)
    redis = 'redis_url_env = "SCENARIO_REDIS_URL"\n' if run.backend == "redis" else ""
    return f"""
[server]
listen = "127.0.0.1:{port}"
max_in_flight = {max(1000, run.deactivations)}
[upstream]
base_url = "{sandbox_url}"
allow_insecure_http = true
timeout_s = {run.timeout_s}
[audit]
path = "{audit}"
[rate_limit]
backend = "{run.backend}"
{redis}windows = [{windows}]
backoff_s = {BACKOFF_S * run.scale if run.backoff_s is None else run.backoff_s:g}
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


class Stack(Processes):
    """The limited sandbox, `gateways` gateway processes, and Redis when they share it."""

    client_secret = CLIENT_SECRET

    def __init__(self, run: Run, workdir: Path, redis: str | None) -> None:
        super().__init__(workdir, RedisServer(redis, workdir / "redis") if redis else None)
        self.run = run
        self.exit_codes: list[int | None] = []

    async def __aenter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            await self._start()
        except RuntimeError as exc:
            await self.__aexit__()
            raise RuntimeError(f"{exc}\n{self.logs()}") from None
        except BaseException:
            await self.__aexit__()
            raise
        return self

    def logs(self, tail: int = 2000) -> str:
        """The end of every process's log, for a start that failed."""
        return "\n".join(f"--- {path.name}:\n{path.read_text(errors='replace')[-tail:]}"
                         for path in sorted(self.workdir.glob("*.log")))

    async def _start(self) -> None:
        if self.redis is not None:
            self.redis.start()
        port = free_port()
        self.sandbox_url = f"http://127.0.0.1:{port}"
        sandbox = self._spawn(["sandbox", "--listen", f"127.0.0.1:{port}", "--client-id",
                               CLIENT_ID, "--client-secret-env", "SCENARIO_CLIENT_SECRET",
                               "--limits", PRESET, "--limit-scale", f"{self.run.scale:g}",
                               "--limit-answer", "kore"], "sandbox")
        waits = [wait_status(self.sandbox_url + "/healthz", sandbox)]
        for n in range(self.run.gateways):
            waits.append(self._start_gateway(
                n, f"gateway-{n}.jsonl",
                lambda port, audit: gateway_toml(self.run, port, self.sandbox_url, audit)))
        await asyncio.gather(*waits)

    async def __aexit__(self, *_: object) -> None:
        self.exit_codes = await self._stop_all()

    async def get(self, url: str) -> Any:
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s,
                    s.get(url) as resp):
            return await resp.json() if resp.content_type == "application/json" else (
                await resp.text())

    async def put_json(self, url: str, body: dict[str, Any]) -> None:
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s,
                    s.put(url, json=body) as resp):
            resp.raise_for_status()


@dataclass
class Job:
    started: float = 0.0
    finished: float = 0.0
    statuses: dict[str, int] | None = None
    deferred: int = 0  # the gateway's own 429 (nothing sent upstream), retried after Retry-After
    slowest_s: float = 0.0


async def run_job(urls: Sequence[str], run: Run) -> Job:
    """Every deactivation at once, round-robin over the gateways, each waiting for its slot."""
    job = Job(statuses={})
    headers = {"Authorization": f"Bearer {CALLER_KEY}"}

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        url = f"{urls[i % len(urls)]}/v1/bots/{BOT}/sessions/deactivate"
        status = 0
        while True:
            asked = time.monotonic()
            try:
                async with session.post(url, json={"userId": f"u-{i}"}, headers=headers) as r:
                    await r.read()
                    status = r.status
                    job.slowest_s = max(job.slowest_s, time.monotonic() - asked)
                    if status != 429:
                        break
                    job.deferred += 1
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            except aiohttp.ClientError:
                status = 0
                break
        assert job.statuses is not None
        job.statuses[str(status)] = job.statuses.get(str(status), 0) + 1

    connector = aiohttp.TCPConnector(limit=run.deactivations)
    timeout = aiohttp.ClientTimeout(total=run.timeout_s + 10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        job.started = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(*(one(session, i) for i in range(run.deactivations))), run.max_run_s)
        job.finished = time.monotonic()
    return job


LEARNED = re.compile(r'^kore_gateway_ratelimit_learned_budget\{bot="([^"]+)"\} (\S+)$', re.MULTILINE)
PAUSES = re.compile(r"^kore_gateway_ratelimit_pauses_total (\S+)$", re.MULTILINE)


async def run_once(run: Run, workdir: Path) -> dict[str, Any]:
    binary = redis_binary() if run.backend == "redis" else None
    if run.backend == "redis" and binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    async with Stack(run, workdir, binary) as stack:
        job = await run_job(stack.gateway_urls, run)
        stats = await stack.get(stack.sandbox_url + "/__sandbox/stats")
        calls = await stack.get(stack.sandbox_url + "/__sandbox/calls")
        metrics = [await stack.get(url + "/metrics") for url in stack.gateway_urls]
    chains_ok = all(verify_files([p]).ok for p in stack.audit_paths)
    return figures(run, job, stats, calls, metrics, chains_ok, stack.exit_codes)


def figures(run: Run, job: Job, stats: dict[str, Any], calls: list[dict[str, Any]],
            metrics: list[str], chains_ok: bool, exit_codes: list[int | None]) -> dict[str, Any]:
    completion = job.finished - job.started
    accepted = [c["at"] for c in calls if c["status"] == 200]
    budgets = sorted({float(v) for text in metrics for _, v in LEARNED.findall(text)})
    out: dict[str, Any] = {
        "run": asdict(run),
        "window_s": run.window_s,
        "completion_s": round(completion, 3),
        "minimum_s": run.minimum_s(),
        "completion_over_minimum": round(completion / run.minimum_s(), 4),
        "even_pace_s": round(run.even_s(), 3),
        "caller_statuses": job.statuses,
        "gateway_deferrals_429": job.deferred,
        "slowest_call_s": round(job.slowest_s, 3),
        "upstream_calls": stats["total"],
        "upstream_429": stats["upstream_429"],
        "upstream_by_status": stats["by_status"],
        "max_accepted_in_any_window": max_in_window(accepted, run.window_s),
        "learned_budgets_seen": budgets,
        "pauses_total": sum(float(m) for text in metrics for m in PAUSES.findall(text)),
        "audit_chains_ok": chains_ok,
        "gateway_exit_codes": exit_codes,
    }
    out["checks"] = {
        "at_most_10_upstream_429": out["upstream_429"] <= MAX_429,
        "every_deactivation_succeeded": job.statuses == {"200": run.deactivations},
        "within_1_10_of_minimum": completion <= MAX_RATIO * run.minimum_s(),
        "audit_chains_verify": chains_ok,
        "gateways_exit_0": all(code == 0 for code in exit_codes),
    }
    return out


async def run_all(runs: Sequence[Run], workdir: Path | None = None) -> dict[str, Any]:
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="kore-learning-")) if workdir is None else workdir
    try:
        results = []
        for n, run in enumerate(runs):
            results.append(await run_once(run, workdir / f"run-{n}"))
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "scenario": __doc__.split("\n\n")[0].strip() if __doc__ else "",
        "sandbox": {"preset": PRESET, "answer": "Kore.ai's message, no Retry-After"},
        "configured": [list(w) for w in CONFIGURED],
        "runs": results,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_average": os.getloadavg()},
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def markdown(result: dict[str, Any]) -> str:
    rows = [("| run | upstream 429s | completion (s) | minimum (s) | ratio | callers' statuses |"
            " learned budget | checks |"), "|---|---:|---:|---:|---:|---|---|---|"]
    for r in result["runs"]:
        ok = "all pass" if all(r["checks"].values()) else ", ".join(
            k for k, v in r["checks"].items() if not v) + " FAILED"
        rows.append(f"| {r['run']['name']} | {r['upstream_429']} | {r['completion_s']} | "
                    f"{r['minimum_s']:g} | {r['completion_over_minimum']} | "
                    f"{r['caller_statuses']} | {r['learned_budgets_seen']} | {ok} |")
    scale = result["runs"][0]["run"]["scale"]
    return "\n".join([
        "# Learning Kore.ai's real limit (`python -m benchmarks.learning_scenario`)", "",
        (f"Run {result['date']} on {result['machine']['cpus']} CPUs (load average "
        f"{', '.join(f'{x:.2f}' for x in result['machine']['load_average'])})."), "",
        (f"The sandbox enforces `{PRESET}` (60 / 60 s + 1,800 / 3,600 s) and answers Kore.ai's "
        "message without `Retry-After`; the gateways are configured with the default windows "
        "(600 / 60 s + 18,000 / 3,600 s), ten times too high. **Every window and `backoff_s` "
        f"is scaled by {scale:g}** (60 per {60 * scale:g} s against 600 per {60 * scale:g} s) "
        "to keep the run short. 300 deactivations for one bot go out at once. The minimum is "
        "what Kore.ai's sliding log allows (60 at once, once per window)."), "",
        *rows, ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning_scenario",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="90 calls instead of 300")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"write the figures here, and the table beside them (default "
                        f"{DEFAULT_OUT.relative_to(REPO)}; --quick writes nowhere unless given)")
    args = parser.parse_args(argv)
    result = asyncio.run(run_all(QUICK if args.quick else RUNS))
    print(json.dumps(result, indent=2))
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    return 0 if all(all(r["checks"].values()) for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
