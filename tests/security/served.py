"""The gateway as an attacker meets it: `python -m gateway serve` in its own process, its
stdout and stderr kept whole in files (every byte it printed can be searched), its memory
readable, its descriptor limit settable; plus raw clients bound to chosen loopback addresses.

Linux treats all of 127.0.0.0/8 as loopback, so `client_address(n)` gives each simulated client
its own address without any network set-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.ports import free_port
from gateway.audit.log import rotated_files
from tests.conftest import BOT, CALLER_KEY, base_settings, merge, read_records, write_config
from tests.integration.test_crash import REPO, wait_healthy

KEYED = {"Authorization": f"Bearer {CALLER_KEY}"}
# Sets RLIMIT_NOFILE (soft and hard) to argv[1], then becomes `python argv[2:]`.
WITH_FD_LIMIT = ("import os, resource, sys; n = int(sys.argv[1]); "
                 "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); "
                 "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
URL = f"/v1/bots/{BOT}/sessions/deactivate"


def client_address(n: int) -> str:
    """A loopback address of its own for simulated client `n` (0 → 127.0.0.2, …)."""
    n += 2
    return f"127.0.{n // 250}.{n % 250 + 1}" if n >= 250 else f"127.0.0.{n}"


class Served:
    """One `serve` process with its config tables, audit, output files and memory."""

    def __init__(self, tmp_path: Path, sandbox_url: str, *, env: dict[str, str] | None = None,
                 fd_limit: int | None = None, **tables: Any) -> None:
        self.port = free_port()
        settings = merge(base_settings(tmp_path, sandbox_url),
                         {"server": {"listen": f"127.0.0.1:{self.port}"},
                          "logging": {"format": "json"}})
        self.settings = merge(settings, tables)
        self.config_path = write_config(tmp_path, self.settings, name="served.toml")
        self.audit_path = Path(self.settings["audit"]["path"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.stdout_path, self.stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        self.env = {**os.environ, **(env or {})}
        self.fd_limit = fd_limit
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> Served:
        self.proc = self.spawn()
        await wait_healthy(self.url, self.proc)
        return self

    def spawn(self) -> subprocess.Popen[bytes]:
        command = ["-m", "gateway", "serve", "--config", str(self.config_path)]
        if self.fd_limit is not None:
            command = ["-c", WITH_FD_LIMIT, str(self.fd_limit), *command]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            return subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=out,
                                    stderr=err, env=self.env)

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, and the exit code once it has drained (killed past `timeout_s`)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def output(self) -> bytes:
        """Every byte printed to stdout and stderr so far."""
        return self.stdout_path.read_bytes() + self.stderr_path.read_bytes()

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.stderr_path.read_text("utf-8", "replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def records(self) -> list[dict[str, Any]]:
        return [r for path in rotated_files(self.audit_path) for r in read_records(path)]

    def audit_bytes(self) -> int:
        return sum(path.stat().st_size for path in rotated_files(self.audit_path))

    async def metric(self, name: str) -> float:
        """The sum of every sample of `name` in /metrics (0 when absent)."""
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as resp:
            text = await resp.text()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))


async def keyed_call(session: aiohttp.ClientSession, url: str, user_id: str = "u-keyed"
                     ) -> int | None:
    """One deactivation with the valid key: its status, None when the connection failed."""
    try:
        async with session.post(url + URL, json={"userId": user_id}, headers=KEYED) as resp:
            await resp.read()
            return resp.status
    except (TimeoutError, aiohttp.ClientError):
        return None


def raise_fd_limit(wanted: int) -> None:
    """This test process needs `wanted` descriptors (sockets to the gateway)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(wanted, soft)), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
        import pytest

        pytest.skip(f"needs {wanted} file descriptors (ulimit -n)")


async def open_from(address: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length body: (status, headers, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body
