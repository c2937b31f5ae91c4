"""`python -m benchmarks.instructions`: CPU instructions per deactivation, counted, not timed.

Time on a shared virtual machine varies by ±15 % from one few-second window to the next; the
number of instructions a program executes for the same work does not (repeat runs agree within
about 0.3 %). This runs one process of the gateway (`serve --workers 1`, every feature on, the
config of `python -m benchmarks`) and one of the aiohttp floor under valgrind's callgrind, sends
the same deactivations to each through the same nginx stub, and counts the user-space
instructions each executes per request (system calls, which run in the kernel, are not in the
count: `python -m benchmarks` measures those, as CPU time). The floor with the contract's audit
I/O (`floor.py --audit-dir`) is counted too: the user-space part of the disk writes the contract
requires; and so is the contract minimum (`floor.py --contract-minimum`): every per-request
duty of the contract in its barest form. `--variant` adds gateway runs with one feature switched off by its config key, which
prices that feature; `--without` adds runs with parts that have no setting removed in the
counted process only (`benchmarks.without`: a price, not a way to run the gateway).
`--by-function N` shows where the gateway's instructions differ from the contract minimum's:
by kind of work (the eval loop, calls, lookups, allocation, C libraries) and by C function
(`benchmarks.callgrind`).

Needs valgrind (`apt-get install -y valgrind`) besides the benchmark's own needs; a run takes a
minute or two per variant (everything under callgrind runs about fifty times slower).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks import callgrind, peers, stubs, without
from benchmarks.harness import _static_jwt
from benchmarks.ports import free_port
from benchmarks.procs import Server, start, wait_status

READY_TIMEOUT_S = 300.0  # start-up under callgrind takes tens of seconds
BODY = b'{"userId":"u-1001","channel":"rtm"}'

# A feature switched off by config, to price it: (name, TOML text replaced, by what).
VARIANTS: dict[str, tuple[str, str, str]] = {
    "no-access-log": ("the access line (logging.level = warning)",
                      'level = "info"', 'level = "warning"'),
    "no-rate-limit": ("the rate limit (rate_limit.enabled = false)",
                      "enabled = true", "enabled = false"),
    "no-fsync": ("the audit's fsync (audit.fsync = false)", "fsync = true", "fsync = false"),
}


@dataclass
class Count:
    name: str
    requests: int
    instructions: int

    @property
    def per_request(self) -> float:
        return self.instructions / max(self.requests, 1)


def callgrind_total(dump: Path) -> int:
    """The `totals:` (or `summary:`) line of one callgrind output file."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError(f"{dump}: no totals line")


def dumped_total(directory: Path, prefix: str) -> int:
    """The instructions of the dumps requested with `callgrind_control -d` (not the one
    written at exit), summed over the processes that wrote them."""
    return sum(callgrind_total(dump) for dump in callgrind.counted_dumps(directory, prefix))


def _valgrind(directory: Path, prefix: str) -> list[str]:
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={directory}/callgrind-{prefix}.%p",
            "--dump-instr=no", "--quiet"]


async def _drive(url: str, headers: dict[str, str], count: int, concurrency: int) -> int:
    """`count` deactivations, `concurrency` at a time; the number answered 200."""
    ok = 0
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:
        async def one() -> None:
            nonlocal ok
            async with gate, session.post(url, data=BODY, headers=headers) as resp:
                await resp.read()
                ok += resp.status == 200

        await asyncio.gather(*(one() for _ in range(count)))
    return ok


def _control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], capture_output=True, timeout=60,
                   check=False)


async def _count(name: str, server: Server, ready_path: str, headers: dict[str, str],
                 args: argparse.Namespace, directory: Path, prefix: str) -> Count:
    try:
        await wait_status(server, ready_path, READY_TIMEOUT_S)
        url = server.url + f"/v1/bots/{peers.BOT}/sessions/deactivate"
        await _drive(url, headers, args.warmup, args.concurrency)
        _control("-z", server.proc.pid)  # counting starts here
        ok = await _drive(url, headers, args.requests, args.concurrency)
        _control("-d", server.proc.pid)
    finally:
        server.stop()
    if ok != args.requests:
        raise RuntimeError(f"{name}: {ok} of {args.requests} requests answered 200; "
                           f"see {server.log}")
    deadline = time.monotonic() + 30
    while True:  # the dump is written by the process itself, shortly after the request
        try:
            return Count(name, ok, dumped_total(directory, prefix))
        except ValueError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def gateway_argv(config: Path, parts: str = "") -> list[str]:
    """One in-process worker; with `parts` (`benchmarks.without`'s names, comma-separated),
    without them."""
    runner = ["benchmarks.without", parts] if parts else ["gateway"]
    return [sys.executable, "-m", *runner, "serve", "--config", str(config), "--workers", "1"]


