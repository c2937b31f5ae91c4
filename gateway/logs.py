"""structlog set-up: JSON lines to stderr (console on a terminal), with secrets redacted, and
optionally the same lines appended to a size-rotated file (`LogFile`) for a log shipper.

`configure()` runs once at start-up. It sends everything the process logs through the same
redaction: the gateway's own structlog events, and the standard-library logging of its
libraries (`aiohttp.server`, `aiohttp.access`, `aiohttp.web`, `asyncio`, `redis`, the root
logger, `warnings`) through structlog's `ProcessorFormatter`, plus uncaught exceptions in any
thread and unraisable ones. What is redacted:

- fields named like a secret (`REDACTED_KEYS`), whatever their value;
- in every text: anything shaped like a JWT, a credential after `Bearer` or `Basic`, a
  gateway key (`kgw_…`), the `user:password@` of a URL, the value of a credential-carrying
  header line (`Authorization: …`, `Cookie: …`), and a Python bytes literal (`b'…'`: how
  libraries show raw bytes they received);
- in exception messages (tracebacks included) and in library log messages, also every quoted
  literal (`'…'`, `"…"`): that is how a library quotes the request line or header it refused.

The audit log is not a log and never passes through here. `access()` writes the one line per
answered request without structlog's processor chain: the same fields, context variables,
timestamp and redaction, to the same stream, built in one step (the chain costs several times
more, once per request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import orjson
import structlog

# Keys whose values are never written, whatever a call site passes by mistake.
REDACTED_KEYS = frozenset({
    "secret", "client_secret", "private_key", "token", "jwt", "authorization", "auth", "key",
    "api_key", "password", "redis_url", "cookie",
})
_SECRET_SHAPES = re.compile(
    r"(?P<jwt>eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*)"
    r"|(?P<scheme>\b(?i:bearer|basic)\s+)\S+"
    r"|(?P<gwkey>\bkgw_[A-Za-z0-9_-]+)"
    r"|(?P<userinfo>(?<=://)[^/\s@]*@)"
    r"|(?P<header>\b(?i:authorization|proxy-authorization|cookie|set-cookie|x-api-key|api-key)"
    r"\s*[:=]\s*)[^\r\n]+"
    r"|(?P<bytes>\b(?:b|br|rb)'(?:[^'\\]|\\.)*'|\b(?:b|br|rb)\"(?:[^\"\\]|\\.)*\")"
)
_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")
REDACTED = "[redacted]"


def _replace(match: re.Match[str]) -> str:
    kind = match.lastgroup
    if kind == "jwt":
        return "[redacted-jwt]"
    if kind in ("scheme", "header"):
        return match.group(kind) + REDACTED
    if kind == "userinfo":
        return REDACTED + "@"
    if kind == "bytes":
        return "b'" + REDACTED + "'"
    return REDACTED


# In ASCII text every secret shape contains one of these (lower-cased): a text without any is
# returned as it is, without running the pattern (most log fields, once per request).
_SHAPE_MARKERS = ("eyj", "kgw_", "://", "'", '"', "bearer", "basic", "authorization", "cookie",
                  "api-key")


def _has_marker(lowered: str) -> bool:
    # `_SHAPE_MARKERS` spelled out: three times faster than any() over them, and a regular
    # expression of them is slower still (tests/test_logs.py keeps the two lists equal).
    return ("eyj" in lowered or "kgw_" in lowered or "://" in lowered or "'" in lowered
            or '"' in lowered or "bearer" in lowered or "basic" in lowered
            or "authorization" in lowered or "cookie" in lowered or "api-key" in lowered)


def _clean(text: str) -> bool:
    """True when `text` cannot hold a secret shape. Non-ASCII text may match
    case-insensitively in ways lower() misses: it always goes through the pattern."""
    return text.isascii() and not _has_marker(text.lower())


def scrub(text: str) -> str:
    """`text` with every secret shape (see the module docstring) replaced."""
    if _clean(text):
        return text
    return _SECRET_SHAPES.sub(_replace, text)


def scrub_message(text: str) -> str:
    """An exception or library message: `scrub`, and every quoted literal masked too."""
    return _QUOTED.sub("'" + REDACTED + "'", scrub(text))


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drops secret-named fields and masks every secret shape in the others."""
    if _ordinary(event):
        return event
    for name, value in event.items():
        kind = type(value)
        plain = kind in _SCALARS or (kind is str and _clean(value))
        if plain and (_NAMES.get(name) is False or not _secret_name(name)):
            continue  # an ordinary name (looked up inline once known), and nothing to mask
        masked = _masked(name, value)
        if masked is not value:
            event[name] = masked
    return event


_SCALARS = frozenset({int, float, bool, type(None)})
_NAMES: dict[str, bool] = {}  # field name → secret-named; the call sites' names, bounded
_ORDINARY: set[str] = set()  # the names of `_NAMES` that are not secret


def _secret_name(name: str) -> bool:
    secret = _NAMES.get(name)
    if secret is None:
        secret = name.lower() in REDACTED_KEYS
        if len(_NAMES) < 4096:
            _NAMES[name] = secret
            if not secret:
                _ORDINARY.add(name)
    return secret


