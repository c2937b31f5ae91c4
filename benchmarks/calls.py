"""`python -m benchmarks.calls`: function calls per deactivation, counted by cProfile.

A paced deactivation runs each piece of the request path once, minutes of other work apart,
with cold caches: `python -m benchmarks.stages` shows the same code taking several times as long
there as in a loop. On that path a target's latency grows with how much code it runs, which
`python -m benchmarks.instructions` counts as instructions; this counts it as calls, which say
whose code it is. One process each (one worker) of the aiohttp floor, the contract minimum and
the gateway (every feature on, the config of `python -m benchmarks`) is served under Python's
deterministic profiler, warmed up, and then counts the same deactivations through the same stub.
Printed per deactivation: the calls of Python functions and of built-ins (C functions such as
`len` or `dict.get`; a coroutine resumed counts again), by the package whose code is called,
and the gateway's own functions with the most calls.

The profiler runs only in the event loop's thread (the audit thread's calls are not counted)
and slows every call alike: the counts are exact, the times are not reported.

`--syscalls` also counts the system calls of the counted deactivations, every thread of the
process (strace `-f -c` attached for the counted requests only; needs `apt-get install -y
strace`): on the paced path a system call costs several microseconds, and some, such as
`getpid`, come from Python code that does not look like it makes one.

`--opcodes` counts, instead of calls, the bytecode instructions Python executes per deactivation
in each function, in every thread (the audit thread's too), with a tracer in place of the
profiler (`sys.settrace` with `f_trace_opcodes`): how much Python a request runs, and where,
repeatable for the same code and requests (the order in which concurrent requests interleave
aside). A count, not a cost: built-ins run in C uncounted, and a loop replaced by them can run
fewer bytecode instructions and more machine instructions (`python -m benchmarks.instructions`
counts those; docs/benchmarks/README.md has three such cases).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import os
import pstats
import runpy
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from benchmarks import peers, stubs
from benchmarks.harness import _static_jwt
from benchmarks.instructions import _drive
from benchmarks.procs import Server, start, wait_status

READY_TIMEOUT_S = 60.0
DUMP_TIMEOUT_S = 30.0
STRACE_ATTACH_S = 1.0  # strace's attaching to every thread, before the counted requests
TARGETS = ("aiohttp floor", "contract minimum", "gateway")
# Packages named in the table, by the start of the profiled function's file (after
# site-packages/ or the standard library's directory); anything else is "other".
PACKAGES = ("aiohttp", "yarl", "asyncio", "gateway", "benchmarks", "structlog")


@dataclass
class Calls:
    """The calls of one target: per (package, function) and in total, for `requests`."""
    name: str
    requests: int
    python: collections.Counter[str] = field(default_factory=collections.Counter)
    builtin: collections.Counter[str] = field(default_factory=collections.Counter)
    syscalls: collections.Counter[str] = field(default_factory=collections.Counter)
    # bytecode instructions executed, per `package:file:line:function` (`--opcodes`)
    opcodes: collections.Counter[str] = field(default_factory=collections.Counter)

    def per_request(self, counter: collections.Counter[str], prefix: str = "") -> float:
        return sum(n for key, n in counter.items() if key.startswith(prefix)) / self.requests


def package_of(filename: str) -> tuple[str, str]:
    """The package whose code `filename` (a profiled function's file) is, or "other", and the
    file's path from that package's directory (or the standard library's, or this project's)."""
    path = filename.replace(os.sep, "/")
    if "/site-packages/" in path:
        path = path.split("/site-packages/", 1)[1]
    elif "/lib/python3." in path:
        path = path.split("/lib/python3.", 1)[1].split("/", 1)[-1]
    else:
        path = path.removeprefix(_ROOT)
    top = path.split("/", 1)[0].removesuffix(".py")
    return (top if top in PACKAGES else "other"), path


_ROOT = str(Path(__file__).resolve().parent.parent).replace(os.sep, "/") + "/"


def tally(stats: pstats.Stats, name: str, requests: int) -> Calls:
    """The calls of a dumped profile, keyed `package:file:function` (built-ins `~:name`)."""
    calls = Calls(name, requests)
    for (filename, line, function), row in stats.stats.items():  # type: ignore[attr-defined]
        count = row[1]  # every call, a coroutine's resumptions included
        if filename == "~":
            calls.builtin[f"~:{function}"] += count
        else:
            package, path = package_of(filename)
            calls.python[f"{package}:{path}:{line}:{function}"] += count
    return calls


def tally_opcodes(rows: list[list[Any]], name: str, requests: int) -> Calls:
    """The opcodes of a dumped count (`[filename, line, function, opcodes]` rows), keyed as
    `tally` keys calls."""
    calls = Calls(name, requests)
    for filename, line, function, count in rows:
        package, path = package_of(filename)
        calls.opcodes[f"{package}:{path}:{line}:{function}"] += count
    return calls


def parse_strace_summary(text: str) -> collections.Counter[str]:
    """`strace -c`'s table: calls by system call name (the `total` line left out)."""
    calls: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], name
        if len(fields) in (5, 6) and fields[3].isdigit() and fields[-1] != "total":
            calls[fields[-1]] += int(fields[3])
    return calls


