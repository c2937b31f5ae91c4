"""Results → targets, a markdown table, a PNG plot, and the figures block of docs/benchmarks.md.

`python -m benchmarks.report compare BEFORE.json AFTER.json` prints a before/after table.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

README_BEGIN = "<!-- benchmarks:begin (written by `python -m benchmarks`) -->"
README_END = "<!-- benchmarks:end -->"
PEERS = ("floor", "nginx")
CONTRACT = "floor_audit"  # the floor with the contract's audit I/O (`floor.AuditIO`)
MINIMUM = "floor_minimum"  # the floor with every per-request duty, barest (`floor.minimum`)
BARE = (CONTRACT, MINIMUM)  # the floor with part of the contract: shown beside each target

# (key, what, limit, "max" = the figure must stay at or under the limit, "min" = at or over).
# The floor is the aiohttp floor of the same run (`benchmarks/floor.py`); nginx is only shown,
# and so are the floor with the contract's audit I/O (its figure on each timed target's scale
# is the part of that target's budget the contract's disk writes take by themselves) and the
# contract minimum (every per-request duty of the contract in its barest form: the least any
# gateway bound by the contract can reach on this stack).
TARGETS: tuple[tuple[str, str, float, str], ...] = (
    ("cpu_ratio_floor", "CPU time per deactivation, gateway ÷ floor", 1.5, "max"),
    ("throughput_ratio_floor", "saturation throughput, gateway ÷ floor", 0.67, "min"),
    ("over_floor_p50_ms", "latency at 200 req/s over the floor, p50 (ms)", 0.5, "max"),
    ("over_floor_p99_ms", "latency at 200 req/s over the floor, p99 (ms)", 1.5, "max"),
    ("rss_mib_max", "RSS per worker under load (MiB)", 64.0, "max"),
    ("ready_s", "start → /readyz 200, all workers (s)", 1.5, "max"),
    ("mints_over_allowed", "JWT mints beyond one per app per renewal period", 0.0, "max"),
)


def within(value: float, limit: float, kind: str) -> bool:
    """Whether `value` meets a target's `limit`: at or under it ("max"), at or over it ("min")."""
    return value <= limit if kind == "max" else value >= limit


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    lat = results["latency_200"]
    figures = {
        "cpu_ratio_floor": results["cpu_us_per_request"].get("ratio_floor"),
        "throughput_ratio_floor": results["saturation"].get("ratio_floor"),
        "over_floor_p50_ms": lat.get("over_floor_p50_ms"),
        "over_floor_p99_ms": lat.get("over_floor_p99_ms"),
        "rss_mib_max": results["rss_mib"]["gateway_worker_max"],
        "ready_s": results["ready_s"]["gateway_all_workers"],
        "mints_over_allowed": results["jwt"]["over_allowed"],
    }
    bare = {name: {
        "cpu_ratio_floor": results["cpu_us_per_request"].get(f"{name}_ratio_floor"),
        "throughput_ratio_floor": results["saturation"].get(f"{name}_ratio_floor"),
        "over_floor_p50_ms": lat.get(f"{name}_over_floor_p50_ms"),
        "over_floor_p99_ms": lat.get(f"{name}_over_floor_p99_ms"),
    } for name in BARE}
    out = []
    for key, what, limit, kind in TARGETS:
        value = figures[key]
        met = None if value is None else within(value, limit, kind)
        out.append({"key": key, "what": what, "value": value, "limit": limit, "kind": kind,
                    "met": met, "contract_io": bare[CONTRACT].get(key),
                    "contract_minimum": bare[MINIMUM].get(key)})
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "n/a"}[met]


