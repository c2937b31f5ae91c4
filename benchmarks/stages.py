"""`python -m benchmarks.stages`: where a paced deactivation's time goes inside the gateway.

Starts the benchmark's stub and one gateway worker (every feature on, the config of
`python -m benchmarks`) with timers around the request path, sends `--rate` deactivations a
second for `--seconds` (open loop, as the harness's latency figures), and prints, for each mark
a request passes, its median and p90 offset from the moment the request entered the gateway's
middleware, and the median of each stage (from the mark before). Also: the median time of the
audit thread's write + fsync of one commit and of every `os.fsync` call (the system call and
the GIL taken back after it, beside the calling thread's CPU time: the same call in both
targets, so what the disk and the kernel take can be told from the code around them), what
the paced client saw end to end, and, for the gateway, a second table of the `requested`
record's commit (`COMMIT_MARKS`): its file's path looked at and the records chained (by the
loop before it hands them over, while the log's thread is idle; else by the thread), the
record handed to the log's thread, taken by it, written and fsynced there, and the event loop
resumed by the thread's hand-back. Those marks are set on the loop and on the thread by the
record's identity, so they are the record's own commit's. Last, those two steps of a commit
(`THREAD_STEPS`) with the CPU time of the thread that ran them beside the wall clock's, and
the same call timed warm, in a loop after the run: CPU time as long as the wall clock's says
the thread was computing, not waiting for the GIL; warm against the run's is what running once
a request, with cold caches, costs the same code. And the scheduler's account of
the served process over the timed run (`/proc/<pid>/task/*/schedstat`, Linux), per
deactivation: the event loop's thread and the process's other threads together (the audit's,
uvloop's helpers, and this tool's own, which looks for a request for samples every `POLL_S`),
each with its time on a CPU, its time runnable but waiting for a CPU, and how many times it was
run. Time on a CPU is the thread's running, cold caches and all; waiting for a CPU is what
other work on the machine made it wait.

The timers wrap the gateway's own functions in this process before `serve` starts (one worker,
served in-process); each request keeps its marks in a context variable, so requests that
overlap do not mix. They cost a few microseconds a mark; the figures are for comparing stages
with each other, not for the targets (those are `python -m benchmarks`'s).

`--without PART[,PART…]` times the gateway with those parts of its request path removed in
its process (`benchmarks.without`: the optional parts, the look at the audit path before a
write, the terminal record written before the answer), for what they cost a paced request,
stage by stage; never a way to run the gateway.

`--target minimum` times the harness's contract minimum (`benchmarks.floor --contract-minimum`,
one worker) the same way, stage for stage: its handler is one function, so its marks are
inserted into a copy of `benchmarks/floor.py`'s source before the lines named in
`MINIMUM_MARKS` (each must occur there exactly once, or the run stops), and that copy is
served. Its terminal record is handed to its writer thread, not written before the answer.
`--target minimum-kept` times it with the gateway's two kept behaviours as well
(`benchmarks.floor --kept-behaviours`): the audit path looked at before each write, and the
terminal record written by the event loop before the answer while the writer thread is idle.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import functools
import json
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from benchmarks import load, peers, stubs, without
from benchmarks.procs import Server, start, wait_status

if TYPE_CHECKING:
    from _typeshed import HasFileno

READY_TIMEOUT_S = 20.0
POLL_S = 0.05  # how often the gateway process looks for a request for its samples
# The marks of one successful deactivation, in the order it passes them.
MARKS = ("authenticated", "body read", "deactivation begun", "requested record durable",
         "Kore.ai answered", "terminal record appended", "answer ready")
THREAD = "audit thread: write + fsync of a commit"
# Every `os.fsync` of the served process, timed around the call (`_time_fsync`): the system
# call, and the GIL taken back after it; beside it the calling thread's CPU time.
FSYNC = "every fsync call, p50 µs: wall / CPU of its thread"
SCHED = "the scheduler's account of the served process, per deactivation"
# Inside "requested record durable" (the gateway only): the `requested` record's commit, from
# the look at its file's path and the records chained (on the loop, while the log's thread is
# idle: `AuditLog._look_and_chain`; by the thread itself after it took them otherwise) to the
# loop resumed by the thread's hand-back.
COMMIT_MARKS = ("path looked at", "records chained", "record handed to the thread",
                "thread took it", "record written", "record fsynced",
                "loop resumed by the thread")
# Two steps of a commit, timed on the thread that runs them (wall clock and that thread's CPU
# time) and again warm, in a loop of `WARM_CALLS` once the run is over: (mark, AuditLog method).
THREAD_STEPS = (("path looked at", "_still_current"), ("records chained", "_chain"))
STEPS = ("a commit's look and chain, p50 µs: in the run (wall / CPU of the thread that ran "
         "them) and warm (the same call in a loop, after the run):")
WARM_CALLS = 200
TARGETS = ("gateway", "minimum", "minimum-kept")
# The contract minimum's marks: (a line of benchmarks/floor.py, the mark set just before it).
MINIMUM_MARKS = (
    ('        bot_id = request.match_info["botId"]\n', "authenticated"),
    ("        user_id = channel = None\n", "body read"),
    ("        token, renew_at = _jwt\n", "deactivation begun"),
    ('        kore_body = {"userId": user_id, "status": "inactive"}\n', "requested record durable"),
    ("            if 200 <= upstream_status < 300:\n", "Kore.ai answered"),
    ("        if ok:\n", "terminal record appended"),
)
# Its writer thread's commit, timed as the gateway's `_write_batch` is.
MINIMUM_COMMIT = ("                os.write(self.fd, data)\n",
                  "                os.fsync(self.fd)\n")

_marks: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "stage_marks", default=None)


def _mark(name: str) -> None:
    marks = _marks.get()
    if marks is not None and name not in marks:
        marks[name] = time.perf_counter()


def _after(owner: Any, attribute: str, name: Callable[..., str | None]) -> None:
    """`owner.attribute` (a coroutine function) marks `name(*args, **kwargs)` once it returns."""
    original = getattr(owner, attribute)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        mark = name(*args, **kwargs)
        if mark is not None:
            _mark(mark)
        return result

    setattr(owner, attribute, timed)


def _after_call(owner: Any, attribute: str, name: str) -> None:
    """`owner.attribute` (a plain function) marks `name` once it returns."""
    original = getattr(owner, attribute)

    def timed(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        _mark(name)
        return result

    setattr(owner, attribute, timed)


def instrument(out: Path) -> None:
    """Wraps the request path's functions; writes the samples to `out` when asked (`_collect`)."""
    from gateway import auth, deactivation
    from gateway.audit import log as audit
    from gateway.audit import writer
    from gateway.http import app, express
    from gateway.kore import client

    samples: list[dict[str, float]] = []
    commits: list[float] = []
    fsyncs = _time_fsync()
    app.envelope_middleware = _timed(app.envelope_middleware, samples)
    # The express lane serves the simplified route's common case before the router and the
    # middleware: timed the same way (a request it hands to the general path would be timed
    # twice; the paced deactivations here are all its own).
    lane_call = express.ExpressLane.__call__
    timed_lane = _timed(None, samples)

    async def lane(self: Any, request: Any) -> Any:
        return await timed_lane(request, functools.partial(lane_call, self))

    express.ExpressLane.__call__ = lane  # type: ignore[method-assign]
    # The express lane calls the authenticator and `plain_simplified` inline; the general
    # path goes through `authenticated` and `read_json`.
    _after_call(auth.Authenticator, "authenticate", "authenticated")
    _after_call(express, "plain_simplified", "body read")
    _after(app, "read_json", lambda *a, **k: "body read")
    original_deactivate = deactivation.Deactivator.deactivate

    async def deactivate(*args: Any, **kwargs: Any) -> Any:
        _mark("deactivation begun")
        return await original_deactivate(*args, **kwargs)

    deactivation.Deactivator.deactivate = deactivate  # type: ignore[method-assign]
    append = audit.AuditLog.append

    async def appended(self: Any, record: Any, *, durable: bool = True) -> Any:
        written = await append(self, record, durable=durable)
        if durable:
            _commit_marks(written)
        _mark("requested record durable" if durable else "terminal record appended")
        return written

    audit.AuditLog.append = appended  # type: ignore[method-assign]
    durable = audit.AuditLog.durable

    def durable_marked(self: Any, record: Any) -> Any:
        future = durable(self, record)  # its callback runs before the awaiting task resumes

        def marked(done: Any) -> None:
            if not done.cancelled() and done.exception() is None:
                _commit_marks(done.result())
                _mark("requested record durable")

        future.add_done_callback(marked)
        return future

    audit.AuditLog.durable = durable_marked  # type: ignore[method-assign]
    _after(client.KoreClient, "_send", lambda *a, **k: "Kore.ai answered")
    write_batch = audit.AuditLog._write_batch
    in_commit = threading.local()  # the records being looked at, chained or written
    look_and_chain = audit.AuditLog._look_and_chain

    def timed_look(self: Any, records: list[dict[str, Any]]) -> Any:
        for record in records:  # the commit's marks start here, on the loop
            _stamps[id(record)] = {}
        in_commit.records = records
        try:
            return look_and_chain(self, records)
        finally:
            in_commit.records = None

    audit.AuditLog._look_and_chain = timed_look  # type: ignore[method-assign]

    def timed_write(self: Any, records: list[dict[str, Any]], *args: Any, **kwargs: Any
                    ) -> Any:
        began = time.perf_counter()
        _stamp(records, "thread took it", began)
        in_commit.records = records
        try:
            return write_batch(self, records, *args, **kwargs)
        finally:
            in_commit.records = None
            done = time.perf_counter()
            _stamp(records, "record fsynced", done)
            commits.append((done - began) * 1000)

    audit.AuditLog._write_batch = timed_write  # type: ignore[method-assign]
    write_all = audit._write_all

    def timed_write_all(fd: int, data: bytes) -> None:
        write_all(fd, data)
        _stamp(getattr(in_commit, "records", None) or (), "record written", time.perf_counter())

    audit._write_all = timed_write_all
    call = writer.Writer.call

    def handed(self: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(func, "__func__", None) is timed_write:  # a commit: its records
            _stamp(args[0], "record handed to the thread", time.perf_counter())
        return call(self, func, *args, **kwargs)

    writer.Writer.call = handed  # type: ignore[method-assign]
    settle = audit._settle

    def settled(batch: Any, indexes: Any, refused: Any) -> None:
        _stamp([batch[i][0] for i in indexes], "loop resumed by the thread", time.perf_counter())
        settle(batch, indexes, refused)

    audit._settle = settled
    steps = {mark: _timed_step(audit.AuditLog, method, mark, in_commit)
             for mark, method in THREAD_STEPS}
    _dump_when_asked(out, samples, commits, steps, fsyncs)


def _timed_step(owner: Any, method: str, mark: str, in_commit: threading.local
                ) -> dict[str, Any]:
    """`owner.method`, on the audit thread in a commit, stamps `mark` on the commit's records
    and keeps its wall and CPU time (µs); `warm()` times it again in a loop (the run over)."""
    original = getattr(owner, method)
    timed: dict[str, Any] = {"wall": [], "cpu": [], "last": None}

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        records = getattr(in_commit, "records", None)
        if not records:  # the loop's own write (`_write_now`), or a commit of its fsync only
            return original(self, *args, **kwargs)
        wall, cpu = time.perf_counter(), time.thread_time()
        result = original(self, *args, **kwargs)
        done = time.perf_counter()
        timed["cpu"].append((time.thread_time() - cpu) * 1e6)
        timed["wall"].append((done - wall) * 1e6)
        timed["last"] = (self, args[:1], kwargs)  # copied when timed warm, not in the run
        _stamp(records, mark, done)
        return result

    def warm() -> float | None:
        if timed["last"] is None:
            return None
        log, args, kwargs = timed["last"]
        began = time.perf_counter()
        for _ in range(WARM_CALLS):  # (`_chain` rechains the records it is given: copies)
            original(log, *[[dict(r) for r in arg] for arg in args], **kwargs)
        return (time.perf_counter() - began) / WARM_CALLS * 1e6

    timed["warm"] = warm
    setattr(owner, method, step)
    return timed


# The commit marks of records being committed, by id(record): set on the loop when a commit is
# handed to the thread, added to by the thread, taken into the request's marks once durable.
_stamps: dict[int, dict[str, float]] = {}


def _stamp(records: Any, name: str, when: float) -> None:
    for record in records:
        stamps = _stamps.get(id(record))
        if stamps is not None:
            stamps.setdefault(name, when)


def _commit_marks(record: Any) -> None:
    """The commit marks of `record` (its append returned) into the request's marks, when its
    commit has them all (not one that failed and was retried)."""
    stamps = _stamps.pop(id(record), None)
    marks = _marks.get()
    if stamps is not None and marks is not None and len(stamps) == len(COMMIT_MARKS):
        marks.update(stamps)


def _timed(middleware: Any, samples: list[dict[str, float]]) -> Any:
    """`middleware` (None: none) with a request's marks started before it and "answer ready"
    set after it; the marks of each 200 go to `samples`, as offsets in ms."""
    from aiohttp import web

    @web.middleware
    async def timed_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        marks = {"start": time.perf_counter()}
        _marks.set(marks)
        response: web.StreamResponse = await (handler(request) if middleware is None
                                              else middleware(request, handler))
        marks["answer ready"] = time.perf_counter()
        if response.status == 200:
            samples.append({k: (v - marks["start"]) * 1000 for k, v in marks.items()})
        return response

    return timed_middleware


def _time_fsync() -> list[tuple[float, float]]:
    """`os.fsync` in this process, timed: each call's wall and its thread's CPU time (µs).
    Both targets' logs call it through the module (`os.fsync(fd)`), so both are timed."""
    calls: list[tuple[float, float]] = []
    fsync = os.fsync

    def timed(fd: int | HasFileno) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        fsync(fd)
        calls.append(((time.perf_counter() - wall) * 1e6, (time.thread_time() - cpu) * 1e6))

    os.fsync = timed
    return calls


def _dump_when_asked(out: Path, samples: list[dict[str, float]], commits: list[float],
                     steps: dict[str, dict[str, Any]] | None = None,
                     fsyncs: list[tuple[float, float]] | None = None) -> None:
    def dump() -> None:  # only when asked: encoding the samples holds the GIL
        want = _wanted(out)
        while True:
            time.sleep(POLL_S)
            if want.exists():
                thread = {mark: {"wall": list(step["wall"]), "cpu": list(step["cpu"]),
                                 "warm": step["warm"]()} for mark, step in (steps or {}).items()}
                out.write_text(json.dumps({"samples": list(samples), "commits": list(commits),
                                           "thread": thread, "fsync": list(fsyncs or ())}))
                want.unlink()

    threading.Thread(target=dump, name="stages-dump", daemon=True).start()


def minimum_source(source: str) -> str:
    """`benchmarks/floor.py`'s source with the marks of `MINIMUM_MARKS` and the commit's timer
    inserted; raises ValueError if a line it names is not there exactly once."""
    inserts = [(line, f"{line[:len(line) - len(line.lstrip())]}_mark({mark!r})\n", True)
               for line, mark in MINIMUM_MARKS]
    write, fsync = MINIMUM_COMMIT
    indent = write[:len(write) - len(write.lstrip())]
    inserts += [(write, f"{indent}_began = time.perf_counter()\n", True),
                (fsync, f"{indent}_commit_done(_began)\n", False)]
    for line, added, before in inserts:
        if source.count(line) != 1:
            raise ValueError(f"benchmarks/floor.py: expected exactly one line {line.strip()!r}")
        source = source.replace(line, added + line if before else line + added)
    return source


def serve_minimum(out: Path, floor_argv: list[str]) -> int:
    """The contract minimum, marked (`minimum_source`), served by this process."""
    import types

    from benchmarks import floor

    samples: list[dict[str, float]] = []
    commits: list[float] = []
    fsyncs = _time_fsync()
    module = types.ModuleType("benchmarks.floor_marked")
    module.__dict__.update(
        _mark=_mark,
        _commit_done=lambda began: commits.append((time.perf_counter() - began) * 1000))
    source = minimum_source(Path(floor.__file__).read_text(encoding="utf-8"))
    sys.modules[module.__name__] = module  # (its dataclasses and annotations look it up)
    exec(compile(source, floor.__file__, "exec"), module.__dict__)  # noqa: S102 - our own file
    make_app = module.__dict__["make_app"]

    def marked_app(*args: Any, **kwargs: Any) -> Any:
        served = make_app(*args, **kwargs)
        served.middlewares.append(_timed(None, samples))
        return served

    module.__dict__["make_app"] = marked_app
    _dump_when_asked(out, samples, commits, fsyncs=fsyncs)
    result: int = module.__dict__["main"](floor_argv)
    return result


# A thread's /proc schedstat: ns on a CPU, ns runnable but waiting for one, times it was run.
Sched = dict[int, tuple[int, int, int]]


def thread_sched(pid: int, proc: Path = Path("/proc")) -> Sched:
    """Each thread of `pid` (by thread ID): its schedstat. Empty where /proc has none (not
    Linux, or a kernel without schedstats); a thread that ends while read is passed over."""
    threads: Sched = {}
    for task in sorted((proc / str(pid) / "task").glob("*")):
        try:
            on_cpu, waiting, runs = (int(x) for x in (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        threads[int(task.name)] = (on_cpu, waiting, runs)
    return threads


def sched_lines(before: Sched, after: Sched, main: int, requests: int) -> list[str]:
    """What the scheduler accounted between two `thread_sched` readings, per request: for the
    event loop's thread (the process's main thread, `main`) and for the other threads that
    lived through both readings, together (the audit's, the event loop's helpers), the time
    on a CPU, the time runnable but waiting for a CPU, and how many times it was run (each a
    wake-up, or a preemption)."""
    if main not in before or main not in after or requests < 1:
        return []
    lines = [f"{SCHED} (ms on a CPU / ms waiting for one / times run):"]
    groups = {"event loop thread": [main],
              "other threads": [tid for tid in after if tid in before and tid != main]}
    for name, tids in groups.items():
        spent = [sum(after[tid][i] - before[tid][i] for tid in tids) for i in range(3)]
        lines.append(f"{name:28} {spent[0] / 1e6 / requests:8.3f} "
                     f"{spent[1] / 1e6 / requests:8.3f} {spent[2] / requests:8.1f}")
    return lines


def _wanted(out: Path) -> Path:
    return out.with_suffix(".wanted")


async def _collect(out: Path) -> dict[str, Any]:
    """Asks the gateway process for its samples so far and reads them."""
    want = _wanted(out)
    want.touch()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while want.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway process did not write {out}")
        await asyncio.sleep(POLL_S)
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def summary(samples: Sequence[dict[str, float]], commits: Sequence[float],
            thread: dict[str, dict[str, Any]] | None = None,
            fsyncs: Sequence[Sequence[float]] = ()) -> list[str]:
    """The table: each mark's median and p90 offset, and the median of its stage; the median
    commit and fsync call; then, when the samples have them, the same table for the
    `requested` record's commit (`COMMIT_MARKS`), and the thread's steps (`THREAD_STEPS`):
    wall and CPU time in the run, and warm."""
    lines = _table(samples, MARKS, "start")
    if commits:
        lines.append(f"{THREAD}: p50 {statistics.median(commits):.3f} ms "
                     f"({len(commits)} commits)")
    if fsyncs:
        wall, cpu = (statistics.median(call[i] for call in fsyncs) for i in (0, 1))
        lines.append(f"{FSYNC}: {wall:.1f} / {cpu:.1f} ({len(fsyncs)} calls)")
    committed = [s for s in samples if all(mark in s for mark in COMMIT_MARKS)]
    if committed:
        lines.append(f"the requested record's commit ({len(committed)} deactivations), "
                     "from deactivation begun:")
        lines += _table(committed, (*COMMIT_MARKS, "requested record durable"),
                        "deactivation begun")[1:]
    timed = {mark: step for mark, step in (thread or {}).items() if step["wall"]}
    if timed:
        lines.append(STEPS)
        for mark, step in timed.items():
            warm = f"{step['warm']:.1f}" if step.get("warm") is not None else "–"
            lines.append(f"{mark:28} {statistics.median(step['wall']):8.1f} "
                         f"{statistics.median(step['cpu']):8.1f} {warm:>10}")
    return lines


def _table(samples: Sequence[dict[str, float]], marks: Sequence[str], first: str) -> list[str]:
    lines = [f"{'mark':28} {'p50 ms':>8} {'p90 ms':>8} {'stage p50':>10}"]
    previous = first
    for mark in marks:
        offsets = [s[mark] for s in samples if mark in s]
        spans = [s[mark] - s[previous] for s in samples if mark in s and previous in s]
        if not offsets:
            lines.append(f"{mark:28} {'–':>8} {'–':>8} {'–':>10}")
            continue
        lines.append(f"{mark:28} {statistics.median(offsets):8.3f} "
                     f"{load.percentile(offsets, 90):8.3f} {statistics.median(spans):10.3f}")
        previous = mark
    return lines


def _start_target(target: str, directory: Path, stub_url: str, creds: peers.Credentials,
                  out: Path, parts: str = "") -> tuple[Server, str]:
    """The served process and the path that tells it is ready."""
    if target == "gateway":
        config = peers.gateway_config(directory / "gateway", stub_url, creds)
        argv = [sys.executable, "-m", "benchmarks.stages", "--serve", str(config), str(out),
                "--without", parts]
        return start("gateway", argv, peers.listen_url(config),
                     directory / "gateway.log"), "/readyz"
    from benchmarks.harness import _static_jwt

    launcher = [sys.executable, "-m", "benchmarks.stages", "--serve-minimum", str(out)]
    return peers.start_floor(directory / "minimum", 1, stub_url, _static_jwt(creds),
                             contract_minimum=True, caller_key=creds.caller_key,
                             launcher=launcher, kept=target == "minimum-kept"), "/healthz"


async def _measure(directory: Path, seconds: float, rate: float, target: str = "gateway",
                   parts: str = ""
                   ) -> tuple[load.PacedResult, dict[str, Any]]:
    creds = peers.Credentials("cs-stages", secrets.token_urlsafe(32),
                              "kgw_" + secrets.token_hex(16))
    stub = stubs.start_stub(stubs.stub_kind("auto"), directory / "stub", creds.client_id,
                            creds.secret)
    out = directory / "stages.json"
    gateway: Server | None = None
    try:
        await wait_status(stub, "/healthz", READY_TIMEOUT_S)
        gateway, ready = _start_target(target, directory, stub.url, creds, out, parts)
        await wait_status(gateway, ready, READY_TIMEOUT_S)
        request = peers.deactivation(creds.caller_key)
        url = urlsplit(gateway.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        await load.paced(host, port, request, rate=rate, duration_s=min(1.0, seconds))  # warm-up
        warmed = await _collect(out)
        before = thread_sched(gateway.proc.pid)
        result = await load.paced(host, port, request, rate=rate, duration_s=seconds)
        after = thread_sched(gateway.proc.pid)
        data = await _collect(out)
        data["sched"] = sched_lines(before, after, gateway.proc.pid, result.ok)
        for key in ("samples", "fsync"):  # the run's alone, not the warm-up's or start-up's
            data[key] = data[key][len(warmed[key]):]
        return result, data
    finally:
        if gateway is not None:
            gateway.stop()
        stub.stop()


def run(seconds: float, rate: float, target: str = "gateway", parts: str = "") -> str:
    """One timed run; `parts`: `benchmarks.without`'s parts (comma-separated) removed from
    the gateway's process, to see what they cost a paced request stage by stage."""
    with tempfile.TemporaryDirectory(prefix="kgw-stages-") as name:
        result, data = asyncio.run(_measure(Path(name), seconds, rate, target, parts))
    seen = result.latencies_ms
    name = {"gateway": "gateway", "minimum": "contract minimum",
            "minimum-kept": "contract minimum with the kept behaviours"}[target]
    if parts:
        name += " " + without.label(parts)
    head = (f"{name}, 1 worker, paced {rate:g} req/s for {seconds:g} s: {result.ok} answered, "
            f"{result.failed} failed; client p50 {load.percentile(seen, 50):.3f} ms, "
            f"p99 {load.percentile(seen, 99):.3f} ms")
    return "\n".join([head, *summary(data["samples"], data["commits"], data.get("thread"),
                                      data["fsync"]), *data["sched"]]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stages",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--target", choices=TARGETS, default="gateway",
                        help="the gateway, or the harness's contract minimum, without or "
                             "with the gateway's two kept behaviours (default %(default)s)")
    parser.add_argument("--without", default="", metavar="PART[,PART…]",
                        help="the gateway without these parts of its request path, removed in "
                             f"its process only (one of {', '.join(without.PARTS)})")
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--serve-minimum", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parts = [part for part in args.without.split(",") if part]
    unknown = without.unknown(parts)
    if unknown:
        parser.error(f"--without: unknown part(s) {', '.join(unknown)}")
    if parts and args.target != "gateway":
        parser.error("--without applies to the gateway only")
    if args.serve_minimum:  # the contract minimum's process: OUT, then the floor's arguments
        return serve_minimum(Path(args.serve_minimum[0]), args.serve_minimum[1:])
    if args.serve:  # the gateway process itself, with its timers
        config, out = args.serve
        without.remove(parts)  # before the timers wrap what they replace
        instrument(Path(out))
        from gateway.cli import main as gateway_main

        gateway_main(["serve", "--config", config, "--workers", "1"])
        return 0
    if not 0 < args.seconds <= 60 or not 0 < args.rate <= 2000:
        parser.error("--seconds must be in (0, 60] and --rate in (0, 2000]")
    print(run(args.seconds, args.rate, args.target, ",".join(parts)), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
