"""The listen ports of the servers the tests and benchmarks start: free, distinct, and out of
the outgoing connections' way."""

from __future__ import annotations

import socket

import pytest

from benchmarks.ports import LOWEST_PORT, ephemeral_low, free_port


def test_ports_are_free_distinct_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert all(LOWEST_PORT <= port < ephemeral_low() for port in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # still free: nothing holds it


def test_ipv6_loopback_gets_a_port_too() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    assert LOWEST_PORT <= free_port("::1") < ephemeral_low()
