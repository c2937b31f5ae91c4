"""How many client connections, and from whom: `ConnectionGate`, and the descriptor budget.

A process holds at most `server.max_connections` client connections, and at most
`server.max_connections_per_client` from one client address (an IPv6 client by its /64; peers
in `server.trusted_proxies` are exempt, their connections carry many clients). When a new
connection would pass either limit, the connection within that limit that has been idle
longest is closed to make room, as nginx does: idle means waiting for its next request, with no
byte received for `QUIET_S`. When none is idle, the new connection is refused (a 503
`overloaded` answer, then close). A connection being served is never closed for another.

Every connection is a file descriptor: `raise_fd_limit()` lifts the soft RLIMIT_NOFILE to the
hard one at start-up, and `fd_capped()` lowers `max_connections` to what that leaves after the
descriptors the rest of the process needs (the audit log, the upstream pool, Redis, …).
"""

from __future__ import annotations

import resource
from collections import Counter, OrderedDict
from typing import Protocol

import structlog

from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

QUIET_S = 1.0  # an idle connection that received a byte more recently than this is kept
EVICT_SCAN = 8  # idle candidates looked at before a new connection is refused
FD_RESERVED = 64  # descriptors kept for everything but client connections (plus the pool)


class Gated(Protocol):
    """A client connection as the gate sees it (`connection.GuardedRequestHandler`)."""

    def evictable(self) -> bool: ...

    def evict(self) -> None: ...


class ConnectionGate:
    """Counts open connections per process and per client key; picks whom to close."""

    def __init__(self, limit: int, per_client: int, metrics: Metrics | None = None) -> None:
        self.limit, self.per_client = limit, per_client
        self._metrics = metrics if metrics is not None else Metrics()
        self._open: dict[Gated, str | None] = {}  # connection → its client key (None: exempt)
        self._per_key: Counter[str] = Counter()
        self._idle: OrderedDict[Gated, None] = OrderedDict()  # least recently active first
        self._idle_by_key: dict[str, OrderedDict[Gated, None]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, conn: Gated, key: str | None) -> str | None:
        """Opens `conn` (idle until it sends), or names the limit that refuses it."""
        if len(self._open) >= self.limit and not self._evict(self._idle):
            return "max_connections"
        if (key is not None and self._per_key[key] >= self.per_client
                and not self._evict(self._idle_by_key.get(key))):
            return "max_connections_per_client"
        self._open[conn] = key
        if key is not None:
            self._per_key[key] += 1
        self.idle(conn)
        self._metrics.connections(len(self._open))
        return None

    def idle(self, conn: Gated) -> None:
        """`conn` waits for a request, or received bytes: it goes to the back of the line."""
        if conn not in self._open:
            return
        key = self._open[conn]
        idle = self._idle
        if conn in idle:
            idle.move_to_end(conn)
        else:
            idle[conn] = None  # (a new key goes to the end)
        if key is not None:
            line = self._idle_by_key.get(key)
            if line is None:  # (setdefault would build an OrderedDict on every call)
                line = self._idle_by_key[key] = OrderedDict()
            if conn in line:
                line.move_to_end(conn)
            else:
                line[conn] = None

    def all_idle(self) -> bool:
        """No open connection has a request being served (or one queued for its handler)."""
        return len(self._idle) == len(self._open)

    def busy(self, conn: Gated) -> None:
        """`conn` has a request to serve: never closed for another until it is idle again."""
        self._idle.pop(conn, None)
        key = self._open.get(conn)
        if key is not None and key in self._idle_by_key:
            self._idle_by_key[key].pop(conn, None)

    def release(self, conn: Gated) -> None:
        """`conn` is closed (or about to be); repeated calls are harmless."""
        if conn not in self._open:
            return
        self.busy(conn)
        key = self._open.pop(conn)
        if key is not None:
            self._per_key[key] -= 1
            if not self._per_key[key]:
                del self._per_key[key]
                self._idle_by_key.pop(key, None)
        self._metrics.connections(len(self._open))

    def _evict(self, line: OrderedDict[Gated, None] | None) -> bool:
        for conn in list(line or ())[:EVICT_SCAN]:
            if conn.evictable():
                self.release(conn)
                conn.evict()
                self._metrics.connection_closed("idle_evicted")
                return True
        return False


def raise_fd_limit() -> int:
    """Lifts the soft RLIMIT_NOFILE to the hard limit (as Go's runtime does); the soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def fd_capped(max_connections: int, reserved: int) -> int:
    """`max_connections`, lowered to the descriptors left after `reserved` (at least 1)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_connections
    allowed = max(1, soft - reserved)
    if allowed < max_connections:
        log.warning("server.connections_capped", max_connections=max_connections,
                    allowed=allowed, fd_limit=soft,
                    hint="raise the file-descriptor limit (ulimit -n) to allow more")
    return min(max_connections, allowed)
