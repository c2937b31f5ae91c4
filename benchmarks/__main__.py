"""`python -m benchmarks`: the gateway against nginx on loopback, in one bounded run.

Needs wrk and nginx (`apt-get install -y wrk nginx`; without nginx the sandbox is the stub and
there is no peer) and matplotlib (`pip install -e '.[bench]'`). Writes
`docs/benchmarks/<label>.json|.md|.png` and, for the label `latest`, the figures block of
`docs/benchmarks.md`. `--smoke` is a seconds-long run with a tiny load, for CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import report
from benchmarks.harness import Settings, run

REPO = Path(__file__).resolve().parent.parent
SMOKE = {"connections": 4, "saturation_s": 1.0, "warmup_s": 1.0, "rounds": 1, "rate": 50.0,
         "latency_s": 1.0, "disk_probes": 20}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    d = Settings()
    parser.add_argument("--workers", type=int, default=d.workers,
                        help="worker processes of the gateway and of nginx (default %(default)s)")
    parser.add_argument("--connections", type=int, default=d.connections,
                        help="wrk connections (default %(default)s)")
    parser.add_argument("--saturation-s", type=float, default=d.saturation_s,
                        help="seconds of each wrk round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=d.rounds,
                        help="rounds of each phase, targets alternating (default %(default)s)")
    parser.add_argument("--rate", type=float, default=d.rate,
                        help="req/s of the latency phase (default %(default)s)")
    parser.add_argument("--latency-s", type=float, default=d.latency_s,
                        help="seconds of each latency round per target (default %(default)s)")
    parser.add_argument("--stub", choices=("auto", "nginx", "sandbox"), default=d.stub,
                        help="upstream stub (auto: nginx when installed)")
    parser.add_argument("--label", default=d.label, help="output name (default %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks",
                        help="output directory (default docs/benchmarks)")
    parser.add_argument("--no-readme", action="store_true",
                        help="leave docs/benchmarks.md alone (it is updated for the label 'latest')")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run with a tiny load (CI); implies --no-readme")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, audit)")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    chosen = {"workers": args.workers, "connections": args.connections,
              "saturation_s": args.saturation_s, "rounds": args.rounds, "rate": args.rate,
              "latency_s": args.latency_s, "stub": args.stub, "label": args.label}
    if args.smoke:
        chosen.update(SMOKE)
    return Settings(**chosen)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1 or args.rounds < 1 or args.rate <= 0:
        print("--workers and --rounds must be at least 1, --rate positive", file=sys.stderr)
        return 2
    settings = settings_from(args)
    results = asyncio.run(run(settings, keep=args.keep))
    paths = report.write(results, args.out)
    print(report.markdown(results))
    print("\n".join(f"wrote {p}" for p in paths.values()))
    if settings.label == "latest" and not (args.no_readme or args.smoke):
        page = REPO / "docs" / "benchmarks.md"
        png = paths["png"]
        image = png.relative_to(page.parent) if png.is_relative_to(page.parent) else png
        if report.update_readme(page, report.markdown(results), str(image)):
            print(f"updated the figures block of {page.relative_to(REPO)}")
    if not results["audit"]["chains_ok"] or results["exit_codes"].get("gateway") != 0:
        print("the gateway did not shut down cleanly or an audit chain is broken: "
              + json.dumps({"audit": results["audit"], "exit": results["exit_codes"]}),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
