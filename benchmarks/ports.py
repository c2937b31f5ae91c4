"""Listen ports for the servers the benchmarks and the tests start, taken below the kernel's
ephemeral range.

A port from `bind(0)` comes from the ephemeral range, the same range every outgoing
connection takes its local port from: between the moment a run finds such a port free and the
moment its server binds it, a connection (the load generator's, or a gateway's to its stub)
can take it, and the server exits with "address already in use". Below that range no outgoing
connection ever lands.
"""

from __future__ import annotations

import functools
import random
import socket
from pathlib import Path

LOWEST_PORT = 20_000  # above the well-known and most registered service ports
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()  # two calls never give the same port to one process
_pick = random.Random()  # a caller's own seeding of `random` must not make runs collide


@functools.cache
def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's default when unknown), read
    once per process."""
    try:
        return int(_EPHEMERAL_RANGE.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that is free now and outside the ephemeral range, for a server the
    caller starts next; falls back to a `bind(0)` port if that range leaves no room."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    high = ephemeral_low()
    for _ in range(200 if high > LOWEST_PORT else 0):
        port = _pick.randrange(LOWEST_PORT, high)
        if port in _handed_out:
            continue
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
