"""Rotation without restart on a real `kore-gateway serve` process: SIGHUP (or the file watch)
brings new callers and a rotated client secret into service, and a broken config is refused
while the running one keeps serving."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from benchmarks.ports import free_port
from gateway.auth import hash_key
from gateway.sandbox.server import SandboxApp
from tests.conftest import (
    BOT,
    CALLER_KEY,
    CLIENT_ID,
    CLIENT_SECRET,
    base_settings,
    merge,
    write_config,
)
from tests.integration.test_crash import wait_healthy

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")

REPO = Path(__file__).resolve().parents[2]
NEW_KEY = "kgw_test_rotated_in_caller_key"
NEW_SECRET = "rotated-secret-for-sandbox-only-987654321"
WAIT_S = 20.0  # generous: a loaded 2-core machine starts Python workers slowly


class Served:
    """A `kore-gateway serve` subprocess, its config file and its JSON log lines."""

    def __init__(self, tmp_path: Path, sandbox_url: str, *extra: str) -> None:
        self.dir = tmp_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = tmp_path / "kore-secret.txt"
        self.secret.write_text(CLIENT_SECRET + "\n", encoding="utf-8")
        settings = merge(base_settings(tmp_path, sandbox_url),
                         {"server": {"listen": f"127.0.0.1:{self.port}", "drain_s": 2}})
        settings["apps"][0].pop("client_secret")
        settings["apps"][0]["client_secret_file"] = self.secret.name
        self.settings = settings
        self.path = write_config(tmp_path, settings)
        self.log = tmp_path / "serve.log"
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.path), *extra],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def rewrite(self, **tables: Any) -> None:
        self.settings = merge(self.settings, tables)
        write_config(self.dir, self.settings)

    def add_caller(self) -> None:
        self.rewrite(callers=[*self.settings["callers"], {
            "name": "rotated-in", "key_sha256": hash_key(NEW_KEY), "bots": ["st-*"]}])

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = self.log.read_text(encoding="utf-8").splitlines()
        return [e for e in map(_json, lines) if e.get("event") == name]

    async def wait_for(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT_S
        while len(found := self.events(name)) < count:
            assert self.proc.poll() is None, f"serve exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"no {name} line in time:\n{self.tail()}"
            await asyncio.sleep(0.05)
        return found

    def hangup(self) -> None:
        os.kill(self.proc.pid, signal.SIGHUP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT_S)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(encoding="utf-8").splitlines()[-20:])


def _json(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@pytest.fixture
async def serve(tmp_path: Path, sandbox: Any) -> AsyncIterator[Callable[..., Any]]:
    started: list[Served] = []

    async def start(*extra: str) -> Served:
        served = Served(tmp_path, sandbox.url, *extra)
        started.append(served)
        await wait_healthy(served.url, served.proc, timeout_s=WAIT_S)
        await served.wait_for("gateway.listening",
                              count=int(extra[extra.index("--workers") + 1])
                              if "--workers" in extra else 1)
        return served

    yield start
    for served in started:
        served.stop()


async def deactivate(url: str, key: str, user: str = "u-1", *, fresh: bool = False) -> int:
    connector = aiohttp.TCPConnector(force_close=fresh)
    async with aiohttp.ClientSession(connector=connector) as session, session.post(
            f"{url}/v1/bots/{BOT}/sessions/deactivate", json={"userId": user},
            headers={"Authorization": f"Bearer {key}"}) as resp:
        return resp.status


async def test_sighup_brings_a_new_caller_key_into_service(serve: Any) -> None:
    """…and a restart-only setting changed alongside is reported and kept."""
    served = await serve()
    assert await deactivate(served.url, NEW_KEY) == 401
    served.add_caller()
    served.rewrite(server={"listen": f"127.0.0.1:{free_port()}"})
    served.hangup()
    [line] = await served.wait_for("config.reloaded")
    assert line["callers_added"] == ["rotated-in"]
    [kept] = served.events("config.restart_required")
    assert kept["keys"] == ["server.listen"] and kept["level"] == "warning"
    assert await deactivate(served.url, NEW_KEY) == 200  # still on the old port
    assert await deactivate(served.url, CALLER_KEY) == 200


async def test_sighup_rotates_the_client_secret_file(serve: Any, sandbox: Any) -> None:
    served = await serve()
    assert await deactivate(served.url, CALLER_KEY, "before") == 200  # a token is now cached
    sandbox.emulator.set_apps([SandboxApp(client_id=CLIENT_ID, key=NEW_SECRET)])
    served.secret.write_text(NEW_SECRET + "\n", encoding="utf-8")
    served.hangup()
    [line] = await served.wait_for("config.reloaded")
    assert line["apps_changed"] == ["sessions"]
    assert await deactivate(served.url, CALLER_KEY, "after") == 200
    before, after = sandbox.calls
    assert (before.status, after.status) == (200, 200)  # the old token was never sent again
    jwt.decode(after.headers["auth"], NEW_SECRET, algorithms=["HS256"])
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(after.headers["auth"], CLIENT_SECRET, algorithms=["HS256"])
    log = served.log.read_text(encoding="utf-8")
    assert NEW_SECRET not in log and CLIENT_SECRET not in log


async def test_broken_config_is_refused_and_the_old_one_keeps_serving(serve: Any) -> None:
    served = await serve()
    served.add_caller()
    served.rewrite(apps=[{**served.settings["apps"][0], "client_secret_file": "gone.txt"}])
    served.hangup()
    [line] = await served.wait_for("config.reload_failed")
    assert line["level"] == "error" and line["file"] == str(served.path)
    assert line["keys"] == ["apps[0].client_secret_file"]
    assert "gone.txt" in line["problems"][0]
    assert not served.events("config.reloaded")
    assert await deactivate(served.url, CALLER_KEY) == 200  # old callers, old secret
    assert await deactivate(served.url, NEW_KEY) == 401  # nothing of the broken file


async def test_supervisor_forwards_sighup_to_every_worker(serve: Any) -> None:
    served = await serve("--workers", "2")
    served.add_caller()
    served.hangup()
    lines = await served.wait_for("config.reloaded", count=2)
    assert sorted(line["worker"] for line in lines) == [0, 1]
    statuses = [await deactivate(served.url, NEW_KEY, f"u-{i}", fresh=True) for i in range(12)]
    assert statuses == [200] * 12


async def test_watch_config_reloads_without_a_signal(serve: Any) -> None:
    served = await serve("--watch-config", "0.2")
    served.add_caller()
    [line] = await served.wait_for("config.reloaded")
    assert line["callers_added"] == ["rotated-in"]
    assert await deactivate(served.url, NEW_KEY) == 200
