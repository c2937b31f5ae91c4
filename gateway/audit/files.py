"""The audit files on disk: the current file and its rotated siblings, opened for appending
under an exclusive lock, and the first and last complete records read back from a file.

Rotated files are ``{stem}.{n:06d}{suffix}`` beside the current one, the oldest n = 1. What is
written into the files, and when, is `audit.py`'s; what a valid record is, `audit_chain.py`'s.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from pathlib import Path

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_OPEN_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_FILE_MODE = 0o640
_TAIL_BLOCK = 8192


class AuditOpenError(Exception):
    """The audit path cannot be used at start-up; the message names the path and the reason."""


def rotated_files(path: Path | str) -> list[Path]:
    """The rotated files of a log, oldest first, then the current file if it exists."""
    path = Path(path)
    return [file for _, file in sorted(rotated(path))] + ([path] if path.exists() else [])


def tail(fd: int, size: int) -> tuple[int, bytes | None]:
    """(offset just past the last newline, last complete line or None) of a file of `size`."""
    block = _TAIL_BLOCK
    while True:
        start = max(0, size - block)
        data = os.pread(fd, size - start, start)
        last_nl = data.rfind(b"\n")
        prev_nl = data.rfind(b"\n", 0, max(last_nl, 0))
        if last_nl >= 0 and (prev_nl >= 0 or start == 0):
            return start + last_nl + 1, data[prev_nl + 1 : last_nl]
        if start == 0:
            return 0, None
        block *= 2


def first_line(fd: int) -> bytes | None:
    """The first complete line of a file (without its newline), or None."""
    block = _TAIL_BLOCK
    while True:
        data = os.pread(fd, block, 0)
        end = data.find(b"\n")
        if end >= 0:
            return data[:end]
        if len(data) < block:
            return None
        block *= 2


def last_record(line: bytes, path: Path) -> tuple[int, str]:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    seq = record.get("seq") if isinstance(record, dict) else None
    digest = record.get("hash") if isinstance(record, dict) else None
    if type(seq) is int and seq >= 1 and isinstance(digest, str) and _HASH_RE.fullmatch(digest):
        return seq, digest
    raise AuditOpenError(f"audit log {path}: the last record has no valid seq and hash")


def last_rotated_record(path: Path) -> tuple[int, str]:
    with path.open("rb") as file:
        size = os.fstat(file.fileno()).st_size
        end, last = tail(file.fileno(), size)
    if last is None or end != size:
        raise AuditOpenError(f"audit log {path}: does not end with a complete record")
    return last_record(last, path)


def rotated(path: Path) -> list[tuple[int, Path]]:
    pattern = re.compile(re.escape(path.stem) + r"\.(\d{6,})" + re.escape(path.suffix))
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [(int(m[1]), path.parent / name) for name in names if (m := pattern.fullmatch(name))]


def last_rotation(path: Path) -> int:
    return max((number for number, _ in rotated(path)), default=0)


def rotated_path(path: Path, number: int) -> Path:
    return path.with_name(f"{path.stem}.{number:06d}{path.suffix}")


def open_locked(path: Path, *, fsync_dir: bool) -> tuple[int, os.stat_result]:
    """Open `path` for appending, creating it and its directories, under an exclusive lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a regular file where a directory should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename) from exc
    fd = os.open(path, _OPEN_FLAGS, _FILE_MODE)
    try:
        try:
            # Two writers on one file would fork the chain.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise OSError(exc.errno, "locked by another audit writer") from exc
        if fsync_dir:
            _fsync_dir(path.parent)  # the file's name is durable too
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def error_reason(exc: OSError, path: Path) -> str:
    reason = exc.strerror or str(exc)
    if exc.filename is not None and str(exc.filename) != str(path):
        reason += f" ({exc.filename})"
    return reason