async def measure(args: argparse.Namespace, directory: Path) -> list[Count]:
    creds = peers.Credentials("cs-instructions", secrets.token_urlsafe(32),
                              "kgw_" + secrets.token_hex(16))
    stub = stubs.start_stub(stubs.stub_kind("auto"), directory / "stub", creds.client_id,
                            creds.secret)
    counts: list[Count] = []
    try:
        await wait_status(stub, "/healthz", 20)
        caller = {"Content-Type": "application/json",
                  "Authorization": f"Bearer {creds.caller_key}"}
        plain = {"Content-Type": "application/json"}
        env = {**os.environ, "BENCH_FLOOR_AUTH": _static_jwt(creds),
               "BENCH_FLOOR_CALLER_KEY": creds.caller_key}
        for name, prefix, extra, headers in (
                ("aiohttp floor", "floor", [], plain),
                ("floor + audit I/O", "floor_audit",
                 ["--audit-dir", str(directory / "floor_audit")], plain),
                ("contract minimum", "floor_minimum",
                 ["--audit-dir", str(directory / "floor_minimum"), "--contract-minimum"],
                 caller)):
            port = free_port()
            if "--audit-dir" in extra:
                (directory / prefix).mkdir(exist_ok=True)
            floor = start(prefix, [*_valgrind(directory, prefix), sys.executable, "-m",
                                   "benchmarks.floor", "--listen", f"127.0.0.1:{port}",
                                   "--upstream", stub.url, "--workers", "1", *extra],
                          f"http://127.0.0.1:{port}", directory / f"{prefix}.log", env=env)
            counts.append(await _count(name, floor, "/healthz", headers, args, directory,
                                       prefix))
        # (name, file prefix, a config variant, parts removed)
        runs = [(variant, variant, variant, "") for variant in ["gateway", *args.variant]]
        runs += [(without.label(parts), f"without{number}", "gateway", parts)
                 for number, parts in enumerate(args.without)]
        for name, prefix, variant, parts in runs:
            config = peers.gateway_config(directory / prefix, stub.url, creds)
            if variant != "gateway":
                _, old, new = VARIANTS[variant]
                config.write_text(config.read_text().replace(old, new, 1))
            server = start(prefix, [*_valgrind(directory, prefix), *gateway_argv(config, parts)],
                           peers.listen_url(config), directory / f"{prefix}.log")
            counts.append(await _count(name, server, "/readyz", caller, args, directory,
                                       prefix))
    finally:
        stub.stop()
    return counts


def report(counts: Sequence[Count], args: argparse.Namespace) -> str:
    floor = counts[0].per_request
    gateway = next((c.per_request for c in counts if c.name == "gateway"), None)
    lines = [(f"Instructions per deactivation (callgrind, user space), one process each, "
              f"{args.requests} requests {args.concurrency} at a time after {args.warmup} "
              "to warm up:"), "",
             "| run | instructions per request | ÷ floor | feature's price |",
             "|---|---:|---:|---:|"]
    for c in counts:
        price = ""
        if c.name in VARIANTS and gateway is not None:
            price = f"{gateway - c.per_request:,.0f} ({VARIANTS[c.name][0]})"
        elif c.name.startswith("without ") and gateway is not None:
            what = "; ".join(without.PARTS[p][0]
                             for p in c.name.removeprefix("without ").split(" + "))
            price = f"{gateway - c.per_request:,.0f} ({what})"
        lines.append(f"| {c.name} | {c.per_request:,.0f} | {c.per_request / floor:.2f} | "
                     f"{price} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="counted requests")
    parser.add_argument("--warmup", type=int, default=100, help="requests before counting")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--variant", action="append", default=[], choices=sorted(VARIANTS),
                        help="also run the gateway with this feature off (repeatable)")
    parser.add_argument("--without", action="append", default=[], metavar="PART[,PART…]",
                        help="also run the gateway without these parts, removed in the counted "
                             f"process only (repeatable; one of {', '.join(without.PARTS)})")
    parser.add_argument("--by-function", type=int, default=0, metavar="N",
                        help="also show where the gateway's instructions differ from the "
                             "contract minimum's, by kind of work and the N C functions that "
                             "grew most (`benchmarks.callgrind`)")
    parser.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = parser.parse_args(argv)
    unknown = without.unknown(p for parts in args.without for p in parts.split(","))
    if unknown:
        parser.error(f"--without: unknown part(s) {', '.join(unknown)}")
    if not (1 <= args.requests <= 100_000 and 0 <= args.warmup <= 10_000
            and 1 <= args.concurrency <= 256 and 0 <= args.by_function <= 1000):
        parser.error("--requests 1..100000, --warmup 0..10000, --concurrency 1..256, "
                     "--by-function 0..1000")
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed: apt-get install -y valgrind", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="kgw-instructions-") as name:
        counts = asyncio.run(measure(args, Path(name)))
        text = report(counts, args)
        if args.by_function:
            text += "\n" + callgrind.report(
                callgrind.dumped_self_costs(Path(name), "floor_minimum"),
                callgrind.dumped_self_costs(Path(name), "gateway"), args.requests,
                args.by_function)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(
            {"requests": args.requests, "warmup": args.warmup, "concurrency": args.concurrency,
             "counts": [{"name": c.name, "per_request": round(c.per_request)} for c in counts]},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

