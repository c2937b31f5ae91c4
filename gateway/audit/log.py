"""The audit log: append-only JSON Lines, sequence-numbered and hash-chained.

Owns appending to the audit file: appends made durable (written and fsynced) before they are
acknowledged, group commit, size-based rotation and start-up recovery. It knows nothing of
HTTP, JWTs or caller keys; what goes into a record is decided by its callers. What the chain
hash covers and how files are verified is `audit_chain.py`'s, file names, locking and tail
reading `audit_files.py`'s; their public names are re-exported here.

Every line is one UTF-8 JSON object. `AuditLog.append` adds four fields to the caller's record:

- ``ts``: RFC 3339 UTC with microseconds and ``Z`` (``2026-11-23T22:47:37.123456Z``);
- ``seq``: 1, 2, 3 … with no gaps, continuing across rotated files;
- ``prev``: the ``hash`` of the previous record; 64 zeros for the very first record;
- ``hash``: ``sha256(prev + canonical)``, or ``HMAC-SHA256(key, prev + canonical)`` with a
  chain key, when the first record of every file also gets ``"chain": "hmac-sha256"``
  (see `chain.py`).

Past ``max_bytes`` the file is renamed to ``{stem}.{n:06d}{suffix}`` (oldest n = 1) and the
chain goes on in a fresh file whose first ``prev`` is the last ``hash`` of the previous one;
``verify_files(rotated_files(path))`` checks the whole history. A file is keyed or plain as a
whole: when the key is set, removed or changed, `open()` starts a new file.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import structlog

from gateway import jsoncodec
from gateway.audit.chain import (
    CHAIN_FIELD,
    HMAC_CHAIN,
    ZERO_HASH,
    ChainKey,
    VerifyReport,
    canonical,
    chain_hash,
    continues,
    mark,
    verify_files,
)
from gateway.audit.files import (
    AuditOpenError,
    error_reason,
    first_line,
    last_record,
    last_rotated_record,
    last_rotation,
    open_locked,
    rotated,
    rotated_files,
    rotated_path,
    tail,
)
from gateway.errors import AuditUnavailable
from gateway.metrics import Metrics

__all__ = [
    "ZERO_HASH",
    "AuditLog",
    "AuditOpenError",
    "ChainKey",
    "VerifyReport",
    "canonical",
    "chain_hash",
    "hash_user_id",
    "rotated_files",
    "verify_files",
]

DEFAULT_MAX_BYTES = 104_857_600

_UNAVAILABLE = "audit log cannot be written"
_OWN_KEYS = frozenset({"ts", "seq", CHAIN_FIELD, "prev", "hash"})  # set by the log alone
_PROBE_BYTE = b" "  # never a newline: if left behind by a crash, start-up cuts it as a torn line
HALT_WAIT_S = 2.0

log = structlog.get_logger(__name__)

_Pending = tuple[dict[str, Any], "asyncio.Future[dict[str, Any]]"]
_T = TypeVar("_T")


def hash_user_id(user_id: str) -> str:
    return "sha256:" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()


class AuditLog:
    """The append-only audit file: durable, group-committed, hash-chained appends.

    File state (descriptor, size, last seq and hash) is only touched by `open()` at start-up
    and then by one worker thread, so writes, fsyncs, rotation and reopening never block the
    event loop and never run concurrently. Records are chained by that thread just before
    they are written, so a failed batch leaves no gap: the next batch chains onto the last
    durable record.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        hash_user_ids: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync: bool = True,
        metrics: Metrics | None = None,
        chain_key: ChainKey | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self._path = Path(path)
        self._hash_user_ids = hash_user_ids
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._key = chain_key
        self._metrics = metrics if metrics is not None else Metrics()
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the current file
        self._size = 0  # durable bytes of the current file
        self._seq = 0  # seq of the last durable record
        self._prev = ZERO_HASH  # hash of the last durable record
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self._opened = self._closed = False
        self._healthy = True
        self._failed_errno: int | None = None  # last failure logged, to log each new one once
        self.fsyncs = 0  # fsyncs of the log file: with group commit, fewer than records
        self._io_lock = threading.Lock()  # held while the file is being changed; see halt()

    @property
    def path(self) -> Path:
        """The current file; rotated files sit beside it (see `rotated_files`)."""
        return self._path

    @property
    def healthy(self) -> bool:
        """False after a failed write until a later write or `probe()` succeeds."""
        return self._opened and self._healthy and not self._closed

    def open(self) -> None:
        """Open the file at start-up and recover ``seq`` and ``prev`` from its tail."""
        if self._opened:
            raise RuntimeError("audit log already opened")
        try:
            self._reopen()
            self._seq, self._prev = self._recover()
            if self._size and not self._continues_chain():
                self._rotate()  # a file is keyed with one key, or plain, as a whole
        except OSError as exc:
            self._close_fd()
            reason = error_reason(exc, self._path)
            raise AuditOpenError(f"audit log {self._path}: {reason}") from exc
        except AuditOpenError:
            self._close_fd()
            raise
        self._opened = True
        log.info("audit.opened", path=str(self._path), seq=self._seq)

    async def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write `record` and return it as written, once it is durable.

        Raises `AuditUnavailable` when it cannot be written (nothing of it stays in the file),
        and `ValueError`/`TypeError` at once for a record that cannot be encoded as JSON.
        """
        if not self._opened:
            raise RuntimeError("AuditLog.open() was not called")
        if self._closed:
            raise AuditUnavailable(_UNAVAILABLE)
        prepared = self._prepare(record)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)  # a cancelled caller must not leave it unretrieved
        self._pending.append((prepared, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._drain())
        # Shielded: a caller that stops waiting does not unmake a record already in a batch.
        return await asyncio.shield(future)

    async def head(self) -> tuple[int, str]:
        """seq and hash of the last durable record (0 and 64 zeros before the first)."""
        if self._closed or not self._opened:
            return self._seq, self._prev
        return await self._in_worker(lambda: (self._seq, self._prev))

    async def probe(self) -> bool:
        """For readiness: when unhealthy, try to make the file writable again (no record)."""
        if self._closed or not self._opened:
            return self.healthy
        if self._healthy and self._still_current():
            return True  # a moved or replaced file (or directory) is noticed before a write
        try:
            await self._in_worker(self._probe_sync)
        except OSError as exc:
            self._note_failure(exc)
            return False
        self._note_success()
        return True

    def halt(self, timeout_s: float = HALT_WAIT_S) -> bool:
        """Before an immediate exit: waits for a write in progress, then lets none start.

        Every batch is one `write()`, but the kernel may cut a large write short when the
        process is killed in the middle of it; an exit after `halt()` tears no line. Returns
        False if the write did not finish within `timeout_s`. The log is unusable afterwards.
        """
        return self._io_lock.acquire(timeout=timeout_s)

    async def close(self) -> None:
        """Write everything pending, then close; later appends raise `AuditUnavailable`."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        await self._in_worker(self._close_fd)
        self._worker.shutdown(wait=False)

    # -- event-loop side ---------------------------------------------------------------------

    def _prepare(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A copy in on-disk key order, with ``ts`` and placeholders for the chain fields."""
        body = {key: value for key, value in record.items() if key not in _OWN_KEYS}
        if self._hash_user_ids:
            body = _with_user_id_hashed(body)
        head: dict[str, Any] = {"ts": _now(), "seq": 0}
        if "event" in body:
            head["event"] = body.pop("event")
        prepared = {**head, **body, "prev": ZERO_HASH, "hash": ""}
        # Fail this caller now rather than the whole batch later.
        _encode(prepared)
        return prepared

    async def _drain(self) -> None:
        """The flusher: commit what is pending, batch after batch, until nothing is left."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._commit(batch)
        finally:
            self._flusher = None

    async def _commit(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        try:
            await self._in_worker(self._write_batch, [record for record, _ in batch])
        except OSError as exc:
            self._metrics.audit_failed()
            self._note_failure(exc)
            _reject(batch, exc)
        except asyncio.CancelledError as exc:
            _reject(batch, exc)
            raise
        except Exception as exc:  # a bug must fail its batch, not strand the callers
            log.exception("audit.write_error", path=str(self._path))
            _reject(batch, exc)
        else:
            self._metrics.audit_committed(len(batch), time.monotonic() - started)
            self._note_success()
            for record, future in batch:
                if not future.done():
                    future.set_result(record)

    async def _in_worker(self, func: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, func, *args)

    def _note_failure(self, exc: OSError) -> None:
        if self._healthy or exc.errno != self._failed_errno:
            code = errno.errorcode.get(exc.errno or 0)
            log.error("audit.unwritable", path=str(self._path),
                      error=error_reason(exc, self._path), errno=code)
        self._healthy, self._failed_errno = False, exc.errno

    def _note_success(self) -> None:
        if not self._healthy:
            log.info("audit.recovered", path=str(self._path), seq=self._seq)
        self._healthy, self._failed_errno = True, None

    # -- worker-thread side (and open() at start-up) -----------------------------------------

    def _write_batch(self, records: list[dict[str, Any]]) -> None:
        """Chain `records` onto the last durable one, write them at once and fsync."""
        fd = self._writable_fd()
        data = self._chain(records, first_in_file=not self._size)
        if self._size and self._size + len(data) > self._max_bytes:
            fd = self._rotate()
            data = self._chain(records, first_in_file=True)
        with self._io_lock:  # see `halt()`
            try:
                _write_all(fd, data)
                if self._fsync:
                    os.fsync(fd)
                    self.fsyncs += 1
            except OSError:
                self._undo_partial(fd)
                raise
        self._size += len(data)
        self._seq, self._prev = records[-1]["seq"], records[-1]["hash"]

    def _chain(self, records: list[dict[str, Any]], *, first_in_file: bool) -> bytes:
        seq, prev = self._seq, self._prev
        mark(records[0], self._key is not None and first_in_file)
        for record in records:
            seq += 1
            record["seq"], record["prev"] = seq, prev
            prev = record["hash"] = chain_hash(prev, canonical(record), self._key)
        return b"".join(_encode(record) for record in records)

    def _continues_chain(self) -> bool:
        """At open: whether the current file's mode (plain, or keyed with this key) is ours."""
        assert self._fd is not None
        first, (_, last) = first_line(self._fd), tail(self._fd, self._size)
        if first is not None and last is not None and continues(first, last, self._key):
            return True
        log.warning("audit.chain_changed", path=str(self._path),
                    chain=HMAC_CHAIN if self._key is not None else "sha256",
                    action="rotated: the chain goes on in a new file")
        return False

    def _writable_fd(self) -> int:
        """The open descriptor of the current file, reopened if lost, removed or replaced."""
        if self._fd is not None and not self._still_current():
            log.error("audit.reopened", path=str(self._path), reason="removed or replaced")
            self._close_fd()
            self._identity = None
        if self._fd is None:
            return self._reopen()
        return self._fd

    def _still_current(self) -> bool:
        try:
            st = os.stat(self._path)
        except OSError:  # removed, or a directory on the way replaced by a file
            return False
        return (st.st_dev, st.st_ino) == self._identity

    def _reopen(self) -> int:
        """Open the current file; if it is the one we had, cut away bytes never made durable."""
        fd, st = open_locked(self._path, fsync_dir=self._fsync)
        same = (st.st_dev, st.st_ino) == self._identity
        size = min(st.st_size, self._size) if same else st.st_size
        try:
            if st.st_size > size:
                os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._identity, self._size = fd, (st.st_dev, st.st_ino), size
        return fd

    def _undo_partial(self, fd: int) -> None:
        """Cut the file back to its durable size and drop the descriptor: retries reopen."""
        try:
            os.ftruncate(fd, self._size)
        except OSError:
            pass  # _reopen() cuts it on the next attempt
        self._close_fd()

    def _rotate(self) -> int:
        self._close_fd()
        target = rotated_path(self._path, last_rotation(self._path) + 1)
        os.rename(self._path, target)
        self._identity = None
        log.info("audit.rotated", path=str(self._path), rotated_to=str(target), seq=self._seq)
        return self._reopen()  # fsyncs the directory: the rename and the new file are durable

    def _probe_sync(self) -> None:
        self._close_fd()  # a fresh descriptor: the old one may be what broke
        fd = self._writable_fd()
        with self._io_lock:
            # One real byte, cut away at once: a full disk, a quota, a file size limit or a
            # read-only remount shows here, where opening and fsyncing would still succeed.
            try:
                _write_all(fd, _PROBE_BYTE)
            finally:
                os.ftruncate(fd, self._size)
            if self._fsync:
                os.fsync(fd)
        stats = os.fstatvfs(fd)
        if stats.f_blocks and not stats.f_bavail:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _recover(self) -> tuple[int, str]:
        """seq and hash of the last record, from this file's tail or the newest rotated file."""
        assert self._fd is not None
        end, last = tail(self._fd, self._size)
        if end < self._size:
            # A crash tore the final line; it was never acknowledged, so it goes.
            os.ftruncate(self._fd, end)
            if self._fsync:
                os.fsync(self._fd)
            log.warning("audit.torn_line_truncated", path=str(self._path), bytes=self._size - end)
            self._size = end
        if last is not None:
            return last_record(last, self._path)
        older = rotated(self._path)
        return last_rotated_record(max(older)[1]) if older else (0, ZERO_HASH)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def _encode(record: Mapping[str, Any]) -> bytes:
    """One line for every reader: see `jsoncodec.one_line` (the hash covers parsed values)."""
    return jsoncodec.one_line(jsoncodec.compact_line(record))


def _with_user_id_hashed(body: dict[str, Any]) -> dict[str, Any]:
    """`body` with ``userId`` replaced, in place in the key order, by ``userIdHash``."""
    hashed: dict[str, Any] = {}
    for key, value in body.items():
        if key == "userId":
            key, value = "userIdHash", hash_user_id(value) if isinstance(value, str) else value
        hashed[key] = value
    return hashed


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _reject(batch: list[_Pending], cause: BaseException) -> None:
    for _, future in batch:
        if not future.done():
            error = AuditUnavailable(_UNAVAILABLE)
            error.__cause__ = cause
            future.set_exception(error)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
