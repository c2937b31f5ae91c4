"""structlog set-up: JSON lines to stderr (console on a terminal), with secrets redacted.

`configure()` runs once at start-up. The audit log is not a log and never passes through here.
`access()` writes the one line per answered request without structlog's processor chain: the
same fields, context variables, timestamp and redaction, built in one step (the chain costs
several times more, once per request).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import MutableMapping
from typing import Any

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
    for name, value in event.items():
        if type(value) in _SCALARS and not _secret_name(name):
            continue  # numbers, booleans and None under an ordinary name: nothing to mask
        masked = _masked(name, value)
        if masked is not value:
            event[name] = masked
    return event


_SCALARS = frozenset({int, float, bool, type(None)})
_NAMES: dict[str, bool] = {}  # field name → secret-named; the call sites' names, bounded


def _secret_name(name: str) -> bool:
    secret = _NAMES.get(name)
    if secret is None:
        secret = name.lower() in REDACTED_KEYS
        if len(_NAMES) < 4096:
            _NAMES[name] = secret
    return secret


def _masked(name: str, value: Any, depth: int = 0) -> Any:
    if _secret_name(name):
        return "[redacted]"
    if isinstance(value, str):
        # Each pattern only where its fixed part occurs (the same result, most strings skip).
        if "eyJ" in value:
            value = _JWT.sub("[redacted-jwt]", value)
        if "bearer" in value.lower():
            value = _BEARER.sub(r"\1[redacted]", value)
        return value
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


def access(event: str, **fields: Any) -> None:
    """An info line, as structlog would write it with `configure()`'s processors: context
    variables, the fields, event, level and timestamp, redacted, one JSON line, one write."""
    out = _access_out
    if out is None:  # the console format, a level above info, or configure() never ran
        structlog.get_logger("gateway.access").info(event, **fields)
        return
    line = structlog.contextvars.get_contextvars()
    line.update(fields)
    line["event"] = event
    line["level"] = "info"
    line["timestamp"] = utc_timestamp()
    out.msg(render_json(redact(None, "info", line)))


def configure(level: str = "info", fmt: str = "auto") -> None:
    global _access_out
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
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
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    info_shown = logging.getLevelNamesMapping()[level.upper()] <= logging.INFO
    # The same file, so the same lock as structlog's own lines: whole lines, never mixed.
    _access_out = structlog.WriteLogger(file=sys.stderr) if info_shown and not console else None
