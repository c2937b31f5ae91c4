"""Tests for gateway.audit.log: the hash chain, durable group commit, failures, rotation, verify."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import json
import os
import re
import resource
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from gateway.audit import log as audit
from gateway.audit.log import (
    ZERO_HASH,
    AuditLog,
    AuditOpenError,
    canonical,
    chain_hash,
    hash_user_id,
    rotated_files,
    verify_files,
)
from gateway.errors import AuditUnavailable

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
REAL_FSYNC = os.fsync

OpenLog = Callable[..., AuditLog]


async def until(condition: Callable[[], bool], tries: int = 200) -> None:
    """Lets the log's thread work until `condition` holds (at most `tries` × 10 ms)."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)


def request(i: int, **overrides: Any) -> dict[str, Any]:
    record = {
        "event": "deactivate.requested",
        "requestId": f"r-{i}",
        "caller": "crm-service",
        "route": "/v1/bots/{botId}/sessions/deactivate",
        "botId": "st-demo",
        "userId": f"u-{i}",
        "channel": None,
        "app": "sessions",
    }
    return record | overrides


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def hand_chain(records: list[dict[str, Any]], prev: str) -> list[bytes]:
    """Lines for `records` chained by hand onto `prev`, whatever their seq."""
    lines = []
    for record in records:
        record["prev"] = prev
        prev = record["hash"] = chain_hash(prev, canonical(record))
        lines.append(json.dumps(record).encode() + b"\n")
    return lines


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE: a write past `limit` is cut short, the next one fails with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


class FsyncGate:
    """Stands in for os.fsync: the first call waits until released (then fails if asked)."""

    def __init__(self, *, fail_first: bool = False) -> None:
        self.fail_first = fail_first
        self.calls = 0
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.released.wait(5)
            if self.fail_first:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
        REAL_FSYNC(fd)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 5)


async def trickle_after_first_commit(log: AuditLog, monkeypatch: pytest.MonkeyPatch, *,
                                     later: int) -> list[int]:
    """r-0 is committed alone while r-1 waits (the log is busy); once that commit is over,
    `later` more requests under way append, one each loop turn (r-2 in the next turn, r-3 in
    the one after, …). Returns the size of every commit."""
    batches: list[int] = []
    appends: list[asyncio.Task[dict[str, Any]]] = []

    async def late(i: int) -> dict[str, Any]:
        for _ in range(i - 2):
            await asyncio.sleep(0)
        return await log.append(request(i))

    real_next_commit, real_start_gathering = AuditLog._next_commit, AuditLog._start_gathering

    def next_commit(self: AuditLog) -> None:
        if self._pending or self._retained or self._unsynced:
            # (with what a failed commit kept and what the loop wrote itself)
            batches.append(len(self._retained) + len(self._pending) + len(self._unsynced))
        real_next_commit(self)

    def trickle_then_gather(self: AuditLog) -> None:
        if self.fsyncs == 1 and not appends:  # the first commit is over: requests go on
            appends.extend(asyncio.create_task(late(i)) for i in range(2, 2 + later))
        real_start_gathering(self)

    monkeypatch.setattr(AuditLog, "_next_commit", next_commit)
    monkeypatch.setattr(AuditLog, "_start_gathering", trickle_then_gather)
    gate = FsyncGate()
    monkeypatch.setattr(os, "fsync", gate)
    first = asyncio.create_task(log.append(request(0)))
    await gate.wait_entered()
    waiting = asyncio.create_task(log.append(request(1)))
    await asyncio.sleep(0)
    gate.released.set()
    await asyncio.gather(first, waiting)
    while len(appends) < later:
        await asyncio.sleep(0)
    await asyncio.gather(*appends)
    return batches


@pytest.fixture(autouse=True)
def fresh_structlog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Uncached structlog defaults: capture_logs sees these events whatever ran before."""
    structlog.reset_defaults()
    monkeypatch.setattr(audit, "log", structlog.get_logger(audit.__name__))
    yield
    structlog.reset_defaults()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "deactivations.jsonl"


@pytest.fixture
async def open_log() -> AsyncIterator[OpenLog]:
    """Opens an AuditLog (closed after the test)."""
    logs: list[AuditLog] = []

    def factory(path: Path, **options: Any) -> AuditLog:
        log = AuditLog(path, **options)
        log.open()
        logs.append(log)
        return log

    yield factory
    for log in logs:
        await log.close()


@pytest.fixture
async def five_line_log(log_path: Path, open_log: OpenLog) -> list[bytes]:
    """A closed, valid log of 5 records at `log_path`; returns its lines."""
    log = open_log(log_path)
    for i in range(1, 6):
        await log.append(request(i))
    await log.close()
    return log_path.read_bytes().splitlines(keepends=True)


def break_in_full_device(log: AuditLog) -> None:
    """Swap the log's descriptor for /dev/full: its next write fails with ENOSPC."""
    assert log._fd is not None
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, log._fd)
    os.close(full)


