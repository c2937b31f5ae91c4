"""A real OpenAPI client checks the document: schemathesis (`--checks all`) generates requests
from a live gateway's `GET /openapi.json` (the real gateway in front of the real sandbox, on
loopback) and finds no failure. Bounded in examples and time, with a fixed seed."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CALLER_KEY
from tests.integration.live import live_gateway

SEED = 20261203
MAX_EXAMPLES = 25
RUN_TIMEOUT_S = 240.0  # the subprocess's own bound; a normal run takes seconds
# The contract answers a batch over `server.max_batch_items` (and a body over
# `server.max_body_bytes`) with 413; schemathesis expects a rejection from this list, which by
# default lacks 413. The rest is its default list.
CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422",
                     "428", "429", "5xx"]
"""


def schemathesis(port: int, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG, encoding="utf-8")
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
               f"http://127.0.0.1:{port}/openapi.json", "--checks", "all",
               "--header", f"Authorization: Bearer {CALLER_KEY}",
               "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
               "--generation-database", "none", "--request-timeout", "10",
               "--no-color", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          cwd=tmp_path, check=False)


@pytest.fixture
def live(make_config: Any) -> Any:
    # Caller key `crm-service` may touch `st-*`, which every botId that `bot_id_pattern`
    # (`^st-…`) lets schemathesis generate matches; a budget no run can spend.
    with live_gateway(make_config, upstream={"bot_id_pattern": "^st-[A-Za-z0-9-]{1,100}$"},
                      rate_limit={"windows": [{"calls": 1_000_000, "per_s": 1}]}) as gateway:
        yield gateway


def test_schemathesis_finds_no_failure(live: Any, tmp_path: Path) -> None:
    started = time.monotonic()
    run = schemathesis(live.port, tmp_path)
    took = time.monotonic() - started
    summary = run.stdout[run.stdout.find("FAILURES"):] if "FAILURES" in run.stdout else run.stdout
    assert run.returncode == 0, summary[-6000:] + run.stderr[-2000:]
    assert "6 selected / 6 total" in run.stdout, run.stdout[-3000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert counts and counts[1] == counts[2] and int(counts[1]) >= 100, run.stdout[-3000:]
    assert "No issues found" in run.stdout
    assert took < RUN_TIMEOUT_S