def _syscall_table(counts: Sequence[Calls], top: int) -> list[str]:
    names = collections.Counter[str]()
    for c in counts:
        names.update({name: n / c.requests for name, n in c.syscalls.items()})
    shown = [name for name, _ in names.most_common(top)]
    lines = ["", "System calls per deactivation (strace -f -c, every thread):", "",
             "| system call | " + " | ".join(c.name for c in counts) + " |",
             "|---|" + "---:|" * len(counts),
             "| all | " + " | ".join(f"{c.per_request(c.syscalls):.2f}" for c in counts) + " |"]
    for name in shown:
        lines.append(f"| {name} | " + " | ".join(f"{c.syscalls[name] / c.requests:.2f}"
                                                 for c in counts) + " |")
    return lines


def opcode_report(counts: Sequence[Calls], top: int) -> str:
    lines = [("Bytecode instructions executed per deactivation (sys.settrace, every thread), "
              "one process each:"), "",
             "| target | all | " + " | ".join(PACKAGES) + " | other |",
             "|---|---:|" + "---:|" * (len(PACKAGES) + 1)]
    for c in counts:
        parts = [f"{c.per_request(c.opcodes, p + ':'):.0f}" for p in (*PACKAGES, "other")]
        lines.append(f"| {c.name} | {c.per_request(c.opcodes):.0f} | " + " | ".join(parts)
                     + " |")
    lines += _own_top(counts, "opcodes", top, "by bytecode instructions per deactivation")
    return "\n".join(lines) + "\n"


def _own_top(counts: Sequence[Calls], counter: str, top: int, what: str) -> list[str]:
    """The gateway's own functions with the most of `counter` (a `Calls` field), per
    deactivation."""
    gateway = next((c for c in counts if c.name == "gateway"), None)
    if gateway is None or top <= 0:
        return []
    lines = ["", f"The gateway's own functions {what} (top {top}):", ""]
    own = [(n, key) for key, n in getattr(gateway, counter).items()
           if key.startswith("gateway:")]
    for n, key in sorted(own, key=lambda row: (-row[0], row[1]))[:top]:
        _, path, line, function = key.split(":", 3)
        lines.append(f"  {n / gateway.requests:5.1f}  {function} ({path}:{line})")
    return lines


