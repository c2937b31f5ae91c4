"""structlog set-up: JSON lines to stderr (console on a terminal), with secrets redacted.

`configure()` runs once at start-up. The audit log is not a log and never passes through here.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

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
        if name.lower() in REDACTED_KEYS:
            event[name] = "[redacted]"
        elif isinstance(event[name], str):
            event[name] = _BEARER.sub(r"\1[redacted]", _JWT.sub("[redacted-jwt]", event[name]))
    return event


def configure(level: str = "info", fmt: str = "auto") -> None:
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer() if console
                     else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
