"""Tests for gateway.audit.anchors: anchors logged by a running log, found again in log files
whatever wraps them, and checked against the chain by `verify_files`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from gateway.audit import anchors as anchors_module
from gateway.audit.anchors import Anchor, Anchors, log_name, read_anchors
from gateway.audit.log import AuditLog, verify_files

H1, H2 = "1" * 64, "2" * 64


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """capture_logs sees anchor events whatever logger configuration ran before."""
    structlog.reset_defaults()
    monkeypatch.setattr(anchors_module, "log", structlog.get_logger(anchors_module.__name__))
    yield
    structlog.reset_defaults()


def anchor_line(file: str = "/var/audit/a.jsonl", seq: int = 3, digest: str = H1,
                **extra: Any) -> str:
    return json.dumps({"event": "audit.anchor", "file": file, "seq": seq, "hash": digest,
                       "timestamp": "2026-12-03T10:00:00Z", **extra})


async def written_log(path: Path, count: int) -> AuditLog:
    log = AuditLog(path)
    log.open()
    for i in range(count):
        await log.append({"event": "deactivate.requested", "requestId": f"r-{i}"})
    return log


class TestReadAnchors:
    def test_finds_anchor_lines_however_they_are_wrapped(self, tmp_path: Path) -> None:
        logs = tmp_path / "gateway.log"
        logs.write_text("\n".join([
            anchor_line(seq=1),
            "2026-12-03T10:00:00.1Z stderr F " + anchor_line(seq=2),  # a container runtime
            json.dumps({"log": anchor_line(seq=3) + "\n", "stream": "stderr"}),  # json-file
            "plain text, not JSON",
            json.dumps({"event": "gateway.started"}),
            anchor_line(seq=0),  # not a valid anchor
            anchor_line(digest="xyz"),
            json.dumps([1, 2]),
            "{broken json",
        ]) + "\n", encoding="utf-8")
        found = read_anchors([logs])
        assert [(a.seq, a.source) for a in found] == [
            (1, f"{logs}:1"), (2, f"{logs}:2"), (3, f"{logs}:3")]
        assert found[0] == Anchor("/var/audit/a.jsonl", 1, H1, f"{logs}:1",
                                  "2026-12-03T10:00:00Z")

    def test_unreadable_file_raises(self, tmp_path: Path) -> None:
        with pytest.raises(OSError):
            read_anchors([tmp_path / "absent.log"])

    @pytest.mark.parametrize(("name", "log"), [
        ("deactivations.jsonl", "deactivations.jsonl"),
        ("deactivations.000001.jsonl", "deactivations.jsonl"),
        ("deactivations-w1.000012.jsonl", "deactivations-w1.jsonl"),
        ("audit.1234567", "audit"),
    ], ids=["current", "rotated", "worker", "no-suffix"])
    def test_log_name(self, name: str, log: str) -> None:
        assert log_name(Path("/x") / name) == log


class TestVerifyAgainstAnchors:
    async def test_agreeing_anchors_are_counted(self, tmp_path: Path) -> None:
        path = tmp_path / "a.jsonl"
        log = await written_log(path, 3)
        seq, digest = await log.head()
        await log.close()
        anchors = [Anchor(f"/elsewhere/{path.name}", seq, digest),
                   Anchor("/elsewhere/other.jsonl", 1, H2)]  # another log's: ignored
        report = verify_files([path], anchors=anchors)
        assert (report.ok, report.anchors) == (True, 1)

    async def test_a_disagreeing_anchor_is_a_break(self, tmp_path: Path) -> None:
        path = tmp_path / "a.jsonl"
        await (await written_log(path, 3)).close()
        report = verify_files([path], anchors=[Anchor(str(path), 2, H1, "g.log:7", "t0")])
        assert report.error is not None and report.error.startswith(
            f"{path}:2: seq 2 has hash ") and "g.log:7 (t0) says 1111111111111111…" in (
            report.error)

    async def test_an_anchor_past_the_end_means_records_were_removed(self,
                                                                     tmp_path: Path) -> None:
        path = tmp_path / "a.jsonl"
        await (await written_log(path, 3)).close()
        report = verify_files([path], anchors=[Anchor(str(path), 4, H1, "g.log:9")])
        assert report.error == (f"{path}: the anchor at g.log:9 is for seq 4, but the files "
                                "end at seq 3: records were removed")

    async def test_anchors_naming_no_given_file_are_a_failure(self, tmp_path: Path) -> None:
        path = tmp_path / "a.jsonl"
        await (await written_log(path, 1)).close()
        report = verify_files([path], anchors=[Anchor("/x/b.jsonl", 1, H1)])
        assert report.error == f"{path}: none of the 1 anchor(s) given names a.jsonl"


class TestAnchors:
    async def test_logs_the_head_periodically_and_after_close(self, tmp_path: Path) -> None:
        log = await written_log(tmp_path / "a.jsonl", 2)
        anchors = Anchors(log, every_s=0.05)
        with capture_logs() as logs:
            anchors.start()
            await asyncio.sleep(0.3)
            await anchors.stop()
            await log.append({"event": "deactivate.denied"})
            await log.close()
            await anchors.emit()
        found = [e for e in logs if e["event"] == "audit.anchor"]
        assert len(found) >= 2 and found[0]["seq"] == 2 and found[-1]["seq"] == 3
        seq, digest = await log.head()
        assert found[-1] == {"event": "audit.anchor", "file": str(log.path), "seq": seq,
                             "hash": digest, "log_level": "info"}

    async def test_nothing_to_anchor_in_an_empty_log(self, tmp_path: Path) -> None:
        log = await written_log(tmp_path / "a.jsonl", 0)
        with capture_logs() as logs:
            await Anchors(log, every_s=60).emit()
        await log.close()
        assert logs == []

    async def test_logged_at_the_configured_level_when_above_info(self,
                                                                  tmp_path: Path) -> None:
        log = await written_log(tmp_path / "a.jsonl", 1)
        with capture_logs() as logs:
            await Anchors(log, every_s=60, level=logging.WARNING).emit()
        await log.close()
        assert [e["log_level"] for e in logs] == ["warning"]