class TestChainFormula:
    def test_canonical_drops_hash_sorts_keys_and_keeps_non_ascii(self) -> None:
        record = {"seq": 1, "hash": "h", "userId": "ユーザー", "prev": ZERO_HASH}
        assert canonical(record) == f'{{"prev":"{ZERO_HASH}","seq":1,"userId":"ユーザー"}}'

    def test_chain_hash_is_sha256_of_prev_and_canonical(self) -> None:
        expected = hashlib.sha256(f"{ZERO_HASH}{{}}".encode()).hexdigest()
        assert chain_hash(ZERO_HASH, "{}") == expected

    def test_hash_user_id_is_prefixed_sha256(self) -> None:
        assert hash_user_id("u-1") == "sha256:" + hashlib.sha256(b"u-1").hexdigest()

    async def test_written_hash_matches_the_contract_formula(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        """Recomputed straight from the contract text, with a non-ASCII userId."""
        log = open_log(log_path)
        await log.append(request(1, userId="müller-ユーザー"))
        [record] = read_records(log_path)
        body = {k: v for k, v in record.items() if k != "hash"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert record["hash"] == hashlib.sha256((ZERO_HASH + text).encode("utf-8")).hexdigest()
        escaped = json.dumps(body, sort_keys=True, separators=(",", ":"))
        assert record["hash"] != hashlib.sha256((ZERO_HASH + escaped).encode()).hexdigest()


class TestAppend:
    async def test_fresh_log_chain_verifies(self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path)
        for i in range(1, 6):
            await log.append(request(i))
        records = read_records(log_path)
        assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
        assert records[0]["prev"] == ZERO_HASH
        assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
        assert verify_files([log_path]) == audit.VerifyReport(ok=True, records=5, files=1)

    async def test_returns_the_record_as_written(self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path)
        written = await log.append(request(1))
        assert read_records(log_path) == [written]
        assert TS_RE.match(written["ts"])
        # The line: the canonical form (keys sorted), the hash added last.
        body = {key: value for key, value in written.items() if key != "hash"}
        line = log_path.read_text("utf-8")
        assert line == (json.dumps(body, sort_keys=True, ensure_ascii=False,
                                   separators=(",", ":"))[:-1]
                        + f',"hash":"{written["hash"]}"}}\n')

    async def test_caller_cannot_set_the_chain_fields(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        log = open_log(log_path)
        forged = request(1, ts="1999-01-01T00:00:00.000000Z", seq=99, prev="x", hash="y")
        written = await log.append(forged)
        assert (written["seq"], written["prev"]) == (1, ZERO_HASH)
        assert written["ts"] != forged["ts"]
        assert verify_files([log_path]).ok

    async def test_hash_user_ids_writes_user_id_hash_only(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        log = open_log(log_path, hash_user_ids=True)
        await log.append(request(1, userId="alice"))
        text = log_path.read_text("utf-8")
        assert 'userId"' not in text and "alice" not in text
        [record] = read_records(log_path)
        assert record["userIdHash"] == hash_user_id("alice")
        assert verify_files([log_path]).ok

    async def test_unencodable_record_fails_alone(self, log_path: Path, open_log: OpenLog) -> None:
        """A lone surrogate cannot be UTF-8: that caller fails, its neighbours are written."""
        log = open_log(log_path)
        results = await asyncio.gather(
            log.append(request(1)),
            log.append(request(2, userId="\ud800")),
            log.append(request(3)),
            return_exceptions=True,
        )
        assert isinstance(results[1], ValueError)
        assert [r["requestId"] for r in read_records(log_path)] == ["r-1", "r-3"]
        assert verify_files([log_path]).ok

    async def test_close_writes_pending_records(self, log_path: Path) -> None:
        log = AuditLog(log_path)
        log.open()
        tasks = [asyncio.create_task(log.append(request(i))) for i in range(10)]
        await asyncio.sleep(0)
        await log.close()
        assert all(task.done() for task in tasks)
        assert verify_files([log_path]).records == 10

    async def test_append_after_close_raises(self, log_path: Path) -> None:
        log = AuditLog(log_path)
        log.open()
        await log.close()
        with pytest.raises(AuditUnavailable, match="audit log cannot be written"):
            await log.append(request(1))
        assert not log.healthy
        await log.close()  # closing twice is harmless


def test_a_log_serves_one_event_loop_after_another(log_path: Path) -> None:
    """Each `asyncio.run` is a new event loop: the log asks for the running loop again once
    the one it saw has stopped."""
    log = AuditLog(log_path)
    log.open()

    async def append(i: int) -> int:
        return int((await log.append(request(i)))["seq"])

    try:
        assert [asyncio.run(append(0)), asyncio.run(append(1))] == [1, 2]
    finally:
        asyncio.run(log.close())
    assert [r["seq"] for r in read_records(log_path)] == [1, 2]


class TestAppendWritten:
    """`append(durable=False)`: acknowledged once written; the fsync follows in the same
    commit, and a record whose fsync failed is written again by the next commit."""

    async def test_acknowledged_before_the_fsync(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        log = open_log(log_path)
        gate = FsyncGate()
        monkeypatch.setattr(os, "fsync", gate)
        written = asyncio.create_task(log.append(request(1), durable=False))
        durable = asyncio.create_task(log.append(request(2)))
        await gate.wait_entered()  # the batch is written, its fsync is held
        assert (await asyncio.wait_for(written, 5))["seq"] == 1
        assert [r["requestId"] for r in read_records(log_path)] == ["r-1", "r-2"]
        assert not durable.done(), "a durable append still waits for the fsync"
        gate.released.set()
        assert (await durable)["seq"] == 2
        assert log.fsyncs == 1 and verify_files([log_path]).records == 2

    async def test_kept_over_a_failed_fsync_and_written_by_the_next_commit(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        log = open_log(log_path)
        await log.append(request(0))
        gate = FsyncGate(fail_first=True)
        monkeypatch.setattr(os, "fsync", gate)
        with capture_logs():
            written = asyncio.create_task(log.append(request(1), durable=False))
            await gate.wait_entered()
            assert (await asyncio.wait_for(written, 5))["requestId"] == "r-1"
            assert len(read_records(log_path)) == 2  # written, its fsync held
            gate.released.set()
            await until(lambda: not log.healthy)  # the failed fsync cut the write back
            assert len(read_records(log_path)) == 1
            assert await log.probe() is True  # writable again: the kept record goes
            await until(lambda: len(read_records(log_path)) == 2)
        assert [(r["requestId"], r["seq"]) for r in read_records(log_path)] == [("r-0", 1),
                                                                              ("r-1", 2)]
        assert verify_files([log_path]).ok

    async def test_never_waits_behind_another_batchs_fsync(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        log = open_log(log_path)
        gate = FsyncGate()
        monkeypatch.setattr(os, "fsync", gate)
        durable = asyncio.create_task(log.append(request(1)))
        await gate.wait_entered()  # a commit is under way, held in its fsync
        queued = await asyncio.wait_for(log.append(request(2), durable=False), 5)
        assert queued["requestId"] == "r-2" and [r["requestId"] for r in
                                                 read_records(log_path)] == ["r-1"]
        gate.released.set()
        await durable
        await until(lambda: len(read_records(log_path)) == 2)  # the next commit takes it
        assert verify_files([log_path]).records == 2

    async def test_a_failed_write_fails_the_caller(self, log_path: Path,
                                                   open_log: OpenLog) -> None:
        log = open_log(log_path)
        await log.append(request(0))
        break_in_full_device(log)
        with capture_logs(), pytest.raises(AuditUnavailable):
            await log.append(request(1), durable=False)
        assert await log.probe() is True
        await log.append(request(2))
        assert [r["requestId"] for r in read_records(log_path)] == ["r-0", "r-2"]

    async def test_an_unencodable_one_fails_alone(self, log_path: Path,
                                                  open_log: OpenLog) -> None:
        log = open_log(log_path)
        results = await asyncio.gather(log.append(request(1, userId="\ud800"), durable=False),
                                       log.append(request(2)), return_exceptions=True)
        assert isinstance(results[0], ValueError)
        assert [r["requestId"] for r in read_records(log_path)] == ["r-2"]


class TestWrittenOnTheLoop:
    """`append(durable=False)` on a quiet log: the event loop chains and writes the record
    itself, before `append` returns, and a commit started then fsyncs it (`_write_now`)."""

    async def test_in_the_file_when_append_returns_and_fsynced_after(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        log = open_log(log_path)
        await log.append(request(0))
        fsyncs = log.fsyncs
        gate = FsyncGate()
        monkeypatch.setattr(os, "fsync", gate)
        written = await log.append(request(1), durable=False)
        assert written["seq"] == 2 and written["hash"]
        assert [r["requestId"] for r in read_records(log_path)] == ["r-0", "r-1"]
        await gate.wait_entered()  # its fsync, in a commit of its own
        assert log.fsyncs == fsyncs
        durable = asyncio.create_task(log.append(request(2)))
        await asyncio.sleep(0.05)
        assert not durable.done(), "a durable record waits behind the fsync under way"
        gate.released.set()
        assert (await durable)["seq"] == 3
        assert log.fsyncs == fsyncs + 2 and verify_files([log_path]).records == 3

    async def test_the_thread_rotates(self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path, max_bytes=1024)
        for i in range(12):  # about 400 bytes each: a rotation every two or three
            await log.append(request(i), durable=False)
            # each finds the log quiet: its fsync is done
            await until(lambda: not log._flushing and log._worker.idle)
        await log.close()
        files = rotated_files(log_path)
        assert len(files) >= 4
        assert all(path.stat().st_size <= 1024 for path in files)
        assert verify_files(files) == audit.VerifyReport(ok=True, records=12, files=len(files))

    async def test_a_removed_file_is_left_to_the_thread_which_reopens_it(
            self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path)
        await log.append(request(0))
        moved = log_path.with_name("moved.jsonl")
        os.rename(log_path, moved)
        with capture_logs() as logs:
            await log.append(request(1), durable=False)
        assert [r["requestId"] for r in read_records(log_path)] == ["r-1"]
        assert [r["requestId"] for r in read_records(moved)] == ["r-0"]
        assert [e["event"] for e in logs] == ["audit.reopened"]

    async def test_a_file_left_before_its_fsync_keeps_it_once(
            self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path)
        await log.append(request(0))
        await log.append(request(1), durable=False)  # written; its commit has not run yet
        directory = log_path.parent
        moved = directory.with_name("moved")
        os.rename(directory, moved)
        directory.write_text("not a directory")  # the path cannot be reopened
        with capture_logs():
            # The commit of the loop's write alone fsyncs it where it was left, without a look
            # at the path; the next look (here readiness) finds the path gone.
            await until(lambda: log.fsyncs == 2)
            assert log.fsyncs == 2 and log.healthy
            assert await log.probe() is False
            directory.unlink()
            os.rename(moved, directory)
            assert await log.probe() is True
            await log.append(request(2))
        assert [(r["requestId"], r["seq"]) for r in read_records(log_path)] == [
            ("r-0", 1), ("r-1", 2), ("r-2", 3)]  # fsynced in the file it was left in, once
        assert verify_files([log_path]).ok

    async def test_not_while_the_thread_is_busy(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        log = open_log(log_path)
        await log.append(request(0))
        gate = threading.Event()
        monkeypatch.setattr(log, "_probe_sync", lambda: gate.wait(5))
        log._healthy = False  # a probe then runs in the thread
        probing = asyncio.create_task(log.probe())
        await asyncio.sleep(0.05)
        log._healthy = True
        queued = asyncio.create_task(log.append(request(1), durable=False))
        await asyncio.sleep(0.05)
        assert not queued.done() and len(read_records(log_path)) == 1
        gate.set()
        await probing
        assert (await queued)["seq"] == 2
        assert verify_files([log_path]).records == 2


class TestChainedOnTheLoop:
    """A commit's records are looked at and chained by the loop while the log's thread is idle
    (`_look_and_chain`): the thread, which would run them cold after waking up, only writes
    and fsyncs; whatever changed in between makes it chain them again itself."""

    @staticmethod
    def chains_by_thread(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
        counts = {"loop": 0, "thread": 0}
        chain = AuditLog._chain
        loop_thread = threading.get_ident()

        def counted(self: AuditLog, *args: Any, **kwargs: Any) -> Any:
            counts["loop" if threading.get_ident() == loop_thread else "thread"] += 1
            return chain(self, *args, **kwargs)

        monkeypatch.setattr(AuditLog, "_chain", counted)
        return counts

    async def test_the_thread_writes_what_the_loop_chained(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        counts = self.chains_by_thread(monkeypatch)
        log = open_log(log_path)
        written = [await log.append(request(i)) for i in range(3)]
        assert counts == {"loop": 3, "thread": 0}
        assert [r["seq"] for r in written] == [1, 2, 3]
        assert read_records(log_path) == written
        assert verify_files([log_path]).records == 3

    async def test_a_busy_thread_chains_the_commit_itself(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        log = open_log(log_path)
        await log.append(request(0))
        gate = FsyncGate()
        monkeypatch.setattr(os, "fsync", gate)
        first = asyncio.ensure_future(log.append(request(1)))
        await gate.wait_entered()  # the thread is held in that commit's fsync
        counts = self.chains_by_thread(monkeypatch)
        assert log._look_and_chain([dict(request(2))]) == (None, None)
        second = asyncio.ensure_future(log.append(request(2)))
        await asyncio.sleep(0.02)
        gate.released.set()
        await asyncio.gather(first, second)
        assert verify_files([log_path]).records == 3
        assert counts["loop"] == 1  # the next commit, once the thread was idle again

    async def test_lines_chained_for_another_file_size_are_chained_again(
            self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path)
        await log.append(request(0))
        records = [log._prepare(request(1))]
        looked, chained = log._look_and_chain(records)
        assert looked is True and chained is not None and chained[2] == log._size
        stale: tuple[bytes, dict[int, Exception], int] = (b'{"not":"these lines"}\n', {},
                                                          log._size + 1)
        log._write_batch(records, None, False, True, stale)  # (no commit under way)
        assert [r["requestId"] for r in read_records(log_path)] == ["r-0", "r-1"]
        assert verify_files([log_path]).records == 2

    async def test_a_path_that_moved_is_left_to_the_thread_which_reopens_it(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        log = open_log(log_path)
        await log.append(request(0))
        moved = log_path.with_name("moved.jsonl")
        os.rename(log_path, moved)
        assert log._look_and_chain([log._prepare(request(9))]) == (False, None)
        counts = self.chains_by_thread(monkeypatch)
        with capture_logs() as logs:
            written = await log.append(request(1))
        assert counts == {"loop": 0, "thread": 1}
        assert read_records(log_path) == [written]
        assert [r["requestId"] for r in read_records(moved)] == ["r-0"]
        assert [e["event"] for e in logs] == ["audit.reopened"]

    async def test_a_failure_to_chain_on_the_loop_leaves_it_to_the_thread(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        chain = AuditLog._chain
        loop_thread = threading.get_ident()

        def broken_on_the_loop(self: AuditLog, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() == loop_thread:
                raise RuntimeError("a bug")
            return chain(self, *args, **kwargs)

        monkeypatch.setattr(AuditLog, "_chain", broken_on_the_loop)
        log = open_log(log_path)
        written = await log.append(request(0))
        assert written["seq"] == 1 and read_records(log_path) == [written]


class TestGroupCommit:
    async def test_concurrent_appends_share_fsyncs(self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path)
        written = await asyncio.gather(*(log.append(request(i)) for i in range(200)))
        assert [r["seq"] for r in written] == list(range(1, 201))
        assert [r["requestId"] for r in written] == [f"r-{i}" for i in range(200)]
        assert 1 <= log.fsyncs < 200
        assert [r["seq"] for r in read_records(log_path)] == list(range(1, 201))
        assert verify_files([log_path]).records == 200

    async def test_appends_during_an_fsync_form_the_next_batch(
        self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        log = open_log(log_path)
        gate = FsyncGate()
        monkeypatch.setattr(os, "fsync", gate)
        first = asyncio.create_task(log.append(request(0)))
        await gate.wait_entered()
        later = [asyncio.create_task(log.append(request(i))) for i in range(1, 11)]
        await asyncio.sleep(0)
        gate.released.set()
        await asyncio.gather(first, *later)
        assert log.fsyncs == 2
        assert verify_files([log_path]).records == 11

    async def test_a_commit_after_another_gathers_the_appends_of_the_next_turns(
        self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        log = open_log(log_path)
        batches = await trickle_after_first_commit(log, monkeypatch, later=4)
        assert log.fsyncs == 2  # r-0 alone, then r-1 to r-5 together
        assert batches == [1, 5]
        assert [r["requestId"] for r in read_records(log_path)] == [f"r-{i}" for i in range(6)]

    async def test_gathering_stops_after_gather_turns(
        self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(audit, "GATHER_TURNS", 3)
        log = open_log(log_path)
        batches = await trickle_after_first_commit(log, monkeypatch, later=10)
        assert batches[:2] == [1, 4]  # r-0; then r-1 and the records of three turns
        assert sum(batches) == 12 and verify_files([log_path]).records == 12

    async def test_the_callers_resume_on_the_turn_after_the_hand_back_the_log_quiet(
            self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch) -> None:
        """The thread's hand-back settles the commit and resolves the callers on its own turn:
        they resume on the very next turn, and find the log quiet (no flusher left to run
        before them)."""
        log = open_log(log_path)
        await log.append(request(0))
        turns = 0
        resumed: dict[str, int] = {}
        real_committed = AuditLog._committed

        def committed(self: AuditLog, *args: Any) -> None:
            real_committed(self, *args)
            resumed.setdefault("hand-back", turns)

        async def count_turns() -> None:
            nonlocal turns
            while "caller" not in resumed:
                await asyncio.sleep(0)
                turns += 1

        monkeypatch.setattr(AuditLog, "_committed", committed)
        counter = asyncio.create_task(count_turns())
        await log.append(request(1))
        resumed["caller"] = turns
        quiet_on_resume = not log._flushing
        await counter
        assert resumed["caller"] == resumed["hand-back"] + 1
        assert quiet_on_resume

    async def test_a_record_that_finds_the_log_idle_is_committed_at_once(
        self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        log = open_log(log_path)
        turns = 0
        real_gather = AuditLog._gather

        def counted(self: AuditLog, *args: Any) -> None:
            nonlocal turns
            turns += 1
            real_gather(self, *args)

        monkeypatch.setattr(AuditLog, "_gather", counted)
        for i in range(3):
            await log.append(request(i))
        assert turns == 0 and log.fsyncs == 3

    async def test_append_resolves_only_after_fsync(
        self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        log = open_log(log_path)
        gate = FsyncGate()
        monkeypatch.setattr(os, "fsync", gate)
        task = asyncio.create_task(log.append(request(1)))
        await gate.wait_entered()
        assert b'"requestId":"r-1"' in log_path.read_bytes()  # written, fsync still running
        await asyncio.sleep(0.01)
        assert not task.done()
        gate.released.set()
        written = await task
        assert read_records(log_path) == [written] and log.fsyncs == 1

    async def test_fsync_off_writes_without_fsync(self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path, fsync=False)
        await asyncio.gather(*(log.append(request(i)) for i in range(5)))
        assert log.fsyncs == 0 and verify_files([log_path]).records == 5


class TestReopen:
    async def test_reopen_continues_seq_and_prev(
        self, log_path: Path, open_log: OpenLog, five_line_log: list[bytes]
    ) -> None:
        log = open_log(log_path)
        written = await log.append(request(6))
        assert written["seq"] == 6
        assert written["prev"] == json.loads(five_line_log[-1])["hash"]
        assert verify_files([log_path]).records == 6

    async def test_torn_final_line_is_truncated_on_open(
        self, log_path: Path, open_log: OpenLog, five_line_log: list[bytes]
    ) -> None:
        with log_path.open("ab") as file:
            file.write(b'{"ts":"2026-01-01T00:00:00.000000Z","seq":6,"ev')
        with capture_logs() as logs:
            log = open_log(log_path)
        assert log_path.read_bytes() == b"".join(five_line_log)
        [warning] = [e for e in logs if e["event"] == "audit.torn_line_truncated"]
        assert warning["log_level"] == "warning" and warning["path"] == str(log_path)
        assert (await log.append(request(6)))["seq"] == 6
        assert verify_files([log_path]).records == 6

    async def test_empty_current_file_continues_from_newest_rotated_file(
        self, log_path: Path, open_log: OpenLog, five_line_log: list[bytes]
    ) -> None:
        """A crash right after rotation leaves no current file: the chain goes on."""
        log_path.rename(log_path.with_name("deactivations.000001.jsonl"))
        log = open_log(log_path)
        assert (await log.append(request(6)))["seq"] == 6
        assert verify_files(rotated_files(log_path)) == audit.VerifyReport(True, 6, 2)

    async def test_unparsable_last_line_refuses_to_open(
        self, log_path: Path, five_line_log: list[bytes]
    ) -> None:
        with log_path.open("ab") as file:
            file.write(b"garbage\n")
        with pytest.raises(AuditOpenError, match=re.escape(str(log_path))):
            AuditLog(log_path).open()

    async def test_second_writer_on_the_same_file_is_refused(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        open_log(log_path)
        with pytest.raises(AuditOpenError, match="locked by another audit writer"):
            AuditLog(log_path).open()


class TestOpenErrors:
    @pytest.mark.parametrize(
        ("make", "reason"),
        [
            (lambda path: path.mkdir(parents=True), "Is a directory"),
            (lambda path: path.parent.write_text("x"), "Not a directory"),
        ],
        ids=["path-is-a-directory", "parent-is-a-regular-file"],
    )
    def test_unusable_path_raises_naming_it(
        self, log_path: Path, make: Callable[[Path], Any], reason: str
    ) -> None:
        make(log_path)
        with pytest.raises(AuditOpenError) as raised:
            AuditLog(log_path).open()
        assert str(log_path) in str(raised.value)
        assert re.search(reason, str(raised.value))

    def test_a_full_volume_stops_the_start(self, log_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """A full volume cannot be made on the test machine: its statvfs is replaced."""
        real = os.fstatvfs

        def full(fd: int) -> Any:
            got = real(fd)
            return os.statvfs_result((*got[:3], 0, 0, *got[5:]))  # no block free

        monkeypatch.setattr(audit.os, "fstatvfs", full)
        with pytest.raises(AuditOpenError, match="no space left on its volume") as raised:
            AuditLog(log_path).open()
        assert str(log_path) in str(raised.value)

    def test_a_volume_with_room_opens(self, log_path: Path) -> None:
        log = AuditLog(log_path)
        log.open()
        assert log.healthy

    @pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
    def test_unwritable_directory_raises(self, log_path: Path) -> None:
        log_path.parent.mkdir()
        log_path.parent.chmod(0o500)
        with pytest.raises(AuditOpenError, match="Permission denied"):
            AuditLog(log_path).open()


class TestFailure:
    async def test_full_device_fails_closed_and_logs(self, open_log: OpenLog) -> None:
        log = open_log(Path("/dev/full"))
        with capture_logs() as logs, pytest.raises(AuditUnavailable):
            await log.append(request(1))
        assert not log.healthy
        [event] = [e for e in logs if e["event"] == "audit.unwritable"]
        assert event["log_level"] == "error" and event["path"] == "/dev/full"
        assert event["errno"] == "ENOSPC" and "No space left" in event["error"]

    async def test_a_retained_record_is_written_by_the_next_commit(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        """What a failed append could not write is kept, then written before what follows."""
        log = open_log(log_path)
        await log.append(request(1))
        break_in_full_device(log)
        with pytest.raises(AuditUnavailable):
            await log.append(request(2))
        assert log.retain(request(2, event="deactivate.denied"))
        await log.append(request(3))
        records = [json.loads(line) for line in log_path.read_bytes().splitlines()]
        assert [(r["seq"], r["requestId"], r["event"]) for r in records] == [
            (1, "r-1", "deactivate.requested"), (2, "r-2", "deactivate.denied"),
            (3, "r-3", "deactivate.requested")]
        assert verify_files([log_path]).records == 3

    async def test_a_bug_settling_a_commit_fails_its_callers_and_the_log_goes_on(
        self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        log = open_log(log_path)
        real_succeeded = AuditLog._succeeded
        calls = 0

        def broken_once(self: AuditLog, *args: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug")
            real_succeeded(self, *args)

        monkeypatch.setattr(AuditLog, "_succeeded", broken_once)
        with capture_logs() as logs, pytest.raises(AuditUnavailable):
            await log.append(request(0))
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["audit.write_error"]
        assert not log._flushing  # the flusher is not left stuck in that commit
        written = await log.append(request(1))
        assert written["seq"] == 2 and verify_files([log_path]).records == 2

    async def test_retained_records_are_bounded_and_none_once_closed(
        self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(audit, "MAX_RETAINED", 2)
        log = open_log(log_path)
        break_in_full_device(log)
        assert [log.retain(request(i)) for i in range(3)] == [True, True, False]
        await log.close()  # one last try: the device is still full
        assert not log.retain(request(4))

    async def test_failed_write_leaves_nothing_and_recovers_without_gap(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        log = open_log(log_path)
        last = [await log.append(request(i)) for i in range(1, 4)][-1]
        before = log_path.read_bytes()
        break_in_full_device(log)
        with capture_logs() as logs:
            with pytest.raises(AuditUnavailable):
                await log.append(request(4))
            assert not log.healthy and log_path.read_bytes() == before
            written = await log.append(request(5))
        assert (written["seq"], written["prev"]) == (4, last["hash"])
        assert log.healthy
        assert [e["event"] for e in logs] == ["audit.unwritable", "audit.recovered"]
        assert verify_files([log_path]).records == 4

    async def test_partly_written_batch_is_cut_back(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        """A real short write (file size limit): the partial bytes are truncated away."""
        log = open_log(log_path)
        for i in range(1, 4):
            await log.append(request(i))
        before = log_path.read_bytes()
        with capture_logs(), file_size_limit(len(before) + 150):
            results = await asyncio.gather(
                *(log.append(request(i)) for i in range(4, 9)), return_exceptions=True
            )
        assert all(isinstance(r, AuditUnavailable) for r in results)
        assert log_path.read_bytes() == before
        assert (await log.append(request(9)))["seq"] == 4
        assert verify_files([log_path]).records == 4

    async def test_fsync_failure_fails_the_batch_and_cuts_it_back(
        self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """EIO from fsync cannot be produced locally, so os.fsync is replaced."""
        log = open_log(log_path)
        await log.append(request(1))
        before = log_path.read_bytes()
        gate = FsyncGate(fail_first=True)
        gate.released.set()
        monkeypatch.setattr(os, "fsync", gate)
        with capture_logs(), pytest.raises(AuditUnavailable):
            await log.append(request(2))
        assert log_path.read_bytes() == before and not log.healthy
        assert (await log.append(request(3)))["seq"] == 2 and log.healthy

    async def test_batch_queued_behind_a_failed_one_chains_onto_the_last_durable_record(
        self, log_path: Path, open_log: OpenLog, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        log = open_log(log_path)
        durable = await log.append(request(0))
        gate = FsyncGate(fail_first=True)
        monkeypatch.setattr(os, "fsync", gate)
        with capture_logs():
            failing = asyncio.create_task(log.append(request(1)))
            await gate.wait_entered()
            queued = [asyncio.create_task(log.append(request(i))) for i in range(2, 5)]
            await asyncio.sleep(0)
            gate.released.set()
            with pytest.raises(AuditUnavailable):
                await failing
            written = await asyncio.gather(*queued)
        assert [r["seq"] for r in written] == [2, 3, 4]
        assert written[0]["prev"] == durable["hash"]
        assert verify_files([log_path]).records == 4

    async def test_probe_recovers_without_writing(self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path)
        await log.append(request(1))
        break_in_full_device(log)
        with capture_logs():
            with pytest.raises(AuditUnavailable):
                await log.append(request(2))
            before = log_path.read_bytes()
            assert await log.probe() is True
        assert log.healthy and log_path.read_bytes() == before
        assert (await log.append(request(3)))["seq"] == 2

    async def test_probe_stays_unhealthy_while_the_path_is_unusable(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        log = open_log(log_path)
        await log.append(request(1))
        break_in_full_device(log)
        aside = log_path.with_name("aside")
        with capture_logs() as logs:
            with pytest.raises(AuditUnavailable):
                await log.append(request(2))
            log_path.rename(aside)
            log_path.mkdir()
            assert await log.probe() is False
            assert await log.probe() is False
            log_path.rmdir()
            aside.rename(log_path)
            assert await log.probe() is True
        unwritable = [e for e in logs if e["event"] == "audit.unwritable"]
        assert [e["errno"] for e in unwritable] == ["ENOSPC", "EISDIR"]  # once per new error
        assert (await log.append(request(3)))["seq"] == 2
        assert verify_files([log_path]).records == 2

    async def test_removed_file_is_replaced_and_the_chain_goes_on(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        """History that vanished stays visible: the new file does not start at seq 1."""
        log = open_log(log_path)
        await log.append(request(1))
        log_path.unlink()
        with capture_logs() as logs:
            written = await log.append(request(2))
        assert written["seq"] == 2 and read_records(log_path) == [written]
        assert any(e["event"] == "audit.reopened" for e in logs)
        report = verify_files([log_path])
        assert report.error == f"{log_path}:1: seq 2, expected 1"


class TestRotation:
    async def test_rotates_past_max_bytes_and_the_chain_verifies(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        log = open_log(log_path, max_bytes=1024)
        with capture_logs() as logs:
            for i in range(30):
                await log.append(request(i))
        files = rotated_files(log_path)
        assert len(files) > 3 and files[-1] == log_path
        assert files[0].name == "deactivations.000001.jsonl"
        assert files[1].name == "deactivations.000002.jsonl"
        assert all(0 < f.stat().st_size <= 1024 for f in files)
        assert verify_files(files) == audit.VerifyReport(True, 30, len(files))
        assert sum(e["event"] == "audit.rotated" for e in logs) == len(files) - 1

    async def test_first_record_after_rotation_links_to_the_previous_file(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        log = open_log(log_path, max_bytes=1024)
        for i in range(10):
            await log.append(request(i))
        first, second = (read_records(f) for f in rotated_files(log_path)[:2])
        assert second[0]["prev"] == first[-1]["hash"]
        assert second[0]["seq"] == first[-1]["seq"] + 1

    async def test_record_larger_than_max_bytes_gets_a_file_of_its_own(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        log = open_log(log_path, max_bytes=10)
        for i in range(3):
            await log.append(request(i))
        files = rotated_files(log_path)
        assert [len(read_records(f)) for f in files] == [1, 1, 1]
        assert verify_files(files).ok

    async def test_tamper_in_a_rotated_file_is_caught(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        log = open_log(log_path, max_bytes=1024)
        for i in range(10):
            await log.append(request(i))
        oldest = rotated_files(log_path)[0]
        oldest.write_bytes(oldest.read_bytes().replace(b'"u-1"', b'"u-X"'))
        report = verify_files(rotated_files(log_path))
        assert (report.ok, report.error) == (False, f"{oldest}:2: hash mismatch")
        assert (report.records, report.files) == (1, 1)

    async def test_reopen_after_rotation_continues_the_chain(
        self, log_path: Path, open_log: OpenLog
    ) -> None:
        log = open_log(log_path, max_bytes=1024)
        for i in range(10):
            await log.append(request(i))
        await log.close()
        log = open_log(log_path, max_bytes=1024)
        for i in range(10, 20):
            await log.append(request(i))
        assert verify_files(rotated_files(log_path)).records == 20

    def test_rotated_files_are_listed_oldest_first(self, tmp_path: Path) -> None:
        current = tmp_path / "a.jsonl"
        for name in ["a.000010.jsonl", "a.000002.jsonl", "a.1000000.jsonl", "b.000001.jsonl"]:
            (tmp_path / name).touch()
        assert [f.name for f in rotated_files(current)] == [
            "a.000002.jsonl",
            "a.000010.jsonl",
            "a.1000000.jsonl",
        ]
        current.touch()
        assert rotated_files(current)[-1] == current


def _delete(lines: list[bytes], _: Path) -> list[bytes]:
    return lines[:2] + lines[3:]


def _swap(lines: list[bytes], _: Path) -> list[bytes]:
    return [lines[0], lines[2], lines[1], *lines[3:]]


def _flip_byte(lines: list[bytes], _: Path) -> list[bytes]:
    return lines[:2] + [lines[2].replace(b'"u-3"', b'"u-4"')] + lines[3:]


def _seq_gap(lines: list[bytes], _: Path) -> list[bytes]:
    """Lines 3 and on renumbered 4, 5 … with valid hashes: only the seq is wrong."""
    records = [json.loads(line) for line in lines[2:]]
    for seq, record in enumerate(records, start=4):
        record["seq"] = seq
    return lines[:2] + hand_chain(records, json.loads(lines[1])["hash"])


def _prev_break(lines: list[bytes], _: Path) -> list[bytes]:
    """Line 3 chained onto a hash that is not line 2's: its own hash is valid."""
    return lines[:2] + hand_chain([json.loads(lines[2])], "f" * 64) + lines[3:]


def _first_prev(lines: list[bytes], _: Path) -> list[bytes]:
    return hand_chain([json.loads(lines[0])], "1" * 64) + lines[1:]


def _duplicate_key(lines: list[bytes], _: Path) -> list[bytes]:
    return lines[:2] + [b'{"userId":"mallory",' + lines[2][1:]] + lines[3:]


class TestVerify:
    @pytest.mark.parametrize(
        ("tamper", "error", "intact"),
        [
            (_flip_byte, ":3: hash mismatch", 2),
            (_delete, ":3: seq 4 after 2", 2),
            (_swap, ":2: seq 3 after 1", 1),
            (_seq_gap, ":3: seq 4 after 2", 2),
            (_prev_break, ":3: prev does not match the previous hash", 2),
            (_first_prev, ":1: prev of the first record is not 64 zeros", 0),
            (lambda lines, _: lines[:1] + [b"\n"] + lines[1:], ":2: blank line", 1),
            (lambda lines, _: lines[:3] + [b"{not json\n"] + lines[3:], ":4: not valid JSON", 3),
            (lambda lines, _: lines[:3] + [b"[1]\n"] + lines[3:], ":4: not a JSON object", 3),
            (lambda lines, _: lines + [lines[0][:20]], ":6: incomplete line", 5),
            (_duplicate_key, ":3: duplicate key", 2),
        ],
        ids=[
            "byte-changed",
            "line-deleted",
            "lines-reordered",
            "seq-gap",
            "prev-broken",
            "first-prev-not-zero",
            "blank-line",
            "not-json",
            "not-an-object",
            "torn-line",
            "duplicate-key",
        ],
    )
    async def test_tampering_is_caught_at_its_line(
        self,
        log_path: Path,
        five_line_log: list[bytes],
        tamper: Callable[[list[bytes], Path], list[bytes]],
        error: str,
        intact: int,
    ) -> None:
        log_path.write_bytes(b"".join(tamper(five_line_log, log_path)))
        report = verify_files([log_path])
        assert not report.ok and report.error is not None
        assert report.error.startswith(f"{log_path}{error}")
        assert report.records == intact

    async def test_seq_continues_across_files_in_the_order_given(
        self, log_path: Path, five_line_log: list[bytes], tmp_path: Path
    ) -> None:
        head, tail = tmp_path / "head.jsonl", tmp_path / "tail.jsonl"
        head.write_bytes(b"".join(five_line_log[:2]))
        tail.write_bytes(b"".join(five_line_log[2:]))
        assert verify_files([head, tail]) == audit.VerifyReport(True, 5, 2)
        assert verify_files([tail, head]).error == f"{tail}:1: seq 3, expected 1"

    def test_missing_file_is_reported(self, tmp_path: Path) -> None:
        missing = tmp_path / "missing.jsonl"
        report = verify_files([missing])
        assert not report.ok and report.error == f"{missing}: No such file or directory"

    def test_no_files_is_not_ok(self) -> None:
        assert not verify_files([]).ok
