"""`python -m benchmarks.compare --base DIR`: this checkout's gateway against another's, in turns.

A harness run (`python -m benchmarks`) times five targets one after the other over about four
minutes. On this shared machine the host's load moves more between two such runs than a small
change of code does, so two runs do not price a change. This serves two gateways at once, this
checkout's and `--base`'s (another checkout of the project, e.g. `git worktree add /tmp/base
HEAD~1`), each with the harness's configuration (every feature on), through one stub, and
takes turns: every round times both, the base first in even rounds and second in odd ones, so
the host's load falls on both alike. Printed: each round's figures, and for each figure the
median over the rounds and the median of the rounds' ratios (this ÷ base) or differences
(this − base):

- saturation (wrk, `--connections`, `--saturation-s` a round): answers a second, and CPU time
  of the whole process tree per deactivation;
- a paced `--rate` for `--latency-s` a round (the harness's open-loop client): p50 and p99;
  with `--together`, both gateways are paced at once, their requests interleaved half a period
  apart, so drift of the host's load within a round falls on both alike too;
- the audit records per group commit at saturation (from each gateway's /metrics).

Both audit logs are verified at the end. Bounded: at most 20 rounds of at most 30 s a phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import load, peers, stubs
from benchmarks.harness import audit_summary, per_commit, scrape
from benchmarks.procs import Server, start, wait_status

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
WARMUP_S = 2.0
NAMES = ("base", "this")
# The base's gateway: its checkout first on the path, then `python -m gateway`'s arguments.
BOOT = ("import runpy, sys; root = sys.argv.pop(1); sys.path.insert(0, root); "
        "runpy.run_module('gateway', run_name='__main__', alter_sys=True)")


@dataclass
class Side:
    """One gateway's figures, a value per round."""
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    per_commit: list[float] = field(default_factory=list)  # audit records, at saturation
    failed: int = 0


FIGURES = (("rps", "saturation throughput (req/s)", "ratio"),
           ("cpu_us", "CPU time per deactivation (µs)", "ratio"),
           ("p50_ms", "paced p50 (ms)", "difference"),
           ("p99_ms", "paced p99 (ms)", "difference"),
           ("per_commit", "audit records per group commit at saturation", "ratio"))
DIGITS = {"rps": 0, "cpu_us": 1, "p50_ms": 3, "p99_ms": 3, "per_commit": 1}  # of a round


def launch(name: str, root: Path, directory: Path, stub_url: str, creds: peers.Credentials,
           workers: int) -> Server:
    """`kore-gateway serve` from the checkout at `root`, with the harness's configuration."""
    config = peers.gateway_config(directory, stub_url, creds)
    argv = [sys.executable, "-c", BOOT, str(root), "serve", "--config", str(config),
            "--workers", str(workers)]
    return start(name, argv, peers.listen_url(config), directory / "gateway.log")


def order(round_index: int) -> tuple[str, ...]:
    """Who goes first in a round: the base in even rounds, this checkout in odd ones."""
    return NAMES if round_index % 2 == 0 else NAMES[::-1]


def paired(base: Sequence[float], this: Sequence[float], how: str) -> float:
    """The median over the rounds of this ÷ base (`ratio`) or this − base (`difference`)."""
    if how == "ratio":
        return statistics.median(t / b for b, t in zip(base, this, strict=True) if b)
    return statistics.median(t - b for b, t in zip(base, this, strict=True))


def report(sides: dict[str, Side], settings: dict[str, Any]) -> str:
    heading = (f"this checkout ({REPO}) against --base ({settings['base']}), "
               f"{settings['workers']} worker(s) each, {settings['rounds']} rounds taking "
               f"turns: wrk -c{settings['connections']} {settings['saturation_s']:g} s and "
               f"{settings['rate']:g} req/s for {settings['latency_s']:g} s a round each")
    lines = [heading, "",
             "| figure | base (median) | this (median) | this vs base, median of the rounds |",
             "|---|---:|---:|---:|"]
    base, this = sides["base"], sides["this"]
    for key, label, how in FIGURES:
        b, t = getattr(base, key), getattr(this, key)
        value = paired(b, t, how)
        shown = f"× {value:.3f}" if how == "ratio" else f"{value:+.3f}"
        lines.append(f"| {label} | {statistics.median(b):,.3f} | {statistics.median(t):,.3f} "
                     f"| {shown} |")
    lines += ["", "Each round (base / this): req/s, CPU µs, p50 ms, p99 ms, records a commit"]
    for i in range(len(base.rps)):
        first = "base first" if order(i)[0] == "base" else "this first"
        lines.append(
            f"  round {i + 1} ({first}): " + "   ".join(
                f"{getattr(base, key)[i]:,.{DIGITS[key]}f} / {getattr(this, key)[i]:,.{DIGITS[key]}f}"
                for key, _, _ in FIGURES))
    lines.append(f"failed paced requests: base {base.failed}, this {this.failed}")
    return "\n".join(lines) + "\n"


