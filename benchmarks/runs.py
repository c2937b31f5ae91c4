"""`python -m benchmarks.runs [DIR]`: every kept harness run with the contract's peers, in one view.

A harness run meets a timed target or misses it by a margin that this shared host moves from
one run to the next, so one run settles little. This reads every run a directory keeps
(`docs/benchmarks` by default: each `.json` that `python -m benchmarks` wrote with the floor +
audit I/O and the contract minimum beside the gateway) and prints, oldest first:

- each run's four timed targets: the gateway's figure, the contract minimum's and the floor +
  audit I/O's (the contract's audit writes alone), with the floor's own p50 and, for runs that
  timed it (`benchmarks.disk`), the audit disk's own fsync p50 before and after the paced phase;
- for each target, in how many runs each of the three met the limit, and the medians;
- for p50, the gateway's distance to the contract minimum (what the gateway does beyond the
  contract's barest form), against what the limit leaves it once the minimum is paid, over
  every run and over the runs of the faster and the slower half of the host's windows (by the
  floor's own p50).

Reads files only; starts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import within

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
TIMED = ("cpu_ratio_floor", "throughput_ratio_floor", "over_floor_p50_ms", "over_floor_p99_ms")
HEADS = {"cpu_ratio_floor": "CPU ÷ floor", "throughput_ratio_floor": "throughput ÷ floor",
         "over_floor_p50_ms": "p50 over floor (ms)", "over_floor_p99_ms": "p99 over floor (ms)"}
P50 = "over_floor_p50_ms"
SERVERS = ("gateway", "minimum", "audit_io")  # the fields of a `Figure`, in the tables' order
SUMMARY_HEAD = ("| target | limit | gateway met | minimum met | audit I/O met "
                "| medians: gateway / minimum / audit I/O |")
BUDGET_HEAD = ("p50: the gateway over the contract minimum, against what the limit leaves once "
               "the minimum is paid (limit − minimum; ms):")


@dataclass(frozen=True)
class Figure:
    """One timed target of one run: the three servers' figures and the target's limit."""

    gateway: float
    minimum: float
    audit_io: float
    limit: float
    kind: str  # "max" or "min"

    def met(self, value: float) -> bool:
        return within(value, self.limit, self.kind)


@dataclass(frozen=True)
class Run:
    """One harness run: when, its label, the floor's own p50 and the four timed targets."""

    when: str
    label: str
    floor_p50_ms: float
    figures: dict[str, Figure]
    fsync_p50_ms: tuple[float, float] | None = None  # the disk alone, before and after paced


def load_runs(directory: Path) -> list[Run]:
    """The harness runs in `directory` that timed the contract's two peers, oldest first."""
    runs = []
    for path in directory.glob("*.json"):  # (sorted by run below)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        run = _run(data) if isinstance(data, dict) else None
        if run is not None:
            runs.append(run)
    return sorted(runs, key=lambda run: (run.when, run.label))


def _run(data: dict[str, Any]) -> Run | None:
    targets = {t.get("key"): t for t in data.get("targets") or () if isinstance(t, dict)}
    try:
        figures = {key: Figure(float(targets[key]["value"]),
                               float(targets[key]["contract_minimum"]),
                               float(targets[key]["contract_io"]),
                               float(targets[key]["limit"]), str(targets[key]["kind"]))
                   for key in TIMED}
        floor_p50 = float(data["latency_200"]["floor"]["p50_ms"])
    except (KeyError, TypeError, ValueError):  # another tool's file, or a run before the peers
        return None
    return Run(str(data.get("when", "")), str(data.get("label", "")), floor_p50, figures,
               _fsync_p50(data.get("disk")))


def _fsync_p50(probed: Any) -> tuple[float, float] | None:
    """The disk's fsync p50 before and after the paced phase, if the run timed it."""
    try:
        return (float(probed["before_paced"]["p50_ms"]), float(probed["after_paced"]["p50_ms"]))
    except (KeyError, TypeError, ValueError):
        return None


def report(runs: Sequence[Run]) -> str:
    if not runs:
        return "no harness run with the contract's peers found\n"
    lines = [*_per_run(runs), "", f"{len(runs)} runs. Limits met, and the medians:", "",
             *_limits_met(runs), "", BUDGET_HEAD, "", *_p50_budget(runs)]
    return "\n".join(lines) + "\n"


def _per_run(runs: Sequence[Run]) -> list[str]:
    heads = " | ".join(f"{HEADS[key]}: gateway / minimum / audit I/O" for key in TIMED)
    lines = [f"| run | when | floor p50 (ms) | disk fsync p50, before / after (ms) | {heads} |",
             "|---|---|---:|---:|" + "---:|" * len(TIMED)]
    for run in runs:
        cells = " | ".join(_triple(run.figures[key]) for key in TIMED)
        fsync = "–" if run.fsync_p50_ms is None else "{:.3f} / {:.3f}".format(*run.fsync_p50_ms)
        lines.append(f"| `{run.label}` | {run.when} | {run.floor_p50_ms:.3f} | {fsync} | {cells} |")
    return lines


def _limits_met(runs: Sequence[Run]) -> list[str]:
    lines = [SUMMARY_HEAD, "|---|---:|---:|---:|---:|---:|"]
    for key in TIMED:
        figures = [run.figures[key] for run in runs]
        first = figures[0]
        sign = "≤" if first.kind == "max" else "≥"
        counts = " | ".join(f"{sum(f.met(getattr(f, who)) for f in figures)} of {len(runs)}"
                            for who in SERVERS)
        medians = " / ".join(f"{statistics.median(getattr(f, who) for f in figures):.3f}"
                             for who in SERVERS)
        lines.append(f"| {HEADS[key]} | {sign} {first.limit:g} | {counts} | {medians} |")
    return lines


def _p50_budget(runs: Sequence[Run]) -> list[str]:
    """The gateway over the minimum at p50, and the room left, over all runs and each half."""
    ordered = sorted(runs, key=lambda run: run.floor_p50_ms)
    half = len(ordered) // 2
    groups = [("every run", ordered)]
    if half:
        groups += [(f"the faster half (floor p50 ≤ {ordered[half - 1].floor_p50_ms:.3f} ms)",
                    ordered[:half]),
                   (f"the slower half (floor p50 ≥ {ordered[half].floor_p50_ms:.3f} ms)",
                    ordered[half:])]
    lines = []
    for name, group in groups:
        beyond = [r.figures[P50].gateway - r.figures[P50].minimum for r in group]
        left = [r.figures[P50].limit - r.figures[P50].minimum for r in group]
        lines.append(f"- {name}, {len(group)} runs: the gateway is "
                     f"{statistics.median(beyond):+.3f} over the minimum (median; "
                     f"{min(beyond):+.3f} to {max(beyond):+.3f}); the limit leaves "
                     f"{statistics.median(left):+.3f} (median; {min(left):+.3f} to "
                     f"{max(left):+.3f})")
    return lines


def _triple(figure: Figure) -> str:
    return " / ".join(("**{:.3f}**" if figure.met(value) else "{:.3f}").format(value)
                      for value in (getattr(figure, who) for who in SERVERS))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runs",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("directory", nargs="?", type=Path, default=DEFAULT_DIR,
                        help="where the harness runs are kept (default docs/benchmarks)")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"{args.directory}: not a directory")
    sys.stdout.write(report(load_runs(args.directory)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
