"""Tests for gateway.audit.chain with gateway.audit.log: the keyed (HMAC) chain as written, as
rotated and reopened, and as verified with, without and against the wrong key."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.chain import CHAIN_FIELD, HMAC_CHAIN, ChainKey, continues
from gateway.audit.log import (
    ZERO_HASH,
    AuditLog,
    canonical,
    chain_hash,
    rotated_files,
    verify_files,
)

KEY = ChainKey(b"k" * 32)
OTHER = ChainKey(b"o" * 32)

OpenLog = Callable[..., AuditLog]


def request(i: int) -> dict[str, Any]:
    return {"event": "deactivate.requested", "requestId": f"r-{i}", "caller": "crm-service",
            "botId": "st-demo", "userId": f"u-{i}", "app": "sessions"}


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


def write(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records))


def rechain(records: list[dict[str, Any]], key: ChainKey | None = None) -> None:
    """What someone who can write the file does: every hash recomputed from the top."""
    prev = ZERO_HASH
    for record in records:
        record["prev"] = prev
        prev = record["hash"] = chain_hash(prev, canonical(record), key)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "deactivations.jsonl"


@pytest.fixture
async def open_log() -> AsyncIterator[OpenLog]:
    logs: list[AuditLog] = []

    def factory(path: Path, **options: Any) -> AuditLog:
        log = AuditLog(path, **options)
        log.open()
        logs.append(log)
        return log

    yield factory
    for log in logs:
        await log.close()


async def fill(log: AuditLog, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        await log.append(request(i))


async def run(open_log: OpenLog, path: Path, count: int, start: int = 0, **options: Any) -> None:
    """One run of the gateway: open, `count` records, close."""
    log = open_log(path, **options)
    await fill(log, count, start)
    await log.close()


class TestChainKey:
    def test_never_shows_the_key(self) -> None:
        assert "k" * 8 not in repr(KEY) and "k" * 8 not in str(KEY)

    def test_empty_key_refused(self) -> None:
        with pytest.raises(ValueError):
            ChainKey(b"")

    def test_hash_is_hmac_sha256_of_prev_and_canonical(self) -> None:
        expected = hmac.new(b"k" * 32, f"{ZERO_HASH}{{}}".encode(), hashlib.sha256).hexdigest()
        assert chain_hash(ZERO_HASH, "{}", KEY) == expected != chain_hash(ZERO_HASH, "{}")


class TestKeyedLog:
    async def test_first_record_is_marked_and_hashes_follow_the_contract(
            self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path, chain_key=KEY)
        await fill(log, 3)
        first, *rest = lines_of(log_path)
        assert first[CHAIN_FIELD] == HMAC_CHAIN and all(CHAIN_FIELD not in r for r in rest)
        body = {k: v for k, v in first.items() if k != "hash"}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        # The line is the canonical form, with the hash added last.
        assert log_path.read_text("utf-8").splitlines()[0] == (
            text[:-1] + f',"hash":"{first["hash"]}"}}')
        assert first["hash"] == hmac.new(b"k" * 32, (ZERO_HASH + text).encode("utf-8"),
                                         hashlib.sha256).hexdigest()

    async def test_append_returns_the_record_as_written(self, log_path: Path,
                                                        open_log: OpenLog) -> None:
        log = open_log(log_path, chain_key=KEY)
        written = await log.append(request(1))
        assert written == lines_of(log_path)[0] and written[CHAIN_FIELD] == HMAC_CHAIN

    async def test_a_caller_cannot_set_the_chain_field(self, log_path: Path,
                                                       open_log: OpenLog) -> None:
        log = open_log(log_path)
        await log.append({**request(1), CHAIN_FIELD: HMAC_CHAIN})
        assert CHAIN_FIELD not in lines_of(log_path)[0]
        assert verify_files([log_path]).ok

    async def test_verify_with_the_key(self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path, chain_key=KEY)
        await fill(log, 5)
        report = verify_files([log_path], keys=[KEY])
        assert (report.ok, report.records, report.unchecked) == (True, 5, 0)

    async def test_without_a_key_the_hashes_are_unchecked_not_intact(
            self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path, chain_key=KEY)
        await fill(log, 5)
        report = verify_files([log_path])
        assert (report.ok, report.error, report.unchecked) == (False, None, 5)

    async def test_the_wrong_key_is_a_mismatch(self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path, chain_key=KEY)
        await fill(log, 2)
        report = verify_files([log_path], keys=[OTHER])
        assert report.error == f"{log_path}:1: hash mismatch (with every key given)"

    async def test_rotation_keeps_the_keyed_chain_across_files(
            self, log_path: Path, open_log: OpenLog) -> None:
        log = open_log(log_path, chain_key=KEY, max_bytes=1024)
        await fill(log, 20)
        files = rotated_files(log_path)
        assert len(files) > 3
        per_file = [lines_of(f) for f in files]
        assert all(records[0][CHAIN_FIELD] == HMAC_CHAIN for records in per_file)
        assert per_file[1][0]["prev"] == per_file[0][-1]["hash"]
        assert all(len(f.read_bytes()) <= 1024 for f in files)
        assert verify_files(files, keys=[KEY]).records == 20

    async def test_reopening_with_the_same_key_continues_the_file(
            self, log_path: Path, open_log: OpenLog) -> None:
        await run(open_log, log_path, 2, chain_key=KEY)
        await run(open_log, log_path, 2, start=2, chain_key=KEY)
        assert rotated_files(log_path) == [log_path]
        assert verify_files([log_path], keys=[KEY]).records == 4


class TestKeyChanges:
    """A file is keyed with one key, or plain, as a whole: a change starts a new file."""

    async def test_key_set_on_a_plain_log(self, log_path: Path, open_log: OpenLog) -> None:
        await run(open_log, log_path, 3)
        await run(open_log, log_path, 3, start=3, chain_key=KEY)
        files = rotated_files(log_path)
        assert len(files) == 2 and CHAIN_FIELD not in lines_of(files[0])[0]
        assert verify_files(files, keys=[KEY]).ok  # a plain past, then keyed
        assert verify_files(files).unchecked == 3

    async def test_key_changed(self, log_path: Path, open_log: OpenLog) -> None:
        await run(open_log, log_path, 3, chain_key=KEY)
        await run(open_log, log_path, 3, start=3, chain_key=OTHER)
        files = rotated_files(log_path)
        assert len(files) == 2
        assert verify_files(files, keys=[KEY, OTHER]).records == 6
        assert "hash mismatch" in (verify_files(files, keys=[OTHER]).error or "")

    async def test_key_removed(self, log_path: Path, open_log: OpenLog) -> None:
        await run(open_log, log_path, 3, chain_key=KEY)
        await run(open_log, log_path, 3, start=3)
        files = rotated_files(log_path)
        assert len(files) == 2
        error = verify_files(files, keys=[KEY]).error or ""
        assert error.startswith(f"{files[1]}:1: a plain (unkeyed) file after a keyed one")

    def test_continues_needs_the_same_mode_and_key(self) -> None:
        record = {"seq": 1, CHAIN_FIELD: HMAC_CHAIN, "prev": ZERO_HASH}
        record["hash"] = chain_hash(ZERO_HASH, canonical(record), KEY)
        first = json.dumps(record).encode()
        assert continues(first, first, KEY)
        assert not continues(first, first, OTHER) and not continues(first, first, None)
        plain = json.dumps({"seq": 1, "prev": ZERO_HASH, "hash": "0" * 64}).encode()
        assert continues(plain, plain, None) and not continues(plain, plain, KEY)
        assert continues(b"not json", plain, None)  # unreadable: treated as plain


class TestRewrite:
    """Whoever can write the file rewrites record 1 and recomputes every plain hash."""

    async def rewritten(self, log_path: Path, open_log: OpenLog, *, keep_mark: bool
                        ) -> list[dict[str, Any]]:
        await run(open_log, log_path, 6, chain_key=KEY)
        records = lines_of(log_path)[:-1]  # the last record dropped
        records[0]["userId"], records[0]["caller"] = "someone-else", "narrow-service"
        if not keep_mark:
            del records[0][CHAIN_FIELD]
        rechain(records)
        write(log_path, records)
        return records

    async def test_plain_rewrite_fails_with_the_key(self, log_path: Path,
                                                    open_log: OpenLog) -> None:
        await self.rewritten(log_path, open_log, keep_mark=False)
        assert verify_files([log_path]).ok  # without the key it looks intact
        error = verify_files([log_path], keys=[KEY]).error or ""
        assert "a chain key was given but no file is keyed" in error

    async def test_rewrite_keeping_the_mark_fails_with_the_key(self, log_path: Path,
                                                               open_log: OpenLog) -> None:
        await self.rewritten(log_path, open_log, keep_mark=True)
        assert verify_files([log_path], keys=[KEY]).error == (
            f"{log_path}:1: hash mismatch (with every key given)")
        assert verify_files([log_path]).unchecked == 5

    def test_unknown_chain_is_a_break(self, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True)
        records = [{"seq": 1, CHAIN_FIELD: "md5"}]
        rechain(records)
        write(log_path, records)
        assert verify_files([log_path]).error == f"{log_path}:1: unknown chain 'md5'"
