"""`python -m benchmarks.profile`: where the gateway's CPU time goes under wrk load, by py-spy.

Starts the benchmark's stub and `kore-gateway serve --workers N` (every feature on, the same
config as `python -m benchmarks`; or, with `--target floor`, the aiohttp floor peer), warms it up, then samples every worker with py-spy
(`record --subprocesses --nonblocking`, all running threads: the event loop and the audit
writer) while wrk keeps it saturated. Prints the CPU time per request (utime + stime of the
gateway's processes from /proc, py-spy's own excluded), the share of each part of the request
path (each sample is charged to the nearest frame from the leaf up that belongs to a known
part; `CATEGORIES`), and the functions with the most samples, own and inclusive. `--flame
PATH.svg` also records a flame graph (a second window of the same length), `--raw PATH` keeps
the collapsed stacks (for flamegraph.pl, inferno or speedscope).

py-spy (`pip install -e '.[bench]'`) reads the workers' memory from outside and needs ptrace
rights over them (root, or `kernel.yama.ptrace_scope = 0`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import load, peers, stubs
from benchmarks.procs import Server, wait_status

READY_TIMEOUT_S = 20.0
SAMPLE_RATE = 200

# (part, pattern on a frame's "function (file:line)"): the first pattern matching a frame,
# walking from the leaf up, names the part a sample is charged to. Frames of helpers that both
# sides use (`PASS_THROUGH`: JSON, aiohttp's writer, streams …) are charged to their caller.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("metrics", r"\(prometheus_client/|\(gateway/metrics\.py"),
    ("logging (structlog, access line)", r"\(structlog/|\(gateway/logs\.py"),
    ("audit log", r"\(gateway/audit/"),
    ("JWT, rate limit, breaker",
     (r"\(jwt/|\(cryptography/|\(cachetools/|\(gateway/kore/tokens\.py|\(gateway/ratelimit/"
     r"|\(gateway/breaker\.py")),
    ("caller key, input rules", r"\(gateway/auth\.py|\(gateway/validation\.py"),
    ("aiohttp client",
     (r"\(aiohttp/(client|connector|client_proto|client_reqrep|client_exceptions|tracing"
     r"|cookiejar)\.py")),
    ("upstream call (gateway)", r"\(gateway/kore/client\.py"),
    ("request core (gateway)", r"\(gateway/"),
    ("aiohttp server", r"\(aiohttp/web"),
    ("aiohttp, other", r"\(aiohttp/|\(multidict/|\(yarl/"),
    ("thread hand-offs", r"\(concurrent/|\(threading\.py"),
    ("event loop (uvloop, in C: epoll, sockets, callbacks)", r"\(asyncio/|\(uvloop/"),
)
OUTER = ("main (", "cmd_serve (", "serve (", "run (", "_worker_main (", "<module> (",
         "run_worker (")  # frames every sample of a worker passes through
PASS_THROUGH = re.compile(
    r"\(aiohttp/(http_writer|streams|helpers|base_protocol|payload|http_parser|abc|_websocket)"
    r"|\(gateway/jsoncodec\.py|\(json/|\(uuid\.py|\(datetime\.py|\(re/|\(functools\.py"
    r"|\(contextvars|\(typing\.py|\(enum\.py|\(email/")


@dataclass
class Profile:
    samples: int = 0
    by_category: collections.Counter[str] = field(default_factory=collections.Counter)
    own: collections.Counter[str] = field(default_factory=collections.Counter)
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)


def parse_collapsed(lines: Iterable[str]) -> Profile:
    """py-spy's raw output ("frame;frame;… count" per line, root first) → shares."""
    rules = [(name, re.compile(pattern)) for name, pattern in CATEGORIES]
    profile = Profile()
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        profile.samples += count
        profile.own[frames[-1]] += count
        for frame in set(frames):
            profile.inclusive[frame] += count
        profile.by_category[_category(frames, rules)] += count
    return profile


def _category(frames: Sequence[str], rules: Sequence[tuple[str, re.Pattern[str]]]) -> str:
    for frame in reversed(frames):
        if PASS_THROUGH.search(frame):
            continue
        for name, pattern in rules:
            if pattern.search(frame):
                return name
    return "other (interpreter start, stdlib)"


