"""`kore-gateway deactivate` as an operator runs it: a real subprocess against the real gateway
and sandbox on loopback; Ctrl-C in the middle of a CSV, then a rerun that finishes it."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BOT, CALLER_KEY

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 30.0


async def start_bulk(url: str, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "KORE_GATEWAY_KEY": CALLER_KEY}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "deactivate", "--url", url, *args, cwd=REPO, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def results(path: Path) -> list[list[str]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "a torn last row"
    return list(csv.reader(text.splitlines()))


@pytest.fixture
async def url(gateway: Any) -> str:
    return str(gateway.make_url("")).rstrip("/")


async def test_single_user(url: str, sandbox: Any, tmp_path: Path) -> None:
    proc = await start_bulk(url, "--bot", BOT, "--user", "u-42", "--channel", "rtm",
                            "--results", str(tmp_path / "r.csv"))
    code, out, err = await finish(proc)
    assert code == 0, err
    [call] = sandbox.calls
    assert call.body == {"userId": "u-42", "status": "inactive", "channel": "rtm"}
    assert f"{BOT} u-42 rtm: succeeded (ok), requestId {call.headers['X-Request-ID']}" in out
    assert results(tmp_path / "r.csv")[1] == [BOT, "u-42", "rtm", "succeeded", "ok",
                                              call.headers["X-Request-ID"]]
    assert CALLER_KEY not in out + err


async def test_sigint_mid_run_then_a_rerun_completes_the_rest(
        url: str, sandbox: Any, tmp_path: Path) -> None:
    sandbox.faults.latency_ms = 60
    users = [f"u-{i}" for i in range(40)]
    source = tmp_path / "users.csv"
    source.write_text("botId,userId\n" + "".join(f"{BOT},{u}\n" for u in users),
                      encoding="utf-8")
    path = tmp_path / "users.csv.results.csv"  # the default next to the CSV
    proc = await start_bulk(url, "--csv", str(source), "--concurrency", "2")
    deadline = time.monotonic() + WAIT_S
    while not (path.exists() and path.read_text(encoding="utf-8").count("\n") >= 6):
        assert proc.returncode is None and time.monotonic() < deadline
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    code, out, err = await finish(proc)
    assert code == 130, err
    assert "stopped: SIGINT" in err and "Traceback" not in err
    header, *rows = results(path)
    assert header == ["botId", "userId", "channel", "status", "code", "requestId"]
    assert all(len(r) == 6 and r[3] in ("succeeded", "not_done") for r in rows)
    first_done = {r[1] for r in rows if r[3] == "succeeded"}
    assert 5 <= len(first_done) < len(users)
    calls_before = len(sandbox.calls)

    proc = await start_bulk(url, "--csv", str(source), "--concurrency", "4")
    code, out, err = await finish(proc)
    assert code == 0, err
    assert f"{len(first_done)} skipped as already done" in out
    assert "deactivate: " in err and " done, 0 failed" in err  # plain progress, not a TTY
    again = [c.body["userId"] for c in sandbox.calls[calls_before:]]
    assert not set(again) & first_done, "a row done in the first run was sent again"
    assert sorted(again) == sorted(set(users) - first_done)
    final = {r[1]: r[3] for r in results(path)[1:]}
    assert final == dict.fromkeys(users, "succeeded")