def _ordinary(event: MutableMapping[str, Any]) -> bool:
    """True when `redact` would change nothing, found in one pass: every name known not to be
    secret, every value a scalar or a text, and the texts clean taken together (joined by a
    line break, which no secret shape's marker contains: each text is then clean alone)."""
    if not _ORDINARY.issuperset(event.keys()):
        return False
    texts = []
    for value in event.values():
        kind = type(value)
        if kind is str:
            texts.append(value)
        elif kind not in _SCALARS:
            return False
    return _clean("\n".join(texts))


def _masked(name: str, value: Any, depth: int = 0) -> Any:
    if _secret_name(name):
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: _masked(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked("", v, depth + 1) for v in value]
    return value


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def render_exception(_: Any, __: str, event: MutableMapping[str, Any]
                     ) -> MutableMapping[str, Any]:
    """`exc_info` → an `exception` text whose exception messages are scrubbed."""
    exc_info = event.pop("exc_info", None)
    if not exc_info:
        return event
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if isinstance(exc_info, tuple) and exc_info[1] is not None:
        event["exception"] = safe_traceback(exc_info[1])
    return event


def safe_traceback(exc: BaseException) -> str:
    """Python's traceback text of `exc` and its chain, every message through `scrub_message`."""
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen and len(chain) < 8:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "direct cause"
        elif not current.__suppress_context__:
            current, link = current.__context__, "context"
        else:
            current = None
    parts: list[str] = []
    for error, led_by in reversed(chain):
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(error.__traceback__))
        kind = type(error)
        name = kind.__qualname__ if kind.__module__ == "builtins" else (
            f"{kind.__module__}.{kind.__qualname__}")
        message = scrub_message(str(error))
        parts.append(f"{name}: {message}\n" if message else f"{name}\n")
        if led_by:
            parts.append("\nThe above exception was the " + (
                "direct cause of the following exception:\n\n" if led_by == "direct cause"
                else "context of the following exception (during handling):\n\n"))
    return "".join(parts).rstrip("\n")


def _library_message(_: Any, __: str, event: MutableMapping[str, Any]
                     ) -> MutableMapping[str, Any]:
    """A standard-library record's message: a library may quote what it was sent."""
    message = event.get("event")
    if isinstance(message, str):
        event["event"] = scrub_message(message)
    return event


def render_json(event: Any, **kw: Any) -> str:
    """One log line: orjson (several times faster), json.dumps for what orjson refuses; what
    some readers take for a line break or a change of text direction is escaped, as in the
    audit (`jsoncodec.one_line`)."""
    try:
        text = orjson.dumps(event, default=kw.get("default")).decode()
    except TypeError:
        text = json.dumps(event, **kw)
    return one_line_text(text)


# What `jsoncodec.one_line` escapes in the audit, for text: U+2028, U+2029, the bidi controls
# U+202A–U+202E and U+2066–U+2069, and U+0085 (NEL).
_LINE_UNSAFE_TEXT = re.compile("[\u2028-\u202e\u2066-\u2069\u0085]")


def one_line_text(text: str) -> str:
    """JSON text with the characters above written as `\\uXXXX` escapes (inside strings, the
    only place JSON lets them be: the text parses to the same values)."""
    if text.isascii():
        return text
    return _LINE_UNSAFE_TEXT.sub(_escape_text, text)


def _escape_text(found: re.Match[str]) -> str:
    return f"\\u{ord(found[0]):04x}"


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


_second = -1
_second_text = ""


def utc_timestamp() -> str:
    """Now as RFC 3339 UTC with microseconds and Z (`2026-11-23T22:47:37.123456Z`); the
    date and time of day are formatted once a second."""
    global _second, _second_text
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    if seconds != _second:
        _second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = seconds
    return f"{_second_text}.{nanos // 1000:06d}Z"


_access_out: structlog.WriteLogger | None = None  # set by configure() for JSON at info level
_access_config: tuple[Any, Any] = (None, None)  # the structlog set-up it belongs to


def _current_config() -> tuple[Any, Any]:
    """Which structlog set-up is in force (another one, e.g. a test's, takes the lines): its
    last processor (a capture swaps the list's contents, not the list) and logger factory."""
    config = structlog.get_config()
    processors = config["processors"]
    return processors[-1] if processors else None, config["logger_factory"]


def access(event: str, **fields: Any) -> None:
    """An info line, as structlog would write it with `configure()`'s processors: context
    variables, the fields, event, level and timestamp, redacted, one JSON line, one write."""
    out = _access_out
    processors, factory = _current_config()
    if out is None or processors is not _access_config[0] or factory is not _access_config[1]:
        # The console format, a level above info, or another set-up than configure()'s.
        structlog.get_logger("gateway.access").info(event, **fields)
        return
    _queue(out, (structlog.contextvars.get_contextvars() | fields, event, utc_timestamp()))


