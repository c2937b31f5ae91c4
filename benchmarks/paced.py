"""`python -m benchmarks.paced`: the harness's paced phase alone, with the contract minimum
both without and with the gateway's two kept behaviours.

At a paced 200 req/s, p50 is the target the gateway misses in most harness runs. The contract
minimum (`benchmarks.floor --contract-minimum`) is the least any gateway bound by the contract
spends on a deactivation. The gateway also keeps two behaviours the contract does not ask for:
the audit file's path looked at before each write, and the terminal record in the file before
the answer. `--kept-behaviours` adds those two, in their cheapest form, to the minimum itself,
where none of the gateway's other code runs. What that target shows over the floor is the best
any gateway with those two behaviours could show in the same run: a lower bound for the
gateway's.

The harness's conditions: the same stub, `--workers` workers each, and each target warmed up
first by `--warmup-s` of wrk at the harness's 64 connections (if wrk is installed; else one
paced second). Then `--rounds` rounds of `--seconds` paced at `--rate`, the targets in turns, as
the harness's paced phase runs them. Printed: each target's p50 and p99 over every round, and
the same over the floor, against the issue's limits (p50 ≤ floor + 0.5 ms, p99 ≤ floor +
1.5 ms). `--json FILE` also writes the figures. The exit status is 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import load, peers, stubs
from benchmarks.procs import Server, wait_status

START_TIMEOUT_S = 20.0
CONNECTIONS = 64  # the harness's wrk connections
TARGETS = ("floor", "minimum", "minimum_kept", "gateway")
NAMES = {"floor": "aiohttp floor", "minimum": "contract minimum",
         "minimum_kept": "contract minimum + kept behaviours", "gateway": "gateway"}
P50_LIMIT_MS, P99_LIMIT_MS = 0.5, 1.5


async def start_all(directory: Path, workers: int, stub_url: str, creds: peers.Credentials,
                    static_jwt: str) -> dict[str, Server]:
    """The four targets, started one after another (each ready before the next starts)."""
    servers: dict[str, Server] = {}
    try:
        for name in TARGETS:
            if name == "gateway":
                server = peers.start_gateway(directory / name, workers, stub_url, creds)
                ready = "/readyz"
            else:
                server = peers.start_floor(
                    directory / name, workers, stub_url, static_jwt,
                    contract_minimum=name != "floor", caller_key=creds.caller_key,
                    kept=name == "minimum_kept")
                ready = "/healthz"
            servers[name] = server
            await wait_status(server, ready, START_TIMEOUT_S)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def request_for(name: str, creds: peers.Credentials) -> load.Request:
    """The harness's deactivation: keyed for the targets that check a key."""
    return peers.deactivation(None if name == "floor" else creds.caller_key)


async def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    from benchmarks.harness import _static_jwt

    creds = peers.Credentials("cs-paced-" + secrets.token_hex(4), secrets.token_urlsafe(32),
                              "kgw_paced_" + secrets.token_urlsafe(24))
    stub = stubs.start_stub(stubs.stub_kind("auto"), directory / "stub", creds.client_id,
                            creds.secret)
    servers: dict[str, Server] = {}
    try:
        await wait_status(stub, "/healthz", START_TIMEOUT_S)
        servers = await start_all(directory, args.workers, stub.url, creds, _static_jwt(creds))
        requests = {name: request_for(name, creds) for name in TARGETS}
        use_wrk = shutil.which("wrk") is not None and args.warmup_s > 0
        for name in TARGETS:  # warm-up: connection pools, the first JWT, the page cache
            if use_wrk:
                script = load.wrk_script(requests[name], directory / f"{name}.lua")
                load.run_wrk(servers[name].url + requests[name].path, script,
                             connections=CONNECTIONS, duration_s=args.warmup_s)
            else:
                await _paced(servers[name], requests[name], args.rate, 1.0)
        samples: dict[str, list[float]] = {name: [] for name in TARGETS}
        failed = dict.fromkeys(TARGETS, 0)
        for _ in range(args.rounds):
            for name in TARGETS:
                result = await _paced(servers[name], requests[name], args.rate, args.seconds)
                samples[name] += result.latencies_ms
                failed[name] += result.failed
    finally:
        for server in servers.values():
            server.stop()
        stub.stop()
    return figures(samples, failed, args)


async def _paced(server: Server, request: load.Request, rate: float, seconds: float
                 ) -> load.PacedResult:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return await load.paced(host, int(port), request, rate=rate, duration_s=seconds)


def figures(samples: dict[str, list[float]], failed: dict[str, int],
            args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"settings": {"workers": args.workers, "rate": args.rate,
                                        "seconds": args.seconds, "rounds": args.rounds,
                                        "warmup_s": args.warmup_s}}
    floor = load.summary(samples["floor"])
    for name in TARGETS:
        summary = load.summary(samples[name])
        summary["failed"] = failed[name]
        if name != "floor":
            summary["over_floor_p50_ms"] = round(summary["p50_ms"] - floor["p50_ms"], 3)
            summary["over_floor_p99_ms"] = round(summary["p99_ms"] - floor["p99_ms"], 3)
        out[name] = summary
    return out


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    rounds = f"{s['rounds']} round{'s' if s['rounds'] != 1 else ''}"
    workers = f"{s['workers']} worker{'s' if s['workers'] != 1 else ''}"
    head = (f"Paced {s['rate']:g} req/s, {rounds} of {s['seconds']:g} s a target in turns, "
            f"{workers} each:")
    columns = ("| target | p50 (ms) | p99 (ms) | p50 over floor (limit +0.5) | "
               "p99 over floor (limit +1.5) | failed |")
    lines = [head, "", columns, "|---|---:|---:|---:|---:|---:|"]
    for name in TARGETS:
        row = result[name]
        if name == "floor":
            over = "– | –"
        else:
            p50, p99 = row["over_floor_p50_ms"], row["over_floor_p99_ms"]
            over = (f"{p50:+.3f} {'met' if p50 <= P50_LIMIT_MS else 'missed'} | "
                    f"{p99:+.3f} {'met' if p99 <= P99_LIMIT_MS else 'missed'}")
        lines.append(f"| {NAMES[name]} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | {over} | "
                     f"{row['failed']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paced",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="a round of one target")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-s", type=float, default=2.0,
                        help="wrk a target before its rounds (0: one paced second)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not (1 <= args.workers <= 16 and 1 <= args.rate <= 2000 and 0.5 <= args.seconds <= 60
            and 1 <= args.rounds <= 20 and 0 <= args.warmup_s <= 30):
        parser.error("--workers 1..16, --rate 1..2000, --seconds 0.5..60, --rounds 1..20, "
                     "--warmup-s 0..30")
    with tempfile.TemporaryDirectory(prefix="kgw-paced-") as name:
        result = asyncio.run(measure(args, Path(name)))
    print(report(result), end="")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    failed = sum(result[name]["failed"] for name in TARGETS)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
