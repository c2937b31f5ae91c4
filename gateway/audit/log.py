"""The audit log: append-only JSON Lines, sequence-numbered and hash-chained.

Owns appending to the audit file: appends made durable (written and fsynced) before they are
acknowledged (`append`), or, for records a restart can make up for, acknowledged once written
and made durable by the same group commit's fsync right after (`append(durable=False)`),
group commit, size-based rotation and start-up recovery of the chain. It knows nothing of
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
import contextlib
import errno
import functools
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
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
    chain_digest,
    chain_hash,
    continues,
    mark,
    verify_files,
)
from gateway.audit.files import (
    AuditOpenError,
    FdReserve,
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
from gateway.audit.writer import Writer, set_exception
from gateway.errors import AuditUnavailable
from gateway.logs import running_loop, utc_timestamp
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
MAX_RETAINED = 1_000  # records kept in memory for the next commit while the log is unwritable
MIN_FREE_BYTES = 4096  # on the volume at start-up: less, and the start stops (`_check_usable`)
# Group commit under load: before a commit that follows another, the loop turns again while a
# turn adds records (see `AuditLog._gather`). A record that finds the log idle never waits.
GATHER_TURNS = 32
GATHER_S = 0.005

log = structlog.get_logger(__name__)

# A record, its caller's future (None: nobody waits any more) and whether the caller waits
# for the fsync (True) or only for the write (False).
_Pending = tuple[dict[str, Any], "asyncio.Future[dict[str, Any]] | None", bool]
_T = TypeVar("_T")
# A commit's records chained on the loop (`AuditLog._look_and_chain`): their lines, the records
# that cannot be encoded (by index), and the file's size they were chained for.
_Chained = tuple[bytes, dict[int, Exception], int]


def hash_user_id(user_id: str) -> str:
    return "sha256:" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()


class AuditLog:
    """The append-only audit file: durable, group-committed, hash-chained appends.

    File state (descriptor, size, last seq and hash) is touched by `open()` at start-up and
    then by the log's own thread (`writer.Writer`), so fsyncs, rotation and reopening never
    block the event loop and never run concurrently. The loop touches it only while the thread
    has nothing to do: it reads it to chain a commit's records before handing them over
    (`_look_and_chain`), and writes a record that need not wait for its fsync itself
    (`_write_now`). A commit's records are chained onto the last record written, so a failed
    batch leaves no gap: the next batch chains onto the last durable record.
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
        self._size = 0  # bytes of the current file written (chained onto: the next record)
        self._seq = 0  # seq of the last record written
        self._prev = ZERO_HASH  # hash of the last record written
        # size, seq and hash as the last fsync left them: a failed write or fsync goes back
        # to these. They differ from the three above only while records the event loop wrote
        # itself (`_write_now`) wait for their commit's fsync (`_unsynced`).
        self._durable: tuple[int, int, str] = (0, 0, ZERO_HASH)
        self._unsynced: list[dict[str, Any]] = []
        self._pending: list[_Pending] = []
        self._retained: list[_Pending] = []  # written, acknowledged, then not made durable
        # The flusher: True from the moment a commit is asked for until the log is quiet again
        # (nothing pending, no commit under way); `_quiet` wakes who waits for that (close).
        self._flushing = False
        self._quiet: asyncio.Future[None] | None = None
        self._worker = Writer()
        self._opened = self._closed = False
        self._healthy = True
        self._failed_errno: int | None = None  # last failure logged, to log each new one once
        self.fsyncs = 0  # fsyncs of the log file: with group commit, fewer than records
        self._io_lock = threading.Lock()  # held while the file is being changed; see halt()
        self._reserve = FdReserve()  # rotation and reopening survive a process out of fds

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
        self._reserve.refill()
        try:
            self._reopen()
            self._check_usable()
            self._seq, self._prev = self._recover()
            if self._size and not self._continues_chain():
                self._rotate()  # a file is keyed with one key, or plain, as a whole
            self._durable = (self._size, self._seq, self._prev)
        except OSError as exc:
            self._close_fd()
            reason = error_reason(exc, self._path)
            raise AuditOpenError(f"audit log {self._path}: {reason}") from exc
        except AuditOpenError:
            self._close_fd()
            raise
        self._opened = True
        log.info("audit.opened", path=str(self._path), seq=self._seq)

    def _check_usable(self) -> None:
        """At start-up: a file that opens on a full volume takes no record; the start stops
        with the reason instead. (Not a device: one such as /dev/full starts and fails
        closed, as a volume that fills up later does.)"""
        assert self._fd is not None
        if not stat.S_ISREG(os.fstat(self._fd).st_mode):
            return
        try:
            volume = os.fstatvfs(self._fd)
        except OSError:
            return
        free = (volume.f_bfree if os.geteuid() == 0 else volume.f_bavail) * volume.f_frsize
        if free < MIN_FREE_BYTES:
            raise AuditOpenError(f"audit log {self._path}: no space left on its volume "
                                 f"({free} bytes free)")

    async def append(self, record: Mapping[str, Any], *, durable: bool = True
                     ) -> dict[str, Any]:
        """Write `record` and return it as written, once it is durable (fsynced).

        A record that finds the log idle (no commit under way) is committed at once: its
        write and fsync start on the thread before this returns to the event loop. One that
        arrives while a commit runs waits for the next, which gathers everything appended
        meanwhile (group commit; `_gather`).

        With `durable=False`, return once it is written, before the fsync of its group
        commit, when the log's thread is idle (the event loop then writes it itself, and a
        commit started at once fsyncs it: `_write_now`); while a commit is in progress,
        return at once (the record goes into the next commit: the caller never waits behind
        another batch's fsync). If its write or fsync fails after that, the record is kept and
        written again
        by the next commit (a later append, a successful `probe()`, or `close()`), so it is
        only lost with the process (and a restart closes what it left open,
        `audit.recovery`).

        Raises `AuditUnavailable` when it cannot be written (nothing of it stays in the file),
        and `ValueError`/`TypeError` for a record that cannot be encoded as JSON (it alone is
        left out of its batch).
        """
        if durable:
            return await self.durable(record)
        prepared = self._accept(record)
        if self._flushing:  # a commit is under way
            self._pending.append((prepared, None, False))
            return prepared
        if self._healthy and self._fsync and not self._retained and self._worker.idle and (
                self._write_now(prepared)):
            return prepared
        return await self._enqueue(prepared, False)

    def durable(self, record: Mapping[str, Any]) -> asyncio.Future[dict[str, Any]]:
        """`append(record)` as a future, for a caller on the request path: awaiting it
        directly resumes one coroutine fewer when the commit hands back. Raises as `append`
        does; the future fails as `append` would."""
        return self._enqueue(self._accept(record), True)

    def append_together(self, records: Iterable[Mapping[str, Any]]
                        ) -> asyncio.Future[list[dict[str, Any]]]:
        """Several durable records in one commit (as `append` of each from one turn of the
        loop would be, were the log not idle): the records the start-up closes."""
        futures = [self._enqueue(self._accept(record), True, commit=False)
                   for record in records]
        if futures:
            self._flush_soon()
        return asyncio.gather(*futures)

    def _accept(self, record: Mapping[str, Any]) -> dict[str, Any]:
        if not self._opened:
            raise RuntimeError("AuditLog.open() was not called")
        if self._closed:
            raise AuditUnavailable(_UNAVAILABLE)
        return self._prepare(record)

    def _enqueue(self, prepared: dict[str, Any], durable: bool, *, commit: bool = True
                 ) -> asyncio.Future[dict[str, Any]]:
        """Queues a prepared record for a commit, its caller waiting: at once when the log is
        idle (and `commit`), else the flusher's next commit."""
        # A caller that stops waiting cancels only its future: the record stays in its batch.
        future: asyncio.Future[dict[str, Any]] = running_loop().create_future()
        self._pending.append((prepared, future, durable))
        if commit and not self._flushing and self._worker.idle:
            # Idle: nothing to gather yet, so no turn of the loop is spent waiting for more
            # (docs/benchmarks/README.md, "The express lane and the idle commit").
            self._flushing = True
            self._next_commit()
        else:
            self._flush_soon()
        return future

    def retain(self, record: Mapping[str, Any]) -> bool:
        """Keeps a record whose own append failed (`AuditUnavailable`) for the next commit:
        the next append, a successful `probe()` or `close()` writes it, so a terminal record is
        not lost while the process lives. False when not kept: the log is closed, or already
        holds `MAX_RETAINED` records."""
        if self._closed or not self._opened or len(self._retained) >= MAX_RETAINED:
            return False
        self._retained.append((self._prepare(record), None, False))
        return True

    def _flush_soon(self) -> None:
        """Starts the flusher, if not under way: its first commit starts on the next turn of
        the loop, with what this turn appends."""
        if not self._flushing:
            self._flushing = True
            running_loop().call_soon(self._next_commit)

    def disk_free(self) -> int | None:
        """Bytes an unprivileged writer may still add on the log's volume; None if unknown.

        `statvfs` of the directory needs no file descriptor, so it answers even when the
        process has none left."""
        try:
            stats = os.statvfs(self._path.parent)
        except OSError:
            return None
        return stats.f_bavail * stats.f_frsize

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
        if self._retained:
            self._flush_soon()  # what a failed commit kept, now that the file is writable
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
        await self.until_quiet()
        if self._retained:  # one last try for records a failed commit kept
            self._flush_soon()
            await self.until_quiet()
            if self._retained:
                log.error("audit.records_lost", path=str(self._path), records=len(self._retained))
        await self._in_worker(self._close_fd)
        await self._in_worker(self._reserve.close)
        self._worker.stop()

    # -- event-loop side ---------------------------------------------------------------------

    def _prepare(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A copy with ``ts`` now and placeholders for ``seq`` and ``prev`` (`hash` is added
        when the record is chained)."""
        if self._hash_user_ids:
            record = _with_user_id_hashed(record)
        if not _OWN_KEYS.isdisjoint(record):  # the log's own fields are never the caller's
            record = {key: value for key, value in record.items() if key not in _OWN_KEYS}
        prepared = dict(record)
        prepared["ts"], prepared["seq"], prepared["prev"] = utc_timestamp(), 0, ZERO_HASH
        return prepared

    async def until_quiet(self) -> None:
        """Waits until every record appended so far is committed (or kept after a failed
        commit): nothing pending, no commit under way."""
        if self._flushing:
            if self._quiet is None:
                self._quiet = running_loop().create_future()
            await asyncio.shield(self._quiet)

    def _next_commit(self) -> None:
        """The flusher's step, on the loop: commits what is pending (after what a failed
        commit kept) on the thread, with the fsync of what the loop wrote itself
        (`_unsynced`); with nothing left, the log is quiet. Driven by callbacks, not a task:
        the thread's hand-back (`_committed`) settles the commit on its own turn, so the
        callers resume on the next turn with the log's state already as the commit left it;
        gathering for the next commit starts on that next turn (`_start_gathering`)."""
        if not (self._pending or self._retained or self._unsynced):
            self._now_quiet()
            return
        batch = self._retained + self._pending
        self._retained, self._pending = [], []
        unsynced, self._unsynced = self._unsynced, []  # written by the loop: this fsync's too
        records = [record for record, _, _ in batch]
        done = functools.partial(self._committed, batch, unsynced, time.monotonic())
        looked, chained = self._look_and_chain(records)
        try:
            self._worker.call(self._write_batch, records, self._when_written(batch),
                              bool(unsynced), looked, chained, done=done)
        except Exception as exc:  # noqa: BLE001 - no thread to write with (none could start)
            done(None, exc)

    def _look_and_chain(self, records: list[dict[str, Any]]
                        ) -> tuple[bool | None, _Chained | None]:
        """On the loop, while the log's thread has nothing to do (so neither touches the file
        or the chain state at the same time): the look at the path, and the records chained
        onto the last one written, for the thread to write as they are (`_write_batch`).

        The thread would run both right after waking up, on a CPU that idled: at 200 req/s
        they took it 43–46 µs a commit there, against 27–28 µs on the loop, which has just run
        the request (docs/benchmarks/README.md). (None, None): the thread does both itself (no
        records, no file, or the thread busy); (False, None): the path no longer leads to the
        open file, and the thread reopens it and chains the records itself."""
        if not records or self._fd is None or not self._worker.idle:
            return None, None
        try:
            if not self._still_current():
                return False, None
            data, refused = self._chain(records, first_in_file=not self._size)
        except Exception:  # noqa: BLE001 - a bug: the thread chains them again, and fails them
            return None, None
        return True, (data, refused, self._size)

    def _committed(self, batch: list[_Pending], unsynced: list[dict[str, Any]],
                   started: float, refused: dict[int, Exception] | None,
                   error: BaseException | None) -> None:
        """The thread's hand-back of a commit, on the loop: the callers are resolved (they
        resume on the next turn), then the flusher goes on: after a commit, the next one
        first gathers (`_gather`); after a failure with nothing new pending, the records
        kept wait for the next append, probe or close."""
        try:
            if error is None:
                assert refused is not None
                self._succeeded(batch, refused, started)
            else:
                self._failed(batch, unsynced, error)
        except Exception as exc:  # a bug must not strand the callers, nor stop the flusher
            log.exception("audit.write_error", path=str(self._path))
            _reject(batch, exc)
        if error is not None and not self._pending:
            self._now_quiet()
        elif self._pending or self._retained or self._unsynced:
            running_loop().call_soon(self._start_gathering)
        else:
            self._now_quiet()

    def _succeeded(self, batch: list[_Pending], refused: dict[int, Exception],
                   started: float) -> None:
        _settle(batch, range(len(batch)), refused)
        if batch:  # (the loop's own writes were counted when written)
            self._metrics.audit_committed(len(batch) - len(refused),
                                          time.monotonic() - started)
        self._note_success()
        for index, cause in refused.items():
            record, future, _ = batch[index]
            if future is None:
                log.error("audit.record_not_encodable", record_event=record.get("event"),
                          request_id=record.get("requestId"), error=type(cause).__name__)

    def _failed(self, batch: list[_Pending], unsynced: list[dict[str, Any]],
                error: BaseException) -> None:
        if isinstance(error, OSError):
            self._metrics.audit_failed()
            self._note_failure(error)
        else:  # a bug must fail its batch, not strand the callers
            log.error("audit.write_error", path=str(self._path), exc_info=error)
        self._fail(batch, error, unsynced)

    def _start_gathering(self) -> None:
        """On the turn after a commit's hand-back (the one its callers resume on): what is
        pending now is where gathering starts from, as when a flusher task resumed then."""
        self._gather(GATHER_TURNS, time.monotonic() + GATHER_S, len(self._pending))

    def _gather(self, turns: int, deadline: float, waiting: int) -> None:
        """Before a commit that follows another: lets the requests already under way append
        first. The event loop turns again while a turn adds records, at most `GATHER_TURNS`
        times and `GATHER_S` seconds. A commit's fixed cost (the thread's wake-ups and
        hand-offs of the GIL, the fsync) is then shared by more records."""
        running_loop().call_soon(self._gathered, turns - 1, deadline, waiting)

    def _gathered(self, turns: int, deadline: float, waiting: int) -> None:
        added = len(self._pending) != waiting
        if added and turns > 0 and time.monotonic() < deadline:
            self._gather(turns, deadline, len(self._pending))
        else:
            self._next_commit()

    def _now_quiet(self) -> None:
        self._flushing = False
        quiet, self._quiet = self._quiet, None
        if quiet is not None and not quiet.done():
            quiet.set_result(None)

    def _when_written(self, batch: list[_Pending]
                      ) -> Callable[[dict[int, Exception]], None] | None:
        """For the writer thread, between write and fsync: acknowledges the records whose
        callers wait for the write only (`durable=False`)."""
        shown = [i for i, (_, future, durable) in enumerate(batch)
                 if future is not None and not durable]
        if not shown:
            return None
        loop = running_loop()

        def written(refused: dict[int, Exception]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, batch, shown, refused)

        return written

    def _fail(self, batch: list[_Pending], cause: BaseException,
              unsynced: Iterable[dict[str, Any]] = ()) -> None:
        """Callers waiting for a failed commit get `AuditUnavailable`. Records already
        acknowledged as written (their fsync failed, so the write was cut back) are kept for
        the next commit, in their order, as are records kept from an earlier failure; the
        records the loop wrote itself before the batch (`unsynced`) go first, those the
        failure cut back (the ones it did not make durable in the file they were left in)."""
        kept = [(record, None, False) for record, future, durable in batch
                if future is None or (not durable and _acknowledged(future))]
        durable_seq = self._durable[1]  # (the thread is done: its state can be read)
        cut = [(record, None, False) for record in unsynced if record["seq"] > durable_seq]
        self._retained = cut + kept + self._retained
        _reject(batch, cause)

    async def _in_worker(self, func: Callable[..., _T], *args: Any) -> _T:
        return await self._worker.run(func, *args)

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

    def _write_batch(self, records: list[dict[str, Any]],
                     written: Callable[[dict[int, Exception]], None] | None = None,
                     sync: bool = False, looked: bool | None = None,
                     chained: _Chained | None = None) -> dict[int, Exception]:
        """Chain `records` onto the last one written, write them at once (then call
        `written`) and fsync; returns the records that cannot be encoded (by index), which
        are left out of the chain. `sync`: records the loop wrote itself wait for this
        fsync, which then runs even with nothing to write. (One look at the path a commit
        with records: with none, what the loop wrote is in the open file, wherever its path
        leads now, and this fsync makes it durable there; the next commit with records looks
        at the path.) `looked` and `chained`: the look and the chain the loop made before
        handing the commit over (`_look_and_chain`); the lines are written as they are when
        the file is still the one they were chained for, else the records are chained again."""
        if looked is None:
            current = self._fd is not None and (not records or self._still_current())
        else:
            current = looked and self._fd is not None
        if sync and self._fd is not None and not current:
            self._sync(self._fd)  # they are in the file being left (moved or replaced)
        fd = self._writable_fd(current)
        if chained is not None and current and chained[2] == self._size:
            data, refused = chained[0], chained[1]
        else:
            data, refused = self._chain(records, first_in_file=not self._size)
        if not data and not sync:
            if written is not None:
                written(refused)
            return refused
        if data and self._size and self._size + len(data) > self._max_bytes:
            if sync:  # what the loop wrote here is made durable before the file is rotated
                self._sync(fd)
            fd = self._rotate()
            data, refused = self._chain(records, first_in_file=True)
        with self._io_lock:  # see `halt()`
            try:
                if data:
                    _write_all(fd, data)
                if written is not None:
                    written(refused)
                if self._fsync:
                    os.fsync(fd)
                    self.fsyncs += 1
            except OSError:
                self._undo_partial(fd)
                raise
        if data:
            self._size += len(data)
            self._seq, self._prev = seq_and_hash(records, refused)
        self._durable = (self._size, self._seq, self._prev)
        return refused

    def _sync(self, fd: int) -> None:
        with self._io_lock:
            try:
                os.fsync(fd)
            except OSError:
                self._undo_partial(fd)
                raise
            self.fsyncs += 1
        self._durable = (self._size, self._seq, self._prev)

    def _write_now(self, record: dict[str, Any]) -> bool:
        """On the event loop: chain and write `record` (prepared) at once, while the log's
        thread has nothing to do (so neither touches the file or the chain state at the same
        time), and leave its fsync to a commit started now. A write the thread would make
        differently (a rotation, a record it refuses, a file to reopen) or that fails is left
        to it: False, and `record` goes the usual way (chained again); a failed write raises
        `AuditUnavailable`, as a failed commit does. Saves a record that need not be durable
        before the answer (`append(durable=False)`) the thread's round trip: about 0.1 ms on
        a quiet gateway. (A record whose caller waits for its fsync is left to the thread: a
        write that blocks, on a throttled or stalled disk, then blocks no request but its
        own. Written here, it measured no faster.)"""
        fd = self._fd
        if fd is None or not self._io_lock.acquire(blocking=False):  # (held after `halt()`)
            return False
        started = time.monotonic()
        try:
            if not self._still_current():
                return False
            data, refused = self._chain([record], first_in_file=not self._size)
            if refused or self._size + len(data) > self._max_bytes:
                return False
            try:
                _write_all(fd, data)
            except OSError as exc:  # as a failed commit: nothing of it stays, the log is
                self._undo_partial(fd)  # unhealthy, and the caller hears of it
                self._metrics.audit_failed()
                self._note_failure(exc)
                raise AuditUnavailable(_UNAVAILABLE) from exc
        finally:
            self._io_lock.release()
        self._size += len(data)
        self._seq, self._prev = record["seq"], record["hash"]
        self._unsynced.append(record)
        self._metrics.audit_committed(1, time.monotonic() - started)
        self._flush_soon()  # its fsync (with what else this turn of the loop appends)
        return True

    def _chain(self, records: list[dict[str, Any]], *, first_in_file: bool
               ) -> tuple[bytes, dict[int, Exception]]:
        """One canonical form, one hash and one line per record."""
        seq, prev = self._seq, self._prev
        first = first_in_file
        lines: list[bytes] = []
        refused: dict[int, Exception] = {}
        for index, record in enumerate(records):
            record.pop("hash", None)  # chained again after a failed commit
            record["seq"], record["prev"] = seq + 1, prev
            keyed_first = first and self._key is not None
            if keyed_first or CHAIN_FIELD in record:
                mark(record, keyed_first)  # ``chain`` on the first record of a keyed file
            try:
                body = jsoncodec.canonical_line(record)
            except (ValueError, TypeError) as exc:  # not JSON: this record alone is refused
                refused[index] = exc
                continue
            digest = chain_digest(prev, body, self._key)
            record["hash"] = digest
            lines.append(_line(body, digest))
            seq, prev, first = seq + 1, digest, False
        return b"".join(lines), refused

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

    def _writable_fd(self, current: bool) -> int:
        """The open descriptor of the current file, reopened if lost, removed or replaced.
        `current`: whether the path still leads to it (`_still_current`, just looked at)."""
        if self._fd is not None and not current:
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
        fd, st = self._reserve.run(lambda: open_locked(self._path, fsync_dir=self._fsync))
        self._reserve.refill()
        same = (st.st_dev, st.st_ino) == self._identity
        size = min(st.st_size, self._durable[0]) if same else st.st_size
        if same:  # what was cut away (never made durable) is no longer the chain's end
            self._seq, self._prev = self._durable[1], self._durable[2]
        try:
            if st.st_size > size:
                os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._identity, self._size = fd, (st.st_dev, st.st_ino), size
        self._durable = (size, self._seq, self._prev)
        return fd

    def _undo_partial(self, fd: int) -> None:
        """Cut the file back to its durable size and drop the descriptor: retries reopen."""
        size, self._seq, self._prev = self._durable
        self._size = size
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass  # _reopen() cuts it on the next attempt
        self._close_fd()

    def _rotate(self) -> int:
        self._close_fd()
        number = self._reserve.run(lambda: last_rotation(self._path)) + 1
        target = rotated_path(self._path, number)
        os.rename(self._path, target)
        self._identity = None
        log.info("audit.rotated", path=str(self._path), rotated_to=str(target), seq=self._seq)
        return self._reopen()  # fsyncs the directory: the rename and the new file are durable

    def _probe_sync(self) -> None:
        self._close_fd()  # a fresh descriptor: the old one may be what broke
        fd = self._reopen()
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


def _line(canonical_bytes: bytes, digest: str) -> bytes:
    """The line of a record: its canonical form with ``hash`` added last, so the record is
    encoded once. One line for every reader: see `jsoncodec.one_line` (the hash covers the
    parsed values)."""
    line = b"".join((canonical_bytes[:-1], b',"hash":"', digest.encode("ascii"), b'"}\n'))
    return jsoncodec.one_line(line)


def _with_user_id_hashed(body: Mapping[str, Any]) -> dict[str, Any]:
    """`body` with ``userId`` replaced, in place in the key order, by ``userIdHash``."""
    hashed: dict[str, Any] = {}
    for key, value in body.items():
        if key == "userId":
            key, value = "userIdHash", hash_user_id(value) if isinstance(value, str) else value
        hashed[key] = value
    return hashed


def seq_and_hash(records: list[dict[str, Any]], refused: Mapping[int, Exception]
                 ) -> tuple[int, str]:
    """seq and hash of the last record of a batch that was written."""
    if not refused:
        return records[-1]["seq"], records[-1]["hash"]
    last = next(r for i, r in reversed(list(enumerate(records))) if i not in refused)
    return last["seq"], last["hash"]


def _settle(batch: list[_Pending], indexes: Iterable[int], refused: dict[int, Exception]
            ) -> None:
    """Resolves the futures at `indexes` not yet resolved: the record, or the encoder's error
    for a record that is not JSON."""
    for index in indexes:
        record, future, _ = batch[index]
        if future is not None and not future.done():
            if index in refused:
                set_exception(future, refused[index])
            else:
                future.set_result(record)


def _acknowledged(future: asyncio.Future[dict[str, Any]]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _reject(batch: list[_Pending], cause: BaseException) -> None:
    for _, future, _ in batch:
        if future is not None and not future.done():
            error = AuditUnavailable(_UNAVAILABLE)
            error.__cause__ = cause
            set_exception(future, error)
