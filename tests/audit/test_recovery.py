"""gateway.audit.recovery: `requested` records a crash left without their terminal record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.log import AuditLog, rotated_files, verify_files
from gateway.audit.recovery import unclosed
from gateway.deactivation import RESTARTED, close_left_open, closing_record

WINDOW_S = 90.0


def record(event: str, request_id: str, ts: str = "2026-12-03T10:00:00.000000Z",
           **fields: Any) -> dict[str, Any]:
    return {"ts": ts, "seq": 0, "event": f"deactivate.{event}", "requestId": request_id,
            "caller": "crm", "route": "POST /v1/bots/{botId}/sessions/deactivate",
            "botId": "st-1", "userId": "u-1", "channel": None, "app": "sessions", **fields}


def write_lines(path: Path, records: list[dict[str, Any]], torn: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records) + torn)


def ids(found: list[dict[str, Any]]) -> list[str]:
    return [r["requestId"] for r in found]


class TestUnclosed:
    def test_requested_without_completed_are_found_oldest_first(self, tmp_path: Path) -> None:
        path = tmp_path / "a.jsonl"
        write_lines(path, [record("requested", "r1"), record("requested", "r2"),
                           record("completed", "r1"), record("denied", "r9"),
                           record("requested", "r3")])
        assert ids(unclosed(path, window_s=WINDOW_S)) == ["r2", "r3"]

    def test_a_reused_request_id_is_paired_by_count(self, tmp_path: Path) -> None:
        path = tmp_path / "a.jsonl"
        write_lines(path, [record("requested", "same"), record("completed", "same"),
                           record("requested", "same"), record("requested", "same"),
                           record("completed", "same")])
        assert ids(unclosed(path, window_s=WINDOW_S)) == ["same"]

    def test_records_older_than_the_window_before_the_last_are_not_read(
            self, tmp_path: Path) -> None:
        path = tmp_path / "a.jsonl"
        write_lines(path, [
            record("requested", "old", ts="2026-12-03T09:58:29.999999Z"),  # 90 s + 1 µs
            record("requested", "edge", ts="2026-12-03T09:58:30.000000Z"),
            record("completed", "x", ts="2026-12-03T10:00:00.000000Z")])
        assert ids(unclosed(path, window_s=WINDOW_S)) == ["edge"]

    def test_the_search_goes_on_into_rotated_files(self, tmp_path: Path) -> None:
        path = tmp_path / "a.jsonl"
        write_lines(tmp_path / "a.000001.jsonl", [record("requested", "r1"),
                                                  record("requested", "r2")])
        write_lines(tmp_path / "a.000002.jsonl", [record("completed", "r2"),
                                                  record("requested", "r3")])
        write_lines(path, [record("completed", "r3"), record("requested", "r4")])
        assert ids(unclosed(path, window_s=WINDOW_S)) == ["r1", "r4"]

    def test_only_rotated_files_left(self, tmp_path: Path) -> None:
        write_lines(tmp_path / "a.000001.jsonl", [record("requested", "r1")])
        assert ids(unclosed(tmp_path / "a.jsonl", window_s=WINDOW_S)) == ["r1"]

    def test_lines_across_read_blocks_and_bad_lines(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from gateway.audit import recovery

        monkeypatch.setattr(recovery, "_BLOCK", 64)  # every line spans blocks
        path = tmp_path / "a.jsonl"
        records = [record("requested", f"r{i}") for i in range(30)]
        records += [record("completed", f"r{i}") for i in range(0, 30, 2)]
        write_lines(path, records, torn=b'{"ts": "2026-')
        assert ids(unclosed(path, window_s=WINDOW_S)) == [f"r{i}" for i in range(1, 30, 2)]

    def test_no_log_yet(self, tmp_path: Path) -> None:
        assert unclosed(tmp_path / "missing.jsonl", window_s=WINDOW_S) == []


class TestClosingRecord:
    def test_what_was_asked_is_carried_and_the_result_is_unknown(self) -> None:
        requested = {**record("requested", "r1", userIdHash="sha256:ab", client="10.0.0.1"),
                     "seq": 7, "prev": "0" * 64, "hash": "f" * 64, "chain": "hmac-sha256"}
        requested.pop("userId")
        closing = closing_record(requested)
        assert closing == {
            "event": "deactivate.completed", "requestId": "r1", "caller": "crm",
            "route": "POST /v1/bots/{botId}/sessions/deactivate", "botId": "st-1",
            "channel": None, "app": "sessions", "userIdHash": "sha256:ab", "client": "10.0.0.1",
            "outcome": "unknown", "status": None, "upstreamStatus": None, "attempts": None,
            "durationMs": None, "error": RESTARTED}

    async def test_closed_durably_in_one_commit_and_then_none_is_open(
            self, tmp_path: Path) -> None:
        path = tmp_path / "audit.jsonl"
        log = AuditLog(path)
        log.open()
        try:
            for i in range(3):
                await log.append(record("requested", f"r{i}"))
            await log.append(record("completed", "r1"))
            await close_left_open(log, unclosed(path, window_s=WINDOW_S))
            assert log.fsyncs == 5
        finally:
            await log.close()
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        assert [(r["requestId"], r.get("outcome")) for r in lines[-2:]] == [
            ("r0", "unknown"), ("r2", "unknown")]
        assert unclosed(path, window_s=WINDOW_S) == []
        assert verify_files(rotated_files(path)).ok
