"""structlog set-up: JSON lines to stderr (console on a terminal), with secrets redacted.

`configure()` runs once at start-up. The audit log is not a log and never passes through here.
"""

from __future__ import annotations

import json
import logging
import re
import sys
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


def configure(level: str = "info", fmt: str = "auto") -> None:
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