# Access lines of one turn of the event loop, rendered and written together at its end: one
# write() for many requests under load instead of one each (a system call, and a hand-off of
# the GIL to the audit writer's thread), and no request's answer waits for its line to be
# rendered (the answer is sent in the turn the line is queued). Lines are only held until the
# loop's next turn.
_Line = tuple[dict[str, Any], str, str]  # fields (with the context's), event, timestamp
_queued: list[_Line] = []
PIPE_ATOMIC_BYTES = 4096  # POSIX PIPE_BUF: a write up to this size is never mixed with another


def _queue(out: structlog.WriteLogger, entry: _Line) -> None:
    if not _queued:
        try:
            running_loop().call_soon(flush_access, out)
        except RuntimeError:  # no event loop: written at once
            out.msg(_rendered(entry))
            return
    _queued.append(entry)


_seen: tuple[asyncio.AbstractEventLoop, int] | None = None  # a running loop and its thread


def running_loop() -> asyncio.AbstractEventLoop:
    """`asyncio.get_running_loop()`, remembered: the loop seen last, if it is this thread's
    and still runs (a thread runs one loop at a time), else the one asked for (RuntimeError
    when none runs). Asking costs a `getpid` system call on Python 3.11; the request path
    asks for its loop several times a request (the access line, the audit log's appends,
    flusher and hand-offs to its thread)."""
    global _seen
    seen, thread = _seen, threading.get_ident()
    if seen is not None and seen[1] == thread and seen[0].is_running():
        return seen[0]
    loop = asyncio.get_running_loop()
    _seen = (loop, thread)
    return loop


def _rendered(entry: _Line) -> str:
    fields, event, timestamp = entry
    line = redact(None, "info", fields)
    # Added after redaction: the call sites' event names, the level and the clock are ours.
    line["event"] = event
    line["level"] = "info"
    line["timestamp"] = timestamp
    return render_json(line)


def flush_access(out: structlog.WriteLogger | None = None) -> None:
    """Writes the queued access lines: whole lines, at most `PIPE_ATOMIC_BYTES` a write (the
    workers share stderr: a pipe keeps such a write in one piece), one write per longer line."""
    out = out or _access_out
    lines = [_rendered(entry) for entry in _queued]
    _queued.clear()
    if out is None or not lines:
        return
    chunk: list[str] = []
    size = 0
    for text in lines:
        length = (len(text) if text.isascii() else len(text.encode("utf-8", "replace"))) + 1
        if chunk and size + length > PIPE_ATOMIC_BYTES:
            out.msg("\n".join(chunk))
            chunk, size = [], 0
        chunk.append(text)
        size += length
    out.msg("\n".join(chunk))


def configure(level: str = "info", fmt: str = "auto", file: LogFile | None = None) -> None:
    global _access_out, _access_config
    flush_access()  # lines queued for the previous set-up
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty() and file is None)
    renderer: Any = (structlog.dev.ConsoleRenderer() if console
                     else structlog.processors.JSONRenderer(serializer=render_json))
    number = logging.getLevelNamesMapping()[level.upper()]
    stream: Any = sys.stderr if file is None else _Tee(sys.stderr, file)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            render_exception,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        # One write() per line: print() writes the line and its newline separately, and the
        # workers of `serve --workers N` share stderr, so their lines would interleave.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )
    route_standard_logging(number, renderer, stream)
    # The same stream, so the same lock as structlog's own lines: whole lines, never mixed.
    _access_out = structlog.WriteLogger(file=stream) if number <= logging.INFO and not console \
        else None
    _access_config = _current_config()


def route_standard_logging(level: int, renderer: Any, stream: TextIO) -> None:
    """Every standard-library logger (the root's one handler) through the same redaction,
    and uncaught or unraisable exceptions as log lines rather than raw tracebacks."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _library_message,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            render_exception,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    _install_hooks()


_UNCAUGHT = logging.getLogger("gateway.uncaught")


def _install_hooks() -> None:
    def on_uncaught(kind: type[BaseException], exc: BaseException,
                    tb: TracebackType | None) -> None:
        _UNCAUGHT.error("uncaught exception", exc_info=(kind, exc, tb))

    def on_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None and args.exc_type is not SystemExit:
            _UNCAUGHT.error("uncaught exception in a thread",
                            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def on_unraisable(args: Any) -> None:
        if args.exc_value is not None:
            _UNCAUGHT.error("unraisable exception", exc_info=(
                args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = on_uncaught
    threading.excepthook = on_thread
    sys.unraisablehook = on_unraisable


class Throttle:
    """At most `per_s` lines of one event a second: `throttle("event")` is None for a line to
    skip, else how many were skipped before it (to log with it)."""

    def __init__(self, per_s: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self._clock = per_s, clock
        self._windows: dict[str, tuple[int, int, int]] = {}  # event → (second, logged, skipped)

    def __call__(self, event: str) -> int | None:
        second = int(self._clock())
        window, logged, skipped = self._windows.get(event, (second, 0, 0))
        if window != second:
            window, logged = second, 0
        if logged >= self.per_s:
            self._windows[event] = (window, logged, skipped + 1)
            return None
        self._windows[event] = (window, logged + 1, 0)
        return skipped


def skip_note(skipped: int) -> dict[str, int]:
    """The `skipped` field of a throttled line, when lines were skipped before it."""
    return {"skipped": skipped} if skipped else {}
