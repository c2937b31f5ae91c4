"""`python -m benchmarks.without PARTS ARGS…`: `python -m gateway ARGS…` with parts of the request
path removed (PARTS: comma-separated names of `PARTS`), for `benchmarks.instructions --without`;
`benchmarks.stages --without` removes them the same way in the process it times.

A part the gateway has no setting for is priced by counting the gateway without it: each is
replaced, in this process only, by the cheapest stand-in that still lets a deactivation
succeed. The gateway never runs this way outside a count; the difference of the counts is what
the part costs a request, not a change anyone could ship.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any


def _replace(owner: Any, **attributes: Any) -> None:
    """Monkeypatching, on purpose: `owner`'s attributes replaced in this process."""
    for name, value in attributes.items():
        setattr(owner, name, value)


def _access_line() -> None:
    from gateway.http import envelope

    _replace(envelope, access=lambda *_args, **_fields: None)  # the request's: no line


def _metrics() -> None:
    from gateway.metrics import Metrics

    _replace(Metrics, **dict.fromkeys(
        ("request", "request_started", "request_finished", "upstream_attempt", "token_cache_hit",
         "audit_committed"), lambda *_args, **_kwargs: None))


def _connection_guard() -> None:
    from aiohttp.web_protocol import RequestHandler

    from gateway.http.connection import GuardedRequestHandler

    # aiohttp's own: no head limit, head deadline or idle/busy line for the connection gate.
    _replace(GuardedRequestHandler, data_received=RequestHandler.data_received)


def _caller_key() -> None:
    from gateway.auth import Authenticator, Caller

    checked = Authenticator.authenticate
    known: dict[tuple[int, str | None], Caller] = {}

    def authenticate(self: Authenticator, authorization: str | None) -> Caller:
        caller = known.get((id(self), authorization))
        if caller is None:  # each Authorization value hashed and compared once
            caller = known[(id(self), authorization)] = checked(self, authorization)
        return caller

    _replace(Authenticator, authenticate=authenticate)


def _breaker() -> None:
    from gateway.breaker import CircuitBreaker, Pass

    _replace(CircuitBreaker, before_call=lambda _self, bot: Pass(bot),
             record=lambda _self, _ticket, ok: None, release=lambda _self, _ticket: None)


def _audit_path_look() -> None:
    from gateway.audit.log import AuditLog

    # The path is taken to lead to the open file still: no `stat` before a write.
    _replace(AuditLog, _still_current=lambda _self: True)


def _terminal_record_wait() -> None:
    from gateway.audit.log import AuditLog

    append = AuditLog.append

    async def queued(self: AuditLog, record: Any, *, durable: bool = True) -> Any:
        if durable or self._closed or not self._opened:
            return await append(self, record, durable=durable)
        prepared = self._prepare(record)
        self._pending.append((prepared, None, False))
        self._flush_soon()  # written and fsynced by the log's thread, later
        return prepared

    _replace(AuditLog, append=queued)


# name → (what the count leaves out, how)
PARTS: dict[str, tuple[str, Callable[[], None]]] = {
    "access-line": ("the access line (none written)", _access_line),
    "metrics": ("the request path's metrics (nothing counted)", _metrics),
    "connection-guard": ("the connection guard (aiohttp's own data_received)",
                         _connection_guard),
    "caller-key": ("the caller key's hash and comparisons (once per key)", _caller_key),
    "breaker": ("the circuit breaker (always closed)", _breaker),
    "audit-path-look": ("the look at the audit file's path before each write (never moved)",
                        _audit_path_look),
    "terminal-record-wait": (("the terminal record in the file before the answer (queued "
                              "for the log's thread instead)"), _terminal_record_wait),
}


def unknown(parts: Iterable[str]) -> list[str]:
    """The names among `parts` that `PARTS` does not know, sorted."""
    return sorted(set(parts) - set(PARTS))


def label(parts: str) -> str:
    """How a run without `parts` (comma-separated) is named in the counts and timings."""
    return "without " + " + ".join(parts.split(","))


def remove(parts: Iterable[str]) -> None:
    """Replaces each named part; raises ValueError for a name `PARTS` does not know."""
    wanted = list(parts)
    strangers = unknown(wanted)
    if strangers:
        raise ValueError(f"unknown part(s) {', '.join(strangers)}; known: {', '.join(PARTS)}")
    for name in wanted:
        PARTS[name][1]()


def main(argv: Sequence[str] | None = None) -> Any:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(__doc__.split("\n")[0], file=sys.stderr)
        return 2
    remove(filter(None, args[0].split(",")))
    from gateway.cli import main as gateway_main

    return gateway_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())
