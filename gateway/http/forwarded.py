"""Who knocked: the client address of a request, from its peer and `X-Forwarded-For`.

`X-Forwarded-For` is believed only when the peer is in `server.trusted_proxies`. Every proxy
appends the address it saw, so the header is read from the right: addresses of trusted proxies
are skipped, and the right-most address that is not trusted is the client. What lies left of
it was written by the client itself and proves nothing. An entry that is not an IP address
ends the walk at the last trusted hop (a proxy that forwards garbage is not believed further);
when every entry is trusted, the left-most one is the client. `Forwarded` (RFC 7239) is not
read. IPv4-mapped IPv6 peers (`::ffff:192.0.2.1` on a dual-stack socket) are shown as IPv4.

`budget_key()` is the address a per-client budget counts against: an IPv4 address, or the /64
of an IPv6 one (one host usually holds a whole /64).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_HOPS = 32  # X-Forwarded-For entries examined, from the right
UNKNOWN = "unknown"  # no peer address (a Unix socket, a connection already gone)


class TrustedProxies:
    """The `server.trusted_proxies` networks and the client address they let through."""

    def __init__(self, cidrs: Sequence[str] = ()) -> None:
        self._networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: IPAddress | None) -> bool:
        return address is not None and any(address in net for net in self._networks)

    def client(self, peer: str | None, forwarded_for: Iterable[str] = ()) -> str:
        """The client address: the peer, or the walk over `X-Forwarded-For` described above."""
        if not peer:
            return UNKNOWN
        if not self._networks:
            return _plain(peer)
        hop = parse_address(peer)
        if hop is None or not self.trusts(hop):
            return _plain(peer)
        entries = [e.strip() for value in forwarded_for for e in value.split(",")]
        for entry in reversed(entries[-MAX_HOPS:]):
            address = parse_address(entry)
            if address is None:
                break
            if not self.trusts(address):
                return str(address)
            hop = address
        return str(hop)


def parse_address(text: str) -> IPAddress | None:
    """An IP address from `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1` or `[2001:db8::1]:80`."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _plain(peer: str) -> str:
    if peer.startswith("::ffff:") and "." in peer:
        return peer[7:]
    return peer


def budget_key(client: str) -> str:
    """What a per-client budget counts against: the address, or an IPv6 address's /64."""
    if ":" not in client:
        return client
    address = parse_address(client)
    if not isinstance(address, ipaddress.IPv6Address):
        return client if address is None else str(address)
    return str(ipaddress.IPv6Network((address, 64), strict=False))
