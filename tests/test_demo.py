"""`kore-gateway demo`: sandbox + gateway start together and the printed curl line works."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.ports import free_port
from gateway.audit.log import verify_files
from tests.conftest import read_records

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "config" / "demo.toml"


def demo_copy(tmp_path: Path, port: int) -> Path:
    """config/demo.toml with its own port and an audit file in tmp_path."""
    text = DEMO.read_text(encoding="utf-8")
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{port}"')
    text = re.sub(r'(?m)^path = ".*"', f'path = "{tmp_path / "audit" / "demo.jsonl"}"', text)
    path = tmp_path / "demo.toml"
    path.write_text(text, encoding="utf-8")
    return path


def read_until(proc: subprocess.Popen[str], marker: str, timeout_s: float) -> str:
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError("demo did not print its curl line:\n" + "".join(seen))


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
@pytest.mark.skipif(shutil.which("curl") is None and os.environ.get("CI") != "true",
                    reason="curl is not installed (.ci/run installs it)")
def test_printed_curl_line_closes_a_session_and_adds_two_audit_lines(tmp_path: Path) -> None:
    config = demo_copy(tmp_path, free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--config", str(config),
         "--sandbox-port", str(free_port())],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        output = read_until(proc, "curl ", timeout_s=20)
        curl = next(line.strip() for line in output.splitlines() if line.strip().startswith("curl "))
        answer = subprocess.run([*shlex.split(curl), "-s", "--max-time", "10"],
                                check=False, capture_output=True, text=True, timeout=15)
        assert answer.stdout.startswith("HTTP/1.1 200"), answer.stdout
        body = json.loads(answer.stdout.split("\n\n", 1)[1].split("\r\n\r\n")[-1])
        assert body["success"] is True and body["userId"] == "u-1001"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 0
    audit = tmp_path / "audit" / "demo.jsonl"
    assert [r["event"] for r in read_records(audit)] == ["deactivate.requested",
                                                        "deactivate.completed"]
    assert verify_files([audit]).ok
