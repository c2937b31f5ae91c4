"""structlog set-up: JSON lines to stderr (console on a terminal), with secrets redacted, and
optionally the same lines appended to a size-rotated file (`LogFile`) for a log shipper.

`configure()` runs once at start-up. The audit log is not a log and never passes through here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import orjson
import structlog

# Keys whose values are never written, whatever a call site passes by mistake.
REDACTED_KEYS = frozenset({
    "secret", "client_secret", "private_key", "token", "jwt", "authorization", "auth", "key",
    "api_key", "password", "redis_url",
})
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drops secret-named fields and masks anything shaped like a JWT or bearer key."""
    for name in list(event):
        event[name] = _masked(name, event[name])
    return event


def _masked(name: str, value: Any, depth: int = 0) -> Any:
    if name.lower() in REDACTED_KEYS:
        return "[redacted]"
    if isinstance(value, str):
        return _BEARER.sub(r"\1[redacted]", _JWT.sub("[redacted-jwt]", value))
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: _masked(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked("", v, depth + 1) for v in value]
    return value


def render_json(event: Any, **kw: Any) -> str:
    """One log line: orjson (several times faster), json.dumps for what orjson refuses."""
    try:
        return orjson.dumps(event, default=kw.get("default")).decode()
    except TypeError:
        return json.dumps(event, **kw)


class LogFileError(Exception):
    """The log file cannot be opened at start-up; the message names the path and the reason."""


class LogFile:
    """Log lines appended to a file, one `write()` each, for a shipper to tail.

    Past `max_bytes` the file is renamed to `<path>.1` (replacing the previous one; a shipper
    following the file by inode reads its end there) and a new file is begun. A line that
    cannot be written is dropped, never raised: stderr still has it, and logging must not
    stop the gateway. Each process writes its own file (see `worker_file`).
    """

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path, self.max_bytes = Path(path), max_bytes
        self.dropped = 0  # lines that could not be written
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._open()
        except OSError as exc:
            raise LogFileError(f"{self.path}: {exc.strerror or exc}") from None
        self._size = os.fstat(self._fd).st_size

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        try:
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            os.write(self._fd, data)
            self._size += len(data)
        except OSError:
            self.dropped += 1

    def _rotate(self) -> None:
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        fd, self._fd = self._fd, self._open()
        os.close(fd)
        self._size = 0

    def close(self) -> None:
        os.close(self._fd)


class _Tee:
    """What structlog's WriteLogger writes to: stderr, and the log file."""

    def __init__(self, stream: TextIO, file: LogFile) -> None:
        self.stream, self.file = stream, file

    def write(self, text: str) -> None:
        self.stream.write(text)
        self.file.write(text)

    def flush(self) -> None:
        self.stream.flush()


def worker_file(path: str, worker: int) -> str:
    """The log file of worker `worker` of `serve --workers N`: `{stem}-w{n}{suffix}`."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-w{worker}{p.suffix}"))


def configure(level: str = "info", fmt: str = "auto", file: LogFile | None = None) -> None:
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty() and file is None)
    renderer: Any = (structlog.dev.ConsoleRenderer() if console
                     else structlog.processors.JSONRenderer(serializer=render_json))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        # One write() per line: print() writes the line and its newline separately, and the
        # workers of `serve --workers N` share stderr, so their lines would interleave.
        logger_factory=structlog.WriteLoggerFactory(
            file=sys.stderr if file is None else _Tee(sys.stderr, file)),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
