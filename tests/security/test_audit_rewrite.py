"""A rewritten audit log shows (issue 11, item 6; contract §3 "A rewrite needs a key, or shows").

The attack: rewrite record 1 (`userId`, `caller`), recompute every plain SHA-256 hash, drop the
last record. Against the real gateway process, with its JSON log read as a log shipper would:
`audit verify` fails with the chain key, and fails against the shipped `audit.anchor` lines
without it; a keyed file verified without a key is never called intact.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audit.chain import CHAIN_FIELD, HMAC_CHAIN
from gateway.audit.log import ZERO_HASH, canonical, chain_hash, rotated_files
from gateway.cli import main
from tests.conftest import read_records
from tests.faults.process import GatewayProcess, post
from tests.integration.test_crash import REPO, wait_healthy

KEY_TEXT = "audit-chain-key-" + "a7" * 24
CALLS = 8
STOP_TIMEOUT_S = 30


def verify(*argv: str | Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(["audit", "verify", *map(str, argv)])
    out, err = capsys.readouterr()
    assert KEY_TEXT not in out + err
    return int(done.value.code or 0), out + err


def rewrite(path: Path, *, keep_mark: bool) -> None:
    """Record 1 says someone else did it; every plain hash recomputed; the last record gone."""
    records = read_records(path)[:-1]
    records[0]["userId"], records[0]["caller"] = "someone-else", "narrow-service"
    if not keep_mark:
        records[0].pop(CHAIN_FIELD, None)
    prev = ZERO_HASH
    for record in records:
        record["prev"] = prev
        prev = record["hash"] = chain_hash(prev, canonical(record))
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n"
                              for r in records))


def spawn_workers(config_path: Path, workers: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_path),
         "--workers", str(workers)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Served(GatewayProcess):
    """The gateway process, stopped with SIGTERM, its stderr written out as the shipped log."""

    def __init__(self, tmp_path: Path, sandbox_url: str, workers: int = 1, **tables: Any):
        super().__init__(tmp_path, sandbox_url, **tables)
        self.workers, self.shipped = workers, tmp_path / "shipped" / "gateway.log"

    async def start(self) -> Served:
        if self.workers == 1:
            await super().start()
            return self
        self.proc = spawn_workers(self.config_path, self.workers)
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        await wait_healthy(self.url, self.proc)
        return self

    async def run(self, calls: int = CALLS) -> None:
        # A connection per call: SO_REUSEPORT spreads connections over the workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)
                                         ) as session:
            for n in range(calls):
                status, _, _ = await post(session, self.url, f"r-{n}", user_id=f"u-{n}")
                assert status == 200
        await asyncio.sleep(0.5)  # a few periodic anchors
        self.signal()
        assert await asyncio.to_thread(self.wait, STOP_TIMEOUT_S) == 0
        self.shipped.parent.mkdir(exist_ok=True)
        self.shipped.write_text("".join(self._lines), encoding="utf-8")

    def anchors(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "audit.anchor"]


@pytest.fixture
async def served(tmp_path: Path, sandbox: Any) -> AsyncIterator[Any]:
    started: list[Served] = []

    async def start(workers: int = 1, **audit: Any) -> Served:
        gateway = Served(tmp_path, sandbox.url, workers, audit={"anchor_every_s": 0.1, **audit})
        started.append(gateway)
        return await gateway.start()

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "chain.key"
    path.parent.mkdir()
    path.write_text(KEY_TEXT + "\n", encoding="utf-8")
    return path


async def test_keyed_log_verifies_with_the_key_and_anchors(
        served: Any, key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = await served(chain_key_file=str(key_file))
    await gateway.run()
    records = gateway.records()
    assert len(records) == 2 * CALLS and records[0][CHAIN_FIELD] == HMAC_CHAIN
    anchors = gateway.anchors()
    assert len(anchors) >= 2, "periodic anchors, and one at shutdown"
    assert {a["file"] for a in anchors} == {str(gateway.audit_path)}
    last = anchors[-1]
    assert (last["seq"], last["hash"]) == (records[-1]["seq"], records[-1]["hash"])
    assert all(KEY_TEXT not in line for line in gateway._lines)

    code, out = verify(gateway.audit_path, "--key-file", key_file, "--anchors", gateway.shipped,
                       capsys=capsys)
    assert code == 0 and "chain intact (HMAC checked)" in out and "anchor(s) agree" in out
    code, out = verify(gateway.audit_path, capsys=capsys)
    assert code == 3 and "UNCHECKED" in out and "cannot be checked" in out
    assert "intact" not in out


@pytest.mark.parametrize("keep_mark", [False, True], ids=["mark-removed", "mark-kept"])
async def test_full_rewrite_fails_with_the_key_and_against_the_anchors(
        served: Any, key_file: Path, capsys: pytest.CaptureFixture[str],
        keep_mark: bool) -> None:
    gateway = await served(chain_key_file=str(key_file))
    await gateway.run()
    rewrite(gateway.audit_path, keep_mark=keep_mark)

    code, out = verify(gateway.audit_path, "--key-file", key_file, capsys=capsys)
    assert code == 1 and "BROKEN" in out
    code, out = verify(gateway.audit_path, "--anchors", gateway.shipped, capsys=capsys)
    assert code == 1 and "BROKEN" in out and "anchor" in out


async def test_plain_log_rewrite_is_caught_only_by_the_anchors(
        served: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The limit of a plain chain: it proves nothing alone; the shipped anchors do."""
    gateway = await served()
    await gateway.run()
    rewrite(gateway.audit_path, keep_mark=False)
    code, out = verify(gateway.audit_path, capsys=capsys)
    assert code == 0 and "intact" in out
    code, out = verify(gateway.audit_path, "--anchors", gateway.shipped, capsys=capsys)
    # An anchor of an earlier seq disagrees, or the last one is past the end.
    assert code == 1 and ("the file was rewritten" in out or "records were removed" in out)


async def test_dropping_only_the_last_record_is_caught_by_the_anchors(
        served: Any, key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = await served(chain_key_file=str(key_file))
    await gateway.run()
    data = gateway.audit_path.read_bytes()
    gateway.audit_path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 1])
    code, _ = verify(gateway.audit_path, "--key-file", key_file, capsys=capsys)
    assert code == 0  # a truncated chain is still a valid chain …
    code, out = verify(gateway.audit_path, "--key-file", key_file, "--anchors", gateway.shipped,
                       capsys=capsys)
    assert code == 1 and f"end at seq {2 * CALLS - 1}: records were removed" in out


async def test_every_worker_keys_and_anchors_its_own_file(
        served: Any, key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = await served(workers=2, chain_key_file=str(key_file), max_bytes=2048)
    await gateway.run(calls=30)
    files = {f.name.split(".")[0]: rotated_files(f) for f in
             gateway.audit_path.parent.glob("deactivations-w?.jsonl")}
    assert sorted(files) == ["deactivations-w0", "deactivations-w1"]
    anchored = {Path(a["file"]).name for a in gateway.anchors()}
    assert anchored == {"deactivations-w0.jsonl", "deactivations-w1.jsonl"}
    for chain in files.values():
        assert all(read_records(f)[0][CHAIN_FIELD] == HMAC_CHAIN for f in chain)
        code, out = verify(*chain, "--key-file", key_file, "--anchors", gateway.shipped,
                           capsys=capsys)
        assert code == 0, out