def markdown(results: dict[str, Any]) -> str:
    lines = [_header(results), "",
             ("| figure | gateway | aiohttp floor | floor + audit I/O | contract minimum "
              "| nginx | gateway ÷ floor | gateway ÷ nginx |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|", *_rows(results), "", _notes(results),
             "",
             ("| target | figure | limit | the contract's audit I/O alone "
              "| the contract minimum | verdict |"),
             "|---|---:|---:|---:|---:|---|"]
    for t in results["targets"]:
        sign = "≤" if t["kind"] == "max" else "≥"
        lines.append(f"| {t['what']} | {_fmt(t['value'], 3)} | {sign} {t['limit']:g} "
                     f"| {_fmt(t.get('contract_io'), 3)} | {_fmt(t.get('contract_minimum'), 3)} "
                     f"| {_verdict(t['met'])} |")
    return "\n".join(lines) + "\n"


def _header(results: dict[str, Any]) -> str:
    s, machine = results["settings"], results["machine"]
    return (f"Run `{results['label']}` at {results['when']}: {machine['cpus']} cores, "
            f"{s['workers']} worker(s) each, stub: {s['stub']}, wrk `-c{s['connections']}` "
            f"{s['rounds']}×{s['saturation_s']:g} s, paced {s['rate']:g} req/s "
            f"{s['rounds']}×{s['latency_s']:g} s per target. Load average of the machine "
            f"(1 min) {machine.get('loadavg_1m_at_start')} at the start, "
            f"{machine.get('loadavg_1m_at_end')} at the end.")


def _row(what: str, cells: Sequence[str]) -> str:
    return f"| {what} | " + " | ".join(cells) + " |"


def _rows(results: dict[str, Any]) -> list[str]:
    sat, cpu, lat = results["saturation"], results["cpu_us_per_request"], results["latency_200"]
    rss, ready, tok = results["rss_mib"], results["ready_s"], results["jwt"]
    names = ("gateway", "floor", *BARE, "nginx")
    return [
        _row(f"saturation throughput (req/s, {results['settings']['workers']} workers)",
             [_fmt(sat.get(n, {}).get("rps"), 0) for n in names]
             + [_fmt(sat.get(f"ratio_{p}")) for p in PEERS]),
        _row("CPU time per deactivation (µs)", [_fmt(cpu.get(n), 1) for n in names]
             + [_fmt(cpu.get(f"ratio_{p}")) for p in PEERS]),
        _row(f"latency at {results['settings']['rate']:g} req/s, p50 / p99 (ms)",
             [_pair(lat.get(n, {}).get("p50_ms"), lat.get(n, {}).get("p99_ms")) for n in names]
             + [_pair(lat.get("over_floor_p50_ms"), lat.get("over_floor_p99_ms"), "+"), ""]),
        _row("added over direct-to-stub, p50 / p99 (ms)",
             [_pair(lat.get(f"{pre}added_p50_ms"), lat.get(f"{pre}added_p99_ms"))
              for pre in ("", "floor_", *(f"{n}_" for n in BARE), "nginx_")] + ["", ""]),
        _row("RSS per worker under load (MiB, max)",
             [_fmt(rss.get(f"{n}_worker_max"), 1) for n in names] + ["", ""]),
        _row("start → ready (s)", [_fmt(ready["gateway_all_workers"], 3),
                                   *(_fmt(ready.get(n), 3) for n in names[1:]), "", ""]),
        _row("JWT mints per 10,000 requests",
             [_fmt(tok["per_10k"], 2), *["– (static token)"] * 4, "", ""]),
    ]


def _pair(p50: float | None, p99: float | None, sign: str = "") -> str:
    if p50 is None and p99 is None:
        return "–"
    return f"{sign}{_fmt(p50, 3)} / {sign}{_fmt(p99, 3)}"


def _notes(results: dict[str, Any]) -> str:
    s, lat, audit, tok = (results["settings"], results["latency_200"], results["audit"],
                          results["jwt"])
    paced = audit.get(f"records_per_commit_{s['rate']:g}_rps")
    contract = audit.get("contract_io") or {}
    return (f"Direct to the stub at {s['rate']:g} req/s: p50 {_fmt(lat['direct']['p50_ms'], 3)} "
            f"ms, p99 {_fmt(lat['direct']['p99_ms'], 3)} ms. Audit records per group commit "
            f"(one write + fsync): {_fmt(audit.get('records_per_commit_saturation'))} at "
            f"saturation, {_fmt(paced)} at {s['rate']:g} req/s. The floor + audit I/O (the "
            f"contract's two records a deactivation, the first fsynced before the PUT, nothing "
            f"else of the audit) wrote {_fmt(contract.get('records'))} records. The contract "
            f"minimum (the floor plus every per-request duty of the contract in its barest "
            f"form: `benchmarks/floor.py`) wrote {_fmt(audit.get('minimum_records'))} records, "
            f"their chains {_chains(audit.get('minimum_chains_ok'))}. JWT mints: "
            f"{tok['mints']} in {tok['requests']:,} requests "
            f"({tok['allowed_per_worker_and_app']} allowed per worker and app in "
            f"{tok['elapsed_s']:g} s).{_disk_note(results.get('disk'))}")


def _disk_note(probed: dict[str, Any] | None) -> str:
    """The audit disk's own fsync, before and after the paced phase (`benchmarks.disk`): every
    paced deactivation waits for one, whatever code runs around it."""
    if not probed:
        return ""
    before, after = probed.get("before_paced") or {}, probed.get("after_paced") or {}
    return (f" The audit files' disk alone (`benchmarks.disk`: a {probed.get('line_bytes')}-byte "
            f"append and its fsync, {before.get('count')} times {probed.get('gap_ms'):g} ms "
            f"apart): p50 {_fmt(before.get('p50_ms'), 3)} / p99 {_fmt(before.get('p99_ms'), 3)} "
            f"ms before the paced phase, {_fmt(after.get('p50_ms'), 3)} / "
            f"{_fmt(after.get('p99_ms'), 3)} ms after it.")


def _chains(ok: bool | None) -> str:
    return {True: "intact", False: "**broken**", None: "not checked"}[ok]


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sat, cpu, lat = results["saturation"], results["cpu_us_per_request"], results["latency_200"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    names = ["gateway", "floor", *BARE, "nginx"]
    colours = ["#3b6ea5", "#6aa53b", "#b5a33b", "#a5703b", "#999999"]
    _bars(axes[0], names, [sat.get(n, {}).get("rps") or 0 for n in names], colours,
          f"saturation throughput (req/s, {results['settings']['workers']} workers)")
    _target(axes[0], 0.67 * (sat["floor"].get("rps") or 0), "target: ≥ 0.67 × floor",
            "upper left")
    _bars(axes[1], names, [cpu.get(n) or 0 for n in names], colours,
          "CPU time per deactivation (µs)")
    _target(axes[1], 1.5 * (cpu.get("floor") or 0), "target: ≤ 1.5 × floor", "upper right")
    targets_ = ["direct", "nginx", "floor", *BARE, "gateway"]
    x = range(len(targets_))
    p50 = [lat.get(t, {}).get("p50_ms") or 0 for t in targets_]
    p99 = [lat.get(t, {}).get("p99_ms") or 0 for t in targets_]
    axes[2].bar([i - 0.2 for i in x], p50, 0.4, label="p50", color="#3b6ea5")
    axes[2].bar([i + 0.2 for i in x], p99, 0.4, label="p99", color="#a53b3b")
    for value, offset, label in ((lat["floor"].get("p50_ms"), 0.5, "p50 target"),
                                 (lat["floor"].get("p99_ms"), 1.5, "p99 target")):
        if value:
            axes[2].axhline(value + offset, color="#2a8a2a", linestyle="--", linewidth=1)
            axes[2].annotate(label, (-0.45, value + offset), fontsize=7, va="bottom")
    axes[2].set_xticks(list(x), targets_)
    axes[2].set_title(f"latency at {results['settings']['rate']:g} req/s (ms)", fontsize=10)
    axes[2].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"kore-session-gateway vs the aiohttp floor (alone, with the contract's audit "
                 f"I/O: {CONTRACT}, with every duty of the contract, barest: {MINIMUM}) and "
                 f"nginx — {results['when']}",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _target(ax: Any, value: float, label: str, where: str) -> None:
    if value > 0:
        ax.axhline(value, color="#2a8a2a", linestyle="--", linewidth=1, label=label)
        ax.legend(loc=where, fontsize=8)


def _bars(ax: Any, names: list[str], values: list[float], colours: list[str], title: str) -> None:
    bars = ax.bar(names, values, color=colours)
    ax.margins(y=0.12)
    ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:,.1f}" for v in values])
    ax.set_title(title, fontsize=10)


def write(results: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    label = results["label"]
    paths = {"json": out / f"{label}.json", "md": out / f"{label}.md",
             "png": out / f"{label}.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])
    return paths


def update_readme(readme: Path, table: str, image: str) -> bool:
    """Replaces the block between the markers; False when the page has no such block."""
    text = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.DOTALL)
    if not pattern.search(text):
        return False
    block = f"{README_BEGIN}\n{table}\n![benchmark]({image})\n{README_END}"
    readme.write_text(pattern.sub(lambda _: block, text, count=1), encoding="utf-8")
    return True


# --- before / after ------------------------------------------------------------------------

COMPARED: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("saturation throughput, gateway (req/s)", ("saturation", "gateway", "rps"), 0),
    ("saturation throughput, aiohttp floor (req/s)", ("saturation", "floor", "rps"), 0),
    ("saturation throughput, nginx (req/s)", ("saturation", "nginx", "rps"), 0),
    ("saturation throughput, floor + audit I/O ÷ floor",
     ("saturation", f"{CONTRACT}_ratio_floor"), 3),
    ("throughput ratio gateway ÷ floor", ("saturation", "ratio_floor"), 3),
    ("CPU per deactivation, gateway (µs)", ("cpu_us_per_request", "gateway"), 1),
    ("CPU per deactivation, aiohttp floor (µs)", ("cpu_us_per_request", "floor"), 1),
    ("CPU per deactivation, nginx (µs)", ("cpu_us_per_request", "nginx"), 1),
    ("CPU ratio gateway ÷ floor", ("cpu_us_per_request", "ratio_floor"), 2),
    ("CPU ratio floor + audit I/O ÷ floor", ("cpu_us_per_request", f"{CONTRACT}_ratio_floor"), 2),
    ("CPU ratio contract minimum ÷ floor", ("cpu_us_per_request", f"{MINIMUM}_ratio_floor"), 2),
    ("saturation throughput, contract minimum ÷ floor",
     ("saturation", f"{MINIMUM}_ratio_floor"), 3),
    ("latency p50 at 200 req/s, gateway (ms)", ("latency_200", "gateway", "p50_ms"), 3),
    ("latency p50 at 200 req/s, floor (ms)", ("latency_200", "floor", "p50_ms"), 3),
    ("latency p99 at 200 req/s, gateway (ms)", ("latency_200", "gateway", "p99_ms"), 3),
    ("latency p99 at 200 req/s, floor (ms)", ("latency_200", "floor", "p99_ms"), 3),
    ("gateway over floor, p50 at 200 req/s (ms)", ("latency_200", "over_floor_p50_ms"), 3),
    ("gateway over floor, p99 at 200 req/s (ms)", ("latency_200", "over_floor_p99_ms"), 3),
    ("floor + audit I/O over floor, p50 at 200 req/s (ms)",
     ("latency_200", f"{CONTRACT}_over_floor_p50_ms"), 3),
    ("floor + audit I/O over floor, p99 at 200 req/s (ms)",
     ("latency_200", f"{CONTRACT}_over_floor_p99_ms"), 3),
    ("contract minimum over floor, p50 at 200 req/s (ms)",
     ("latency_200", f"{MINIMUM}_over_floor_p50_ms"), 3),
    ("contract minimum over floor, p99 at 200 req/s (ms)",
     ("latency_200", f"{MINIMUM}_over_floor_p99_ms"), 3),
    ("RSS per worker, max (MiB)", ("rss_mib", "gateway_worker_max"), 1),
    ("start → ready, all workers (s)", ("ready_s", "gateway_all_workers"), 3),
    ("JWT mints per 10,000 requests", ("jwt", "per_10k"), 2),
)


def _dig(results: dict[str, Any], keys: Sequence[str]) -> Any:
    value: Any = results
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = [f"| figure | before (`{before['label']}`) | after (`{after['label']}`) |",
             "|---|---:|---:|"]
    for what, keys, digits in COMPARED:
        lines.append(f"| {what} | {_fmt(_dig(before, keys), digits)} "
                     f"| {_fmt(_dig(after, keys), digits)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    if len(argv) != 3 or argv[0] != "compare":
        print("usage: python -m benchmarks.report compare BEFORE.json AFTER.json",
              file=sys.stderr)
        return 2
    before, after = (json.loads(Path(p).read_text()) for p in argv[1:])
    print(compare(before, after), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