def report(counts: Sequence[Calls], top: int) -> str:
    lines = [("Function calls per deactivation (cProfile, the event loop's thread), one "
              "process each:"), "",
             "| target | Python functions | built-ins | " + " | ".join(PACKAGES) + " | other |",
             "|---|---:|---:|" + "---:|" * (len(PACKAGES) + 1)]
    for c in counts:
        parts = [f"{c.per_request(c.python, p + ':'):.1f}" for p in (*PACKAGES, "other")]
        lines.append(f"| {c.name} | {c.per_request(c.python):.1f} | "
                     f"{c.per_request(c.builtin):.1f} | " + " | ".join(parts) + " |")
    lines += _own_top(counts, "python", top, "with the most calls per deactivation")
    if any(c.syscalls for c in counts):
        lines += _syscall_table(counts, 12)
    return "\n".join(lines) + "\n"


def serve(out: Path, module: str, argv: list[str]) -> None:
    """The served process: `python -m module argv…` under cProfile; SIGUSR1 starts the count
    afresh, SIGUSR2 writes it to `out` (then to `out` again on each SIGUSR2)."""
    profiler = cProfile.Profile()

    def restart() -> None:
        profiler.disable()
        profiler.clear()
        profiler.enable()

    def dump(part: str) -> None:
        profiler.disable()
        profiler.dump_stats(part)

    _run_counted(out, module, argv, restart, dump, profiler.enable)