def audit_ok(directory: Path) -> dict[str, Any]:
    """Each worker's chain, verified over its rotated files and its current one."""
    summary = audit_summary(directory / "audit")
    return {key: summary[key] for key in ("files", "records", "chains_ok")}


async def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    creds = peers.Credentials("cs-compare", secrets.token_urlsafe(32),
                              "kgw_" + secrets.token_hex(16))
    stub = stubs.start_stub(stubs.stub_kind("auto"), directory / "stub", creds.client_id,
                            creds.secret)
    servers: dict[str, Server] = {}
    try:
        await wait_status(stub, "/healthz", READY_TIMEOUT_S)
        for name, root in (("base", args.base), ("this", REPO)):
            servers[name] = launch(name, root, directory / name, stub.url, creds, args.workers)
        for server in servers.values():
            await wait_status(server, "/readyz", READY_TIMEOUT_S)
        request = peers.deactivation(creds.caller_key)
        script = load.wrk_script(request, directory / "deactivate.lua")
        for server in servers.values():  # connection pools, the first JWT, the page cache
            load.run_wrk(server.url + request.path, script, connections=args.connections,
                         duration_s=WARMUP_S)
        sides = {name: Side() for name in NAMES}
        for i in range(args.rounds):
            for name in order(i):
                server, side = servers[name], sides[name]
                scraped, before = await scrape(server), server.cpu()
                result = load.run_wrk(server.url + request.path, script,
                                      connections=args.connections,
                                      duration_s=args.saturation_s)
                spent = server.cpu() - before
                side.per_commit.append(per_commit(scraped, await scrape(server)) or 0.0)
                if result.ok == 0:
                    raise RuntimeError(f"{name}: no answer at saturation; see {server.log}")
                side.rps.append(result.ok / max(1, math.ceil(args.saturation_s)))  # (wrk's)
                side.cpu_us.append(spent / result.ok * 1e6)
            if args.together:  # both at once, their requests half a period apart
                timed = await asyncio.gather(*(
                    _paced(servers[name], request, args, offset_s=k / (2 * args.rate))
                    for k, name in enumerate(order(i))))
                results = dict(zip(order(i), timed, strict=True))
            else:
                results = {name: await _paced(servers[name], request, args)
                           for name in order(i)}
            for name, paced in results.items():
                side = sides[name]
                side.p50_ms.append(load.percentile(paced.latencies_ms, 50))
                side.p99_ms.append(load.percentile(paced.latencies_ms, 99))
                side.failed += paced.failed
    finally:
        for server in servers.values():
            server.stop()
        stub.stop()
    return {"sides": sides, "audit": {name: audit_ok(directory / name) for name in NAMES}}


async def _paced(server: Server, request: load.Request, args: argparse.Namespace, *,
                 offset_s: float = 0.0) -> load.PacedResult:
    await asyncio.sleep(offset_s)
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return await load.paced(host, int(port), request, rate=args.rate, duration_s=args.latency_s)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True,
                        help="another checkout of the project (its gateway/ is served)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--saturation-s", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--latency-s", type=float, default=5.0)
    parser.add_argument("--together", action="store_true",
                        help="pace both gateways at once, each at --rate, their requests "
                             "interleaved (the host's drift then falls on both alike)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not (1 <= args.rounds <= 20 and 1 <= args.workers <= 8
            and 1 <= args.connections <= 512 and 1 <= args.saturation_s <= 30
            and 1 <= args.rate <= 2000 and 1 <= args.latency_s <= 30):
        parser.error("--rounds 1..20, --workers 1..8, --connections 1..512, "
                     "--saturation-s 1..30, --rate 1..2000, --latency-s 1..30")
    if not (args.base / "gateway" / "__main__.py").is_file():
        parser.error(f"--base {args.base}: not a checkout of the project (no gateway/)")
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    args.base = args.base.resolve()
    with tempfile.TemporaryDirectory(prefix="kgw-compare-") as name:
        measured = asyncio.run(measure(args, Path(name)))
    settings = {key: (str(value) if isinstance(value, Path) else value)
                for key, value in vars(args).items() if key != "json"}
    text = report(measured["sides"], settings)
    audit = measured["audit"]
    text += "audit: " + ", ".join(
        f"{name} {a['records']} records in {a['files']} file(s), chains "
        f"{'intact' if a['chains_ok'] else 'BROKEN'}" for name, a in audit.items()) + "\n"
    print(text, end="")
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"settings": settings, "audit": audit,
             "rounds": {name: vars(side) for name, side in measured["sides"].items()}},
            indent=2) + "\n")
    return 0 if all(a["chains_ok"] for a in audit.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
