"""The gateway as a real process (`python -m gateway serve`), for signals, crashes and faults
of the process itself: its config, its audit file, its log lines (JSON, read from a pipe so a
file-size limit on the process never touches them) and a caller that tolerates hang-ups."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.ports import free_port
from tests.conftest import BOT, base_settings, merge, read_records, write_config
from tests.faults.kore import AUTH
from tests.integration.test_crash import REPO, wait_healthy

URL = f"/v1/bots/{BOT}/sessions/deactivate"


class GatewayProcess:
    def __init__(self, tmp_path: Path, sandbox_url: str, **tables: Any) -> None:
        self.port = free_port()
        settings = merge(base_settings(tmp_path, sandbox_url),
                         {"server": {"listen": f"127.0.0.1:{self.port}"},
                          "logging": {"format": "json"}})
        self.config_path = write_config(tmp_path, merge(settings, tables))
        self.audit_path = Path(settings["audit"]["path"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    async def start(self) -> GatewayProcess:
        self.proc = spawn(self.config_path)
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        await wait_healthy(self.url, self.proc)
        return self

    def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._lines.append(raw.decode("utf-8", "replace"))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, signum: signal.Signals = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout_s)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def events(self) -> list[dict[str, Any]]:
        """The log lines so far, parsed (JSON lines only)."""
        found = []
        for line in list(self._lines):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.audit_path)


def spawn(config_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def post(session: aiohttp.ClientSession, base: str, rid: str,
               user_id: str = "u-1") -> tuple[int | None, dict[str, Any], dict[str, str]]:
    """(status or None when the connection was cut, JSON body, headers) of one deactivation."""
    try:
        async with session.post(base + URL, json={"userId": user_id},
                                headers={**AUTH, "X-Request-ID": rid}) as resp:
            body = await resp.json(content_type=None)
            return resp.status, body, dict(resp.headers)
    except aiohttp.ClientError:
        return None, {}, {}