def report(profile: Profile, requests: int, cpu_s: float, wall_s: float, top: int) -> str:
    """Each part's share of the samples, and the CPU time per request apportioned by it.

    The samples are of threads holding the GIL; uvloop and aiohttp make their socket system
    calls holding it, so kernel time is charged to the frame that made the call (fsync and
    os.write release it: the audit writer's disk time is not in the samples)."""
    total = max(profile.samples, 1)
    per_request = cpu_s / max(requests, 1) * 1e6
    lines = [(f"{requests} requests in {wall_s:.1f} s ({requests / wall_s:.0f} req/s while "
             f"sampled); CPU time (user + system, /proc) {cpu_s:.2f} s = {per_request:.0f} µs "
             f"per request; {profile.samples} samples holding the GIL"), "",
             "| share | µs/request | part |", "|---:|---:|---|"]
    for name, count in profile.by_category.most_common():
        lines.append(f"| {count / total:6.1%} | {per_request * count / total:6.1f} | {name} |")
    lines += ["", f"top {top} functions, own samples:"]
    lines += [f"{count / total:6.1%}  {frame}" for frame, count in profile.own.most_common(top)]
    ours = collections.Counter({f: n for f, n in profile.inclusive.items()
                                if "(gateway/" in f and not f.startswith(OUTER)})
    lines += ["", f"top {top} functions of the gateway, inclusive samples:"]
    lines += [f"{count / total:6.1%}  {frame}" for frame, count in ours.most_common(top)]
    return "\n".join(lines) + "\n"


def _py_spy() -> str:
    found = shutil.which("py-spy") or (str(Path(sys.executable).with_name("py-spy"))
                                       if Path(sys.executable).with_name("py-spy").exists()
                                       else None)
    if found is None:
        raise SystemExit("py-spy is not installed: pip install -e '.[bench]'")
    return found


def _record(pid: int, seconds: float, out: Path, fmt: str) -> subprocess.Popen[bytes]:
    argv = [_py_spy(), "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--gil",
            "--function", "--rate", str(SAMPLE_RATE), "--duration", str(max(1, round(seconds))),
            "--format", fmt, "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _sampled_window(server: Server, url: str, script: Path, args: argparse.Namespace, out: Path,
                    fmt: str) -> tuple[load.WrkResult, float, float]:
    spy = _record(server.proc.pid, args.seconds, out, fmt)
    time.sleep(0.5)  # py-spy attaches to every worker
    cpu, began = server.cpu(), time.monotonic()
    result = load.run_wrk(url, script, connections=args.connections, duration_s=args.seconds)
    cpu_s, wall_s = server.cpu() - cpu, time.monotonic() - began
    _, err = spy.communicate(timeout=args.seconds + 60)
    if spy.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({spy.returncode}): {err.decode(errors='replace')}")
    return result, cpu_s, wall_s


async def _start(directory: Path, args: argparse.Namespace
                 ) -> tuple[Server, Server, peers.Credentials]:
    creds = peers.Credentials("cs-profile", secrets.token_urlsafe(32),
                              "kgw_" + secrets.token_hex(16))
    stub = stubs.start_stub(stubs.stub_kind("auto"), directory / "stub", creds.client_id,
                            creds.secret)
    await wait_status(stub, "/healthz", READY_TIMEOUT_S)
    if args.target == "floor":
        from benchmarks.harness import _static_jwt

        floor = peers.start_floor(directory / "floor", args.workers, stub.url,
                                  _static_jwt(creds))
        await wait_status(floor, "/healthz", READY_TIMEOUT_S)
        return stub, floor, creds
    gw = peers.start_gateway(directory / "gateway", args.workers, stub.url, creds)
    await wait_status(gw, "/readyz", READY_TIMEOUT_S)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(peers.gateway_log_events(gw.log, "gateway.listening")) < args.workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every worker started; see {gw.log}")
        await asyncio.sleep(0.02)
    return stub, gw, creds


def profile(args: argparse.Namespace, directory: Path) -> str:
    stub, server, creds = asyncio.run(_start(directory, args))
    try:
        request = peers.deactivation(creds.caller_key if args.target == "gateway" else None)
        script = load.wrk_script(request, directory / "profile.lua")
        url = server.url + request.path
        load.run_wrk(url, script, connections=args.connections, duration_s=2)  # warm-up
        raw = args.raw or directory / "stacks.txt"
        result, cpu_s, wall_s = _sampled_window(server, url, script, args, raw, "raw")
        if args.flame is not None:
            _sampled_window(server, url, script, args, args.flame, "flamegraph")
    finally:
        server.stop()
        stub.stop()
    with raw.open() as lines:
        parsed = parse_collapsed(lines)
    text = f"{args.target}, {args.workers} worker(s), wrk -c{args.connections}\n"
    text += report(parsed, result.ok, cpu_s, wall_s, args.top)
    if args.flame is not None:
        text += f"\nflame graph: {args.flame}\n"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="sampled seconds")
    parser.add_argument("--target", choices=("gateway", "floor"), default="gateway",
                        help="what to profile: the gateway, or the aiohttp floor peer")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--top", type=int, default=30, help="functions listed per table")
    parser.add_argument("--flame", type=Path, default=None, metavar="PATH.svg",
                        help="also record a flame graph there")
    parser.add_argument("--raw", type=Path, default=None, metavar="PATH",
                        help="keep the collapsed stacks there")
    args = parser.parse_args(argv)
    load.require_wrk()
    _py_spy()
    with tempfile.TemporaryDirectory(prefix="kgw-profile-") as name:
        print(profile(args, Path(name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
