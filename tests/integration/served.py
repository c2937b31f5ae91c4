"""`python -m gateway serve [--workers N]` as a real subprocess in its own process group, with
its JSON log lines read back from a file, for the admin listener and supervision tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[2]


class Served:
    def __init__(self, config_path: Path, log: Path, workers: int = 1) -> None:
        self.config_path, self.log, self.workers = config_path, log, workers
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with log.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
                 "--workers", str(workers)],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                start_new_session=True)  # its own process group: the workers go with it

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    found.append(event)
        return found

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def listening(self, count: int | None = None, timeout_s: float = 30
                        ) -> list[dict[str, Any]]:
        """The `gateway.listening` lines, once there are `count` (every worker) of them."""
        want = self.workers if count is None else count
        deadline = time.monotonic() + timeout_s
        while len(lines := self.events("gateway.listening")) < want:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, self.text()[-3000:]
            await asyncio.sleep(0.02)
        return lines

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM and a graceful drain; the whole group is killed if that hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def kill_group(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


async def fresh(method: str, url: str, **kwargs: Any) -> tuple[int | None, str]:
    """One request on its own connection, so SO_REUSEPORT may hand it to any worker;
    (None, error) when the connection fails or is cut."""
    try:
        async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                          timeout=aiohttp.ClientTimeout(total=10)) as s,
                    s.request(method, url, **kwargs) as resp):
            return resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, repr(exc)
