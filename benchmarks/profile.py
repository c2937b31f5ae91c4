"""`python -m benchmarks.profile`: where one gateway worker's CPU time goes under wrk load.

Runs one worker in this process (on the loop `serve` uses) under cProfile, in front of the
same stub as the benchmark, drives it with wrk for `--seconds`, then prints the CPU time per
request (`time.process_time`, both threads: the loop and the audit writer) and the functions
with the most own and cumulative CPU time of the loop thread (cProfile on `time.thread_time`,
so waiting and being descheduled on a busy machine cost nothing). cProfile slows Python code
down a lot: read the shares, not the absolute numbers (the benchmark gives those).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import load, peers, stubs
from benchmarks.procs import Server

READY_TIMEOUT_S = 20.0


def _drive(url: str, script: Path, seconds: float, connections: int, out: dict[str, object],
           ready: threading.Event) -> None:
    """In a thread: wait for the worker, warm it up, measure, then stop it (SIGTERM to self)."""
    try:
        if not ready.wait(READY_TIMEOUT_S):
            raise RuntimeError("the gateway did not start")
        load.run_wrk(url, script, connections=connections, duration_s=1)  # warm-up
        cpu, began = time.process_time(), time.monotonic()
        out["result"] = load.run_wrk(url, script, connections=connections, duration_s=seconds)
        out["cpu_s"], out["wall_s"] = time.process_time() - cpu, time.monotonic() - began
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:  # for the main thread
        out["error"] = exc
    finally:
        os.kill(os.getpid(), signal.SIGTERM)


def profile(seconds: float, connections: int, top: int, directory: Path,
            save: Path | None = None) -> str:
    from gateway.config.loader import load_config
    from gateway.http import loop as event_loop
    from gateway.http.server import run_worker
    from gateway.logs import configure

    creds = peers.Credentials("cs-profile", secrets.token_urlsafe(32), "kgw_" + secrets.token_hex(16))
    stub: Server = stubs.start_stub(stubs.stub_kind("auto"), directory / "stub", creds.client_id,
                                    creds.secret)
    try:
        config = load_config(peers.gateway_config(directory / "gateway", stub.url, creds))
        request = load.Request("POST", f"/v1/bots/{peers.BOT}/sessions/deactivate",
                               b'{"userId":"u-1001","channel":"rtm"}',
                               {"Content-Type": "application/json",
                                "Authorization": f"Bearer {creds.caller_key}"})
        script = load.wrk_script(request, directory / "profile.lua")
        url = f"http://{config.server.listen}{request.path}"
        out: dict[str, object] = {}
        ready = threading.Event()
        driver = threading.Thread(target=_drive, args=(url, script, seconds, connections, out,
                                                       ready), daemon=True)
        log_file = (directory / "gateway.log").open("w")
        sys.stderr, saved = log_file, sys.stderr
        try:
            configure(config.logging.level, "json")
            driver.start()
            profiler = cProfile.Profile(time.thread_time)  # CPU, not wall: waits cost nothing
            profiler.enable()
            event_loop.run(run_worker(config, on_ready=ready.set))
            profiler.disable()
        finally:
            sys.stderr = saved
            log_file.close()
        driver.join(READY_TIMEOUT_S)
    finally:
        stub.stop()
    if "error" in out:
        raise RuntimeError(f"load failed: {out['error']}")
    if save is not None:
        profiler.dump_stats(save)  # for pstats, snakeviz …
    return _report(profiler, out, top)


def _report(profiler: cProfile.Profile, out: dict[str, object], top: int) -> str:
    result = out["result"]
    assert isinstance(result, load.WrkResult)
    cpu_s, wall_s = float(out["cpu_s"]), float(out["wall_s"])  # type: ignore[arg-type]
    text = io.StringIO()
    text.write(f"{result.ok} requests in {wall_s:.1f} s ({result.rps:.0f} req/s, profiled), "
               f"non-2xx {result.errors['status']}; CPU {cpu_s:.2f} s = "
               f"{cpu_s / max(result.ok, 1) * 1e6:.0f} µs per request (with cProfile)\n\n")
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--top", type=int, default=35, help="functions listed per table")
    parser.add_argument("--save", type=Path, default=None, metavar="PATH",
                        help="also write the raw cProfile stats there")
    args = parser.parse_args(argv)
    load.require_wrk()
    with tempfile.TemporaryDirectory(prefix="kgw-profile-") as name:
        print(profile(args.seconds, args.connections, args.top, Path(name), args.save))
    return 0


if __name__ == "__main__":
    sys.exit(main())