def _run_counted(out: Path, module: str, argv: list[str], restart: Callable[[], None],
                 dump: Callable[[str], None], start: Callable[[], None]) -> None:
    """Runs `python -m module argv…` after `start()`: SIGUSR1 calls `restart()`, SIGUSR2
    `dump(part)`, which writes the count to the file `part`, moved onto `out` once whole."""
    def write(*_: object) -> None:
        dump(str(out) + ".part")
        os.replace(str(out) + ".part", out)

    signal.signal(signal.SIGUSR1, lambda *_: restart())
    signal.signal(signal.SIGUSR2, write)
    sys.argv = [module, *argv]
    start()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class OpcodeCounter:
    """Bytecode instructions executed per code object, in every thread, while `counting`."""

    def __init__(self) -> None:
        self.counts: collections.Counter[CodeType] = collections.Counter()
        self.counting = False

    def install(self) -> None:
        sys.settrace(self._call)
        threading.settrace(self._call)  # threads started from now on (the audit thread)

    def _call(self, frame: FrameType, _event: str, _arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return self._step

    def _step(self, frame: FrameType, event: str, _arg: Any) -> Any:
        if event == "opcode" and self.counting:
            self.counts[frame.f_code] += 1
        return self._step

    def restart(self) -> None:
        self.counts.clear()
        self.counting = True

    def rows(self) -> list[list[Any]]:
        return [[code.co_filename, code.co_firstlineno, code.co_name, n]
                for code, n in list(self.counts.items())]


def serve_opcodes(out: Path, module: str, argv: list[str]) -> None:
    """`serve`, counting bytecode instructions (`OpcodeCounter`) instead of profiling;
    SIGUSR2 writes the rows as JSON."""
    counter = OpcodeCounter()

    def dump(part: str) -> None:
        counter.counting = False
        Path(part).write_text(json.dumps(counter.rows()))

    _run_counted(out, module, argv, counter.restart, dump, counter.install)


async def _count(name: str, server: Server, ready_path: str, headers: dict[str, str],
                 out: Path, args: argparse.Namespace) -> Calls:
    try:
        await wait_status(server, ready_path, READY_TIMEOUT_S)
        url = server.url + f"/v1/bots/{peers.BOT}/sessions/deactivate"
        await _drive(url, headers, args.warmup, args.concurrency)
        os.kill(server.proc.pid, signal.SIGUSR1)
        await asyncio.sleep(0.2)  # (a signal handler runs between two bytecodes of the loop)
        traced = _strace(server, out) if args.syscalls else None
        try:
            if traced is not None:
                await asyncio.sleep(STRACE_ATTACH_S)
            ok = await _drive(url, headers, args.requests, args.concurrency)
        finally:
            if traced is not None:
                traced.send_signal(signal.SIGINT)  # detaches and writes its summary
                traced.wait(DUMP_TIMEOUT_S)
        os.kill(server.proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + DUMP_TIMEOUT_S
        while not out.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no profile written; see {server.log}")
            await asyncio.sleep(0.1)
    finally:
        server.stop()
    if ok != args.requests:
        raise RuntimeError(f"{name}: {ok} of {args.requests} requests answered 200; "
                           f"see {server.log}")
    if args.opcodes:
        return tally_opcodes(json.loads(out.read_text()), name, ok)
    calls = tally(pstats.Stats(str(out)), name, ok)
    if args.syscalls:
        calls.syscalls = parse_strace_summary(_strace_out(out).read_text())
    return calls


def _strace_out(out: Path) -> Path:
    return out.with_suffix(".strace")


def _strace(server: Server, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["strace", "-f", "-c", "-o", str(_strace_out(out)), "-p",
                             str(server.proc.pid)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _launcher(out: Path, opcodes: bool = False) -> list[str]:
    mode = "--serve-opcodes" if opcodes else "--serve"
    return [sys.executable, "-m", "benchmarks.calls", mode, str(out)]


async def measure(args: argparse.Namespace, directory: Path) -> list[Calls]:
    creds = peers.Credentials("cs-calls", secrets.token_urlsafe(32),
                              "kgw_" + secrets.token_hex(16))
    stub = stubs.start_stub(stubs.stub_kind("auto"), directory / "stub", creds.client_id,
                            creds.secret)
    caller = {"Content-Type": "application/json", "Authorization": f"Bearer {creds.caller_key}"}
    counts: list[Calls] = []
    try:
        await wait_status(stub, "/healthz", READY_TIMEOUT_S)
        for name, minimum in (("aiohttp floor", False), ("contract minimum", True)):
            out = directory / f"{name.split()[-1]}.prof"
            floor = peers.start_floor(directory / name.split()[-1], 1, stub.url,
                                      _static_jwt(creds), contract_minimum=minimum,
                                      caller_key=creds.caller_key,
                                      launcher=[*_launcher(out, args.opcodes), "benchmarks.floor"])
            counts.append(await _count(name, floor, "/healthz", caller, out, args))
        out = directory / "gateway.prof"
        config = peers.gateway_config(directory / "gateway", stub.url, creds)
        gateway = start("gateway", [*_launcher(out, args.opcodes), "gateway", "serve", "--config",
                                    str(config), "--workers", "1"],
                        peers.listen_url(config), directory / "gateway.log")
        counts.append(await _count("gateway", gateway, "/readyz", caller, out, args))
    finally:
        stub.stop()
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calls",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="counted requests")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--top", type=int, default=40, help="gateway functions listed")
    parser.add_argument("--syscalls", action="store_true",
                        help="also count system calls (strace)")
    parser.add_argument("--opcodes", action="store_true",
                        help="count bytecode instructions per function, every thread, instead "
                             "of calls")
    parser.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--serve-opcodes", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:  # the profiled process: OUT MODULE ARGS…
        serve(Path(args.serve[0]), args.serve[1], args.serve[2:])
        return 0
    if args.serve_opcodes:
        serve_opcodes(Path(args.serve_opcodes[0]), args.serve_opcodes[1],
                      args.serve_opcodes[2:])
        return 0
    if not (1 <= args.requests <= 100_000 and 0 <= args.warmup <= 10_000
            and 1 <= args.concurrency <= 256 and 0 <= args.top <= 500):
        parser.error("--requests 1..100000, --warmup 0..10000, --concurrency 1..256, "
                     "--top 0..500")
    if args.syscalls and args.opcodes:
        parser.error("--syscalls and --opcodes: one at a time (the tracer slows the process)")
    if args.syscalls and shutil.which("strace") is None:
        print("strace is not installed: apt-get install -y strace", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kgw-calls-") as name:
        counts = asyncio.run(measure(args, Path(name)))
    print((opcode_report if args.opcodes else report)(counts, args.top), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
