"""`python -m benchmarks.paced`: the harness's paced phase alone, the contract minimum with the
gateway's two kept behaviours beside it. A real run with a tiny load (the figures are not
judged: a CI machine is too noisy), and the report's verdicts against the limits."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import paced

REPO = Path(__file__).resolve().parent.parent


def test_a_short_run_measures_every_target(tmp_path: Path) -> None:
    out = tmp_path / "paced.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.paced", "--workers", "1", "--rounds", "1",
         "--seconds", "0.5", "--warmup-s", "0", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in paced.TARGETS:  # 200 req/s for 0.5 s, every one answered with success
        assert result[name]["samples"] == 100 and result[name]["failed"] == 0, name
        assert result[name]["p50_ms"] > 0, name
    for name in ("minimum", "minimum_kept", "gateway"):
        assert result[name]["over_floor_p50_ms"] == round(
            result[name]["p50_ms"] - result["floor"]["p50_ms"], 3)
    assert "| contract minimum + kept behaviours |" in done.stdout
    assert done.stdout.startswith("Paced 200 req/s, 1 round of 0.5 s a target in turns, "
                                  "1 worker each:")


def test_the_report_judges_each_target_against_the_limits() -> None:
    args = argparse.Namespace(workers=2, rate=200.0, seconds=5.0, rounds=3, warmup_s=2.0)
    samples = {"floor": [1.0] * 10, "minimum": [1.4] * 10, "minimum_kept": [1.5] * 10,
               "gateway": [1.6] * 9 + [3.0]}
    result = paced.figures(samples, dict.fromkeys(paced.TARGETS, 0), args)
    assert result["gateway"]["over_floor_p50_ms"] == 0.6
    assert result["gateway"]["over_floor_p99_ms"] == 2.0
    text = paced.report(result)
    assert text.startswith("Paced 200 req/s, 3 rounds of 5 s a target in turns, 2 workers each:")
    assert "| contract minimum | 1.400 | 1.400 | +0.400 met | +0.400 met | 0 |" in text
    assert "| contract minimum + kept behaviours | 1.500 | 1.500 | +0.500 met |" in text
    assert "| gateway | 1.600 | 3.000 | +0.600 missed | +2.000 missed | 0 |" in text
