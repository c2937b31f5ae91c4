"""Tests for gateway.cli: `python -m gateway` run as a real subprocess."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.ports import free_port
from gateway import __version__
from gateway.audit.log import AuditLog
from tests.conftest import base_settings, merge, write_config

REPO = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 30
START_TIMEOUT_S = 15
STOP_TIMEOUT_S = 15


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    env.update(extra)
    return env


def gateway(*args: str, env: dict[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, check=False,
                          env=env if env is not None else clean_env(), input=stdin,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, base_settings(tmp_path))


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    settings = merge(base_settings(tmp_path), {"server": {"lisen": "127.0.0.1:1"}})
    return write_config(tmp_path, settings, "bad.toml")


class TestVersion:
    def test_version(self) -> None:
        result = gateway("--version")
        assert result.returncode == 0
        assert result.stdout.strip() == f"kore-gateway {__version__}"

    def test_no_command_is_usage_error(self) -> None:
        result = gateway()
        assert result.returncode == 2 and "usage:" in result.stderr
        assert_no_traceback(result)


class TestHashKey:
    def test_prints_key_and_matching_digest(self) -> None:
        result = gateway("hash-key")
        assert result.returncode == 0
        key = re.search(r"caller key[^:]*: (\S+)$", result.stdout, re.MULTILINE)
        digest = re.search(r'^key_sha256 = "([0-9a-f]{64})"$', result.stdout, re.MULTILINE)
        assert key and digest, result.stdout
        assert len(key.group(1)) >= 40
        assert digest.group(1) == hashlib.sha256(key.group(1).encode()).hexdigest()

    def test_keys_differ_between_runs(self) -> None:
        assert gateway("hash-key").stdout != gateway("hash-key").stdout

    def test_stdin(self) -> None:
        result = gateway("hash-key", "--stdin", stdin="my-existing-key\n")
        assert result.returncode == 0
        expected = hashlib.sha256(b"my-existing-key").hexdigest()
        assert result.stdout.strip() == f'key_sha256 = "{expected}"'
        assert "my-existing-key" not in result.stdout

    def test_stdin_empty(self) -> None:
        result = gateway("hash-key", "--stdin", stdin="")
        assert result.returncode == 2 and "no key" in result.stderr
        assert_no_traceback(result)


class TestCheckConfig:
    def test_valid_config(self, good_config: Path) -> None:
        result = gateway("check-config", "--config", str(good_config))
        assert result.returncode == 0, result.stderr
        assert f"{good_config}: OK" in result.stdout

    def test_bad_config_names_file_and_key(self, bad_config: Path) -> None:
        result = gateway("check-config", "--config", str(bad_config))
        assert result.returncode == 2
        assert f"{bad_config}: server.lisen: unknown key" in result.stderr
        assert_no_traceback(result)

    def test_every_problem_listed(self, tmp_path: Path) -> None:
        settings = merge(base_settings(tmp_path), {"server": {"max_body_bytes": 0},
                                                  "upstream": {"max_attempts": 0}})
        path = write_config(tmp_path, settings)
        result = gateway("check-config", "--config", str(path))
        assert result.returncode == 2
        assert f"{path}: server.max_body_bytes:" in result.stderr
        assert f"{path}: upstream.max_attempts:" in result.stderr

    def test_gateway_config_env_honoured(self, good_config: Path, bad_config: Path) -> None:
        assert gateway("check-config", env=clean_env(GATEWAY_CONFIG=str(good_config))
                       ).returncode == 0
        result = gateway("check-config", env=clean_env(GATEWAY_CONFIG=str(bad_config)))
        assert result.returncode == 2 and str(bad_config) in result.stderr

    def test_config_option_wins_over_env(self, good_config: Path, bad_config: Path) -> None:
        result = gateway("check-config", "--config", str(good_config),
                         env=clean_env(GATEWAY_CONFIG=str(bad_config)))
        assert result.returncode == 0, result.stderr

    def test_no_config(self) -> None:
        result = gateway("check-config")
        assert result.returncode == 2
        assert "--config" in result.stderr and "GATEWAY_CONFIG" in result.stderr
        assert_no_traceback(result)

    def test_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "absent.toml"
        result = gateway("check-config", "--config", str(path))
        assert result.returncode == 2 and str(path) in result.stderr
        assert_no_traceback(result)

    def test_not_toml(self, tmp_path: Path) -> None:
        path = tmp_path / "gateway.toml"
        path.write_text("this is not = = toml", encoding="utf-8")
        result = gateway("check-config", "--config", str(path))
        assert result.returncode == 2 and "not valid TOML" in result.stderr
        assert_no_traceback(result)

    def test_example_config_with_its_env(self) -> None:
        example = REPO / "config" / "gateway.example.toml"
        result = gateway("check-config", "--config", str(example),
                         env=clean_env(KORE_CLIENT_SECRET="example-secret-value-0123"))
        assert result.returncode == 0, result.stderr
        assert "example-secret-value-0123" not in result.stdout + result.stderr


def write_audit_log(path: Path, count: int) -> None:
    async def write() -> None:
        log = AuditLog(path, fsync=False)
        log.open()
        for n in range(1, count + 1):
            await log.append({"event": "deactivate.denied", "requestId": f"req-{n}",
                              "botId": "st-bot", "userId": f"u-{n}", "outcome": "denied"})
        await log.close()
    asyncio.run(write())


class TestAuditVerify:
    def test_good_log(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        write_audit_log(path, 3)
        result = gateway("audit", "verify", str(path))
        assert result.returncode == 0, result.stderr
        assert "3 record(s)" in result.stdout

    def test_one_changed_byte_names_the_line(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        write_audit_log(path, 3)
        data = path.read_bytes()
        at = data.index(b'"u-2"') + 3
        path.write_bytes(data[:at] + b"9" + data[at + 1:])  # u-2 → u-9, one byte
        assert len(path.read_bytes()) == len(data)
        result = gateway("audit", "verify", str(path))
        assert result.returncode == 1
        assert f"{path}:2:" in result.stderr
        assert_no_traceback(result)

    def test_records_are_what_the_contract_chains(self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        write_audit_log(path, 2)
        prev = "0" * 64
        for seq, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            record: dict[str, Any] = json.loads(line)
            body = {k: v for k, v in record.items() if k != "hash"}
            text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            assert record["seq"] == seq and record["prev"] == prev
            assert record["hash"] == hashlib.sha256((prev + text).encode()).hexdigest()
            prev = record["hash"]

    def test_missing_file(self, tmp_path: Path) -> None:
        result = gateway("audit", "verify", str(tmp_path / "absent.jsonl"))
        assert result.returncode == 1 and "absent.jsonl" in result.stderr
        assert_no_traceback(result)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Started servers; any still running when the test ends are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def start_serve(config: Path, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    return proc


def wait_healthy(proc: subprocess.Popen[str], port: int) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate(timeout=STOP_TIMEOUT_S)
            pytest.fail(f"serve exited early with {proc.returncode}:\n{err}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                status: int = resp.status
                return status
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    pytest.fail("serve did not answer /healthz in time")


class TestServe:
    def test_serves_healthz_and_exits_0_on_sigterm(
            self, tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
        port = free_port()
        settings = merge(base_settings(tmp_path), {"server": {"listen": f"127.0.0.1:{port}",
                                                              "drain_s": 2}})
        proc = start_serve(write_config(tmp_path, settings), processes)
        assert wait_healthy(proc, port) == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_TIMEOUT_S)
        assert proc.returncode == 0, err
        assert "Traceback" not in err

    def test_unusable_audit_path_stops_the_start(
            self, tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("a regular file", encoding="utf-8")
        audit = blocker / "audit.jsonl"
        settings = merge(base_settings(tmp_path), {
            "server": {"listen": f"127.0.0.1:{free_port()}"}, "audit": {"path": str(audit)}})
        proc = start_serve(write_config(tmp_path, settings), processes)
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
        assert proc.returncode not in (0, None)
        assert str(audit) in err
        assert "Traceback" not in err + out

    def test_unusable_log_file_stops_the_start_naming_the_key(self, tmp_path: Path) -> None:
        (tmp_path / "blocker").write_text("a regular file", encoding="utf-8")
        settings = merge(base_settings(tmp_path), {
            "server": {"listen": f"127.0.0.1:{free_port()}"},
            "logging": {"file": str(tmp_path / "blocker" / "gateway.jsonl")}})
        config = write_config(tmp_path, settings)
        result = gateway("serve", "--config", str(config))
        assert result.returncode == 2
        assert f"{config}: logging.file: {tmp_path / 'blocker'}" in result.stderr
        assert_no_traceback(result)

    def test_bad_config_exits_2(self, bad_config: Path) -> None:
        result = gateway("serve", "--config", str(bad_config))
        assert result.returncode == 2 and "server.lisen: unknown key" in result.stderr
        assert_no_traceback(result)

    def test_no_config_exits_2(self) -> None:
        result = gateway("serve")
        assert result.returncode == 2 and "GATEWAY_CONFIG" in result.stderr
        assert_no_traceback(result)

    @pytest.mark.parametrize("workers", ["0", "257", "100000"])
    def test_workers_out_of_bounds_refused(self, good_config: Path, workers: str) -> None:
        result = gateway("serve", "--config", str(good_config), "--workers", workers)
        assert result.returncode == 2 and "--workers must be 1–256" in result.stderr
        assert_no_traceback(result)

    def test_port_in_use_is_a_clear_error(self, tmp_path: Path) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            settings = merge(base_settings(tmp_path), {"server": {"listen": f"127.0.0.1:{port}"}})
            result = gateway("serve", "--config", str(write_config(tmp_path, settings)))
        assert result.returncode != 0
        assert str(port) in result.stderr
        assert_no_traceback(result)
        assert "Unclosed" not in result.stderr


class TestSandbox:
    def test_sandbox_takes_its_apps_from_gateway_config(self, good_config: Path) -> None:
        """With neither --config nor --client-id, the apps come from $GATEWAY_CONFIG."""
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "sandbox", "--listen", f"127.0.0.1:{port}"],
            cwd=REPO, env=clean_env(GATEWAY_CONFIG=str(good_config)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert f"127.0.0.1:{port}" in line, line
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                assert resp.status == 200
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=STOP_TIMEOUT_S)

    def test_sandbox_on_a_taken_port_is_one_line_and_exit_2(self, good_config: Path) -> None:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            result = gateway("sandbox", "--listen", f"127.0.0.1:{port}", "--config",
                             str(good_config))
        assert result.returncode == 2
        assert f"listen error: cannot listen on 127.0.0.1:{port}: " in result.stderr
        assert_no_traceback(result)
        assert "uncaught" not in result.stderr

    def test_sandbox_off_loopback_is_refused(self, good_config: Path) -> None:
        result = gateway("sandbox", "--listen", "0.0.0.0:0", "--config", str(good_config))
        assert result.returncode == 2 and "on loopback" in result.stderr
        assert_no_traceback(result)

    def test_sandbox_without_any_app_is_a_usage_error(self) -> None:
        result = gateway("sandbox", "--listen", "127.0.0.1:0")
        assert result.returncode == 2
        assert "GATEWAY_CONFIG" in result.stderr
        assert_no_traceback(result)
