"""One benchmark run: start the stub, the peers and the gateway on loopback, drive them, collect
figures.

Phases, each bounded in time: start-up (ready times) → warm-up → `rounds` saturation rounds,
nginx, aiohttp floor, floor with the contract's audit I/O, contract minimum and gateway
alternating (wrk; CPU time and RSS sampled around each) → `rounds` latency rounds at a fixed
rate, direct-to-stub / nginx / floor / floor with audit I/O / contract minimum / gateway
alternating, with the audit disk's own fsync timed right before and after them
(`benchmarks.disk.probe`) → shut down (the gateway must exit 0 and every worker's audit chain
must verify, the contract minimum's too) → figures. The targets are checked against the floor
of the same run (`report.targets`); the floor with the contract's audit I/O (`floor.AuditIO`)
shows how much of each target's budget the contract's disk writes take before any of the
gateway's code runs, and the contract minimum (`floor.minimum`) the least any gateway bound by
the contract can reach on this stack.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from benchmarks import disk, load, peers, stubs
from benchmarks.nginx import nginx_binary
from benchmarks.procs import RssSampler, Server, wait_status
from benchmarks.report import BARE, CONTRACT, MINIMUM, PEERS, targets
from gateway.audit.anchors import log_name
from gateway.audit.log import VerifyReport, rotated_files, verify_files

MIB = 1024 * 1024
MINTS_METRIC = "kore_gateway_token_mints_total"
BATCH_METRIC = "kore_gateway_audit_batch_records"
START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Settings:
    workers: int = 2
    connections: int = 64
    saturation_s: float = 8.0  # wrk takes whole seconds
    warmup_s: float = 2.0
    rounds: int = 3
    rate: float = 200.0
    latency_s: float = 5.0
    stub: str = "auto"  # "auto", "nginx" or "sandbox"
    label: str = "latest"
    disk_probes: int = disk.PROBE_COUNT  # fsynced appends timed before and after the paced phase


@dataclass
class Saturation:
    rps: list[float] = field(default_factory=list)
    ok: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cpu_s: float = 0.0
    p99_ms: list[float] = field(default_factory=list)
    rss_peak: dict[int, int] = field(default_factory=dict)

    def add(self, result: load.WrkResult, cpu_s: float, rss: dict[int, int]) -> None:
        self.rps.append(result.rps)
        self.ok += result.ok
        self.requests += result.requests
        for name, count in result.errors.items():
            self.errors[name] = self.errors.get(name, 0) + count
        self.cpu_s += cpu_s
        self.p99_ms.append(result.p99_ms)
        for pid, peak in rss.items():
            self.rss_peak[pid] = max(self.rss_peak.get(pid, 0), peak)

    def figures(self) -> dict[str, Any]:
        return {"rps": round(statistics.median(self.rps), 1),
                "rps_rounds": [round(r, 1) for r in self.rps],
                "ok": self.ok, "requests": self.requests, "errors": self.errors,
                "cpu_s": round(self.cpu_s, 3),
                "wrk_p99_ms": round(statistics.median(self.p99_ms), 3)}

    def cpu_us(self) -> float | None:
        return round(self.cpu_s / self.ok * 1e6, 2) if self.ok else None


class Bench:
    def __init__(self, settings: Settings, directory: Path) -> None:
        self.s = settings
        self.dir = directory
        self.kind = stubs.stub_kind(settings.stub)
        self.with_peer = nginx_binary() is not None
        self.creds = peers.Credentials(client_id="cs-bench-" + secrets.token_hex(4),
                                       secret=secrets.token_urlsafe(32),
                                       caller_key="kgw_bench_" + secrets.token_urlsafe(24))
        self.static_jwt = _static_jwt(self.creds)
        self.servers: dict[str, Server] = {}
        self.gateway_requests = 0

    # --- start-up -----------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        stub = self.servers["stub"] = stubs.start_stub(
            self.kind, self.dir / "stub", self.creds.client_id, self.creds.secret)
        await wait_status(stub, "/healthz", START_TIMEOUT_S)
        ready: dict[str, Any] = {"nginx": None}
        floor = self.servers["floor"] = peers.start_floor(
            self.dir / "floor", self.s.workers, stub.url, self.static_jwt)
        ready["floor"] = round(await wait_status(floor, "/healthz", START_TIMEOUT_S), 3)
        contract = self.servers[CONTRACT] = peers.start_floor(
            self.dir / CONTRACT, self.s.workers, stub.url, self.static_jwt, audit_io=True)
        ready[CONTRACT] = round(await wait_status(contract, "/healthz", START_TIMEOUT_S), 3)
        minimum = self.servers[MINIMUM] = peers.start_floor(
            self.dir / MINIMUM, self.s.workers, stub.url, self.static_jwt,
            contract_minimum=True, caller_key=self.creds.caller_key)
        ready[MINIMUM] = round(await wait_status(minimum, "/healthz", START_TIMEOUT_S), 3)
        if self.with_peer:
            peer = self.servers["nginx"] = peers.start_peer(
                self.dir / "nginx", self.s.workers, stub.url, self.static_jwt)
            ready["nginx"] = round(await wait_status(peer, "/healthz", START_TIMEOUT_S), 3)
        gw = self.servers["gateway"] = peers.start_gateway(
            self.dir / "gateway", self.s.workers, stub.url, self.creds)
        ready["gateway_first"] = round(await wait_status(gw, "/readyz", START_TIMEOUT_S), 3)
        ready["gateway_all_workers"] = round(await self._all_listening(gw), 3)
        return ready

    async def _all_listening(self, gw: Server) -> float:
        """Seconds from start until every worker has logged `gateway.listening` (and /readyz)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if len(peers.gateway_log_events(gw.log, "gateway.listening")) >= self.s.workers:
                return time.monotonic() - gw.started
            await asyncio.sleep(0.005)
        raise RuntimeError(f"not every gateway worker started; see {gw.log}")

    # --- load ---------------------------------------------------------------------------

    def requests(self) -> dict[str, load.Request]:
        keyed, keyless = peers.deactivation(self.creds.caller_key), peers.deactivation()
        return {
            "gateway": keyed,
            MINIMUM: keyed,
            "nginx": keyless,
            "floor": keyless,
            CONTRACT: keyless,
            "direct": load.Request(
                "PUT", f"/api/public/bot/{peers.BOT}/session",
                b'{"userId":"u-1001","status":"inactive","channel":"rtm"}',
                {"Content-Type": "application/json", "auth": self.static_jwt}),
        }

    def saturate(self) -> dict[str, Saturation]:
        requests = self.requests()
        names = ["nginx"] if self.with_peer else []
        names += ["floor", *BARE, "gateway"]
        scripts = {n: load.wrk_script(requests[n], self.dir / f"{n}.lua") for n in names}
        for name in names:  # warm-up: connection pools, the first JWT, page cache
            result = self._wrk(name, scripts[name], self.s.warmup_s)
            self._count(name, result.requests)
        out = {name: Saturation() for name in names}
        for _ in range(self.s.rounds):
            for name in names:
                server = self.servers[name]
                before = server.cpu()
                with RssSampler(server.workers()) as rss:
                    result = self._wrk(name, scripts[name], self.s.saturation_s)
                out[name].add(result, server.cpu() - before, rss.peak)
                self._count(name, result.requests)
        return out

    def _wrk(self, name: str, script: Path, duration_s: float) -> load.WrkResult:
        server = self.servers[name]
        return load.run_wrk(server.url + self.requests()[name].path, script,
                            connections=self.s.connections, duration_s=duration_s)

    def _count(self, name: str, answered: int) -> None:
        if name == "gateway":
            self.gateway_requests += answered

    async def latency(self) -> dict[str, dict[str, Any]]:
        requests = self.requests()
        urls = {"direct": self.servers["stub"].url}
        if self.with_peer:
            urls["nginx"] = self.servers["nginx"].url
        urls |= {name: self.servers[name].url for name in ("floor", *BARE, "gateway")}
        samples: dict[str, list[float]] = {name: [] for name in urls}
        failed = dict.fromkeys(urls, 0)
        late = dict.fromkeys(urls, 0.0)
        for _ in range(self.s.rounds):
            for name, url in urls.items():
                host, port = url.removeprefix("http://").rsplit(":", 1)
                result = await load.paced(host, int(port), requests[name], rate=self.s.rate,
                                          duration_s=self.s.latency_s)
                samples[name] += result.latencies_ms
                failed[name] += result.failed
                late[name] = max(late[name], result.late_ms_max)
                self._count(name, result.sent)
        return {name: {**load.summary(values), "failed": failed[name],
                       "generator_late_ms_max": round(late[name], 3)}
                for name, values in samples.items()}

    def disk_probe(self) -> dict[str, Any]:
        """What one durable append costs on the audit files' disk now (`benchmarks.disk`): the
        part of the p50 limit that no code can take back."""
        return disk.probe(self.dir / "disk", count=self.s.disk_probes)

    # --- the gateway's own record ----------------------------------------------------------

    async def scrape(self) -> dict[str, float]:
        return await scrape(self.servers["gateway"])

    # --- shut-down --------------------------------------------------------------------------

    def stop(self) -> dict[str, Any]:
        codes: dict[str, Any] = {}
        for name in ("gateway", "floor", *BARE, "nginx", "stub"):
            if name in self.servers:
                codes[name] = self.servers[name].stop()
        return codes

    def audit_check(self, server: str = "gateway") -> dict[str, Any]:
        """`server`'s audit files (one a worker): records, and every chain verified."""
        return audit_summary(self.dir / server / "audit")

    def minimum_check(self) -> dict[str, Any]:
        """The contract minimum's audit files, checked as the gateway's are."""
        checked = self.audit_check(MINIMUM)
        return {"minimum_records": checked["records"], "minimum_chains_ok": checked["chains_ok"]}

    def contract_records(self) -> dict[str, Any]:
        """The lines the floor with the contract's audit I/O wrote: two a deactivation."""
        files = sorted((self.dir / CONTRACT / "audit").glob("*.jsonl"))
        return {"files": len(files), "records": sum(map(_lines, files))}

    def mints(self, elapsed_s: float) -> dict[str, Any]:
        minted = peers.gateway_log_events(self.servers["gateway"].log, "token.minted")
        per_worker: dict[str, int] = {}
        for record in minted:
            key = f"worker {record.get('worker', 0)}, app {record.get('app')}"
            per_worker[key] = per_worker.get(key, 0) + 1
        period = peers.TOKEN_TTL_S - min(peers.RENEW_BEFORE_S, peers.TOKEN_TTL_S / 2)
        allowed = 1 + int(elapsed_s // period)  # per worker and app
        over = sum(max(0, n - allowed) for n in per_worker.values())
        per_10k = len(minted) / self.gateway_requests * 10_000 if self.gateway_requests else None
        return {"mints": len(minted), "by_worker_and_app": per_worker,
                "requests": self.gateway_requests, "per_10k": _round(per_10k, 3),
                "renewal_period_s": period, "elapsed_s": round(elapsed_s, 1),
                "allowed_per_worker_and_app": allowed, "over_allowed": over}


def verify_chains(directory: Path) -> dict[str, VerifyReport]:
    """Each chain of the `*.jsonl` files in `directory`, by its current file's name: the
    current file verified with the files rotated before it (`{stem}.{n:06d}{suffix}`), whose
    first record continues the previous file's chain and does not verify on its own."""
    return {f.name: verify_files(rotated_files(f)) for f in sorted(directory.glob("*.jsonl"))
            if log_name(f) == f.name}  # (a rotated file's log name is its current file's)


def audit_summary(directory: Path) -> dict[str, Any]:
    """The audit files in `directory`, their records, and each chain verified
    (`verify_chains`)."""
    reports = verify_chains(directory)
    return {"files": len(list(directory.glob("*.jsonl"))),
            "records": sum(r.records for r in reports.values()),
            "records_by_file": {name: r.records for name, r in reports.items()},
            "chains_ok": bool(reports) and all(r.ok for r in reports.values()),
            "errors": [r.error for r in reports.values() if not r.ok]}


async def scrape(server: Server) -> dict[str, float]:
    """A gateway's /metrics (every worker's, merged), or {} when it has none."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with (aiohttp.ClientSession(timeout=timeout) as session,
                session.get(server.url + "/metrics") as resp):
        return peers.parse_metrics(await resp.text()) if resp.status == 200 else {}


def per_commit(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Audit records made durable per group commit (write + fsync) between two scrapes."""
    commits = after.get(BATCH_METRIC + "_count", 0.0) - before.get(BATCH_METRIC + "_count", 0.0)
    records = after.get(BATCH_METRIC + "_sum", 0.0) - before.get(BATCH_METRIC + "_sum", 0.0)
    return round(records / commits, 2) if commits > 0 else None


def _lines(path: Path) -> int:
    """Newlines in a file, read a MiB at a time (a full run writes a few hundred MB)."""
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _static_jwt(creds: peers.Credentials) -> str:
    """What the peer pastes into its config: one long-lived token, never renewed."""
    now = int(time.time())
    claims = {"appId": creds.client_id, "sub": "nginx-static", "iat": now, "exp": now + 86_400}
    return jwt.encode(claims, creds.secret, algorithm="HS256", headers={"typ": "JWT"})


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


async def run(settings: Settings, *, keep: bool = False) -> dict[str, Any]:
    load.require_wrk()
    with _run_dir(keep) as directory:
        bench = Bench(settings, directory)
        if not bench.with_peer:
            print(f"nginx is not installed ({load.INSTALL_HINT}): the sandbox is the stub and "
                  "there is no peer to compare with", flush=True)
        began, load_at_start = time.monotonic(), os.getloadavg()[0]
        try:
            ready = await bench.start()
            gw = bench.servers["gateway"]
            workers = gw.workers()
            supervisor_rss = None if workers == [gw.proc.pid] else _rss_mib(gw.proc.pid)
            scrapes = [await bench.scrape()]
            saturation = await asyncio.to_thread(bench.saturate)
            scrapes.append(await bench.scrape())
            disk_before = await asyncio.to_thread(bench.disk_probe)
            latency = await bench.latency()
            scrapes.append(await bench.scrape())
            disk_after = await asyncio.to_thread(bench.disk_probe)
            elapsed = time.monotonic() - gw.started
            mints = bench.mints(elapsed)
            mints["mints_from_metrics"] = scrapes[-1].get(MINTS_METRIC)
        finally:
            codes = bench.stop()
        audit = {**bench.audit_check(), "contract_io": bench.contract_records(),
                 **bench.minimum_check(),
                 "records_per_commit_saturation": per_commit(scrapes[0], scrapes[1]),
                 f"records_per_commit_{settings.rate:g}_rps": per_commit(scrapes[1], scrapes[2])}
        results = _figures(settings, bench, ready, saturation, latency, mints, audit, codes,
                           workers, supervisor_rss, directory)
        results["disk"] = {"before_paced": disk_before, "after_paced": disk_after,
                           "gap_ms": disk.PROBE_GAP_S * 1000, "line_bytes": disk.LINE_BYTES}
        results["duration_s"] = round(time.monotonic() - began, 1)
        results["machine"]["loadavg_1m_at_start"] = round(load_at_start, 2)
        return results



def _figures(settings: Settings, bench: Bench, ready: dict[str, Any],
             saturation: dict[str, Saturation], latency: dict[str, dict[str, Any]],
             mints: dict[str, Any], audit: dict[str, Any], codes: dict[str, Any],
             workers: list[int], supervisor_rss: float | None, directory: Path
             ) -> dict[str, Any]:
    gw = saturation["gateway"]
    sat: dict[str, Any] = {name: saturation[name].figures() if name in saturation else {}
                           for name in ("gateway", *PEERS, *BARE)}
    cpu: dict[str, Any] = {name: saturation[name].cpu_us() if name in saturation else None
                           for name in ("gateway", *PEERS, *BARE)}
    for peer in PEERS:
        sat[f"ratio_{peer}"] = _ratio(sat["gateway"]["rps"], sat[peer].get("rps"))
        cpu[f"ratio_{peer}"] = _ratio(cpu["gateway"], cpu[peer], 2)
    # the contract's audit I/O alone, and every duty barest, on the targets' scale (÷ the floor)
    for name in BARE:
        sat[f"{name}_ratio_floor"] = _ratio(sat[name].get("rps"), sat["floor"].get("rps"))
        cpu[f"{name}_ratio_floor"] = _ratio(cpu[name], cpu["floor"], 2)
    gw_rss = [round(gw.rss_peak.get(pid, 0) / MIB, 1) for pid in workers]
    rss: dict[str, Any] = {"gateway_workers": gw_rss,
                           "gateway_worker_max": max(gw_rss, default=0.0),
                           "gateway_supervisor": supervisor_rss}
    for peer in (*PEERS, *BARE):
        peaks = [round(b / MIB, 1) for b in saturation[peer].rss_peak.values()] \
            if peer in saturation else []
        rss[f"{peer}_workers"], rss[f"{peer}_worker_max"] = peaks, max(peaks, default=None)
    results: dict[str, Any] = {
        "label": settings.label,
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(directory),
        "settings": {**settings.__dict__, "stub": bench.kind, "peer": bench.with_peer},
        "saturation": sat,
        "cpu_us_per_request": cpu,
        "latency_200": _latency_figures(latency),
        "rss_mib": rss,
        "ready_s": ready,
        "jwt": mints,
        "audit": audit,
        "exit_codes": codes,
    }
    results["targets"] = targets(results)
    return results


def _latency_figures(latency: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each target's p50/p99, and what each adds over the stub and the gateway over the floor."""
    lat: dict[str, Any] = {**latency}
    lat.setdefault("nginx", {})
    direct, floor, gw = latency["direct"], latency["floor"], latency["gateway"]
    for q in ("p50", "p99"):
        lat[f"added_{q}_ms"] = _round(gw[f"{q}_ms"] - direct[f"{q}_ms"], 3)
        lat[f"floor_added_{q}_ms"] = _round(floor[f"{q}_ms"] - direct[f"{q}_ms"], 3)
        lat[f"over_floor_{q}_ms"] = _round(gw[f"{q}_ms"] - floor[f"{q}_ms"], 3)
        for name in BARE:
            bare = latency[name][f"{q}_ms"]
            lat[f"{name}_added_{q}_ms"] = _round(bare - direct[f"{q}_ms"], 3)
            lat[f"{name}_over_floor_{q}_ms"] = _round(bare - floor[f"{q}_ms"], 3)
        if "nginx" in latency:
            lat[f"nginx_added_{q}_ms"] = _round(latency["nginx"][f"{q}_ms"]
                                                - direct[f"{q}_ms"], 3)
    return lat


def _rss_mib(pid: int) -> float:
    from benchmarks.procs import rss_bytes

    return round(rss_bytes(pid) / MIB, 1)


def _machine(directory: Path) -> dict[str, Any]:
    def version(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return None
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[0] if lines else None

    return {
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "kernel": platform.release(),
        "nginx": version([nginx_binary() or "nginx", "-v"]),
        "wrk": version(["wrk", "-v"]),
        "audit_fs": version(["stat", "-f", "-c", "%T", str(directory)]),
        "uvloop_installed": _installed("uvloop"), "orjson_installed": _installed("orjson"),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine
    }


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@contextmanager
def _run_dir(keep: bool) -> Iterator[Path]:
    if keep:
        path = Path(tempfile.mkdtemp(prefix="kgw-bench-"))
        print(f"run directory (kept): {path}", flush=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kgw-bench-") as name:
        yield Path(name)
