"""gateway.http.forwarded: the client address from the peer and X-Forwarded-For."""

from __future__ import annotations

import pytest

from gateway.http.forwarded import UNKNOWN, TrustedProxies, budget_key, parse_address


class TestTrustedProxies:
    @pytest.mark.parametrize(("peer", "forwarded", "client"), [
        pytest.param("10.0.0.5", ["203.0.113.9"], "203.0.113.9", id="one-hop"),
        pytest.param("10.0.0.5", ["1.1.1.1, 203.0.113.9"], "203.0.113.9", id="right-most"),
        pytest.param("10.0.0.5", ["203.0.113.9, 10.9.9.9"], "203.0.113.9", id="skip-trusted"),
        pytest.param("10.0.0.5", ["10.1.1.1, 10.2.2.2"], "10.1.1.1", id="all-trusted"),
        pytest.param("10.0.0.5", ["203.0.113.9, junk"], "10.0.0.5", id="junk-right"),
        pytest.param("10.0.0.5", ["junk, 203.0.113.9"], "203.0.113.9", id="junk-left"),
        pytest.param("10.0.0.5", ["203.0.113.9:4711"], "203.0.113.9", id="v4-port"),
        pytest.param("10.0.0.5", ["[2001:db8::7]:80"], "2001:db8::7", id="v6-port"),
        pytest.param("10.0.0.5", ["::ffff:203.0.113.9"], "203.0.113.9", id="v4-mapped"),
        pytest.param("10.0.0.5", [], "10.0.0.5", id="no-header"),
        pytest.param("10.0.0.5", ["", " , "], "10.0.0.5", id="empty-entries"),
        pytest.param("192.0.2.1", ["203.0.113.9"], "192.0.2.1", id="peer-not-trusted"),
        pytest.param("::ffff:10.0.0.5", ["203.0.113.9"], "203.0.113.9", id="mapped-peer"),
    ])
    def test_client(self, peer: str, forwarded: list[str], client: str) -> None:
        assert TrustedProxies(["10.0.0.0/8"]).client(peer, forwarded) == client

    def test_without_trusted_proxies_the_header_is_never_read(self) -> None:
        assert TrustedProxies().client("192.0.2.1", ["203.0.113.9"]) == "192.0.2.1"
        assert not TrustedProxies()

    def test_a_mapped_peer_is_shown_as_ipv4(self) -> None:
        assert TrustedProxies().client("::ffff:192.0.2.1") == "192.0.2.1"

    def test_no_peer_is_unknown(self) -> None:
        assert TrustedProxies(["10.0.0.0/8"]).client(None, ["203.0.113.9"]) == UNKNOWN

    def test_only_the_last_hops_are_read(self) -> None:
        """A header of thousands of trusted hops costs a bounded walk."""
        hops = ", ".join(["10.0.0.1"] * 5000)
        assert TrustedProxies(["10.0.0.0/8"]).client("10.0.0.5", [hops]) == "10.0.0.1"


class TestAddresses:
    @pytest.mark.parametrize(("text", "address"), [
        ("192.0.2.1", "192.0.2.1"), (" 192.0.2.1 ", "192.0.2.1"), ("192.0.2.1:80", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"), ("[2001:db8::1]:443", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"), ("unknown", None), ("_hidden", None), ("", None),
        ("999.1.1.1", None),
    ])
    def test_parse_address(self, text: str, address: str | None) -> None:
        parsed = parse_address(text)
        assert (str(parsed) if parsed is not None else None) == address

    def test_budget_key_groups_an_ipv6_host_by_its_64(self) -> None:
        assert budget_key("2001:db8:1:2:aaaa::1") == budget_key("2001:db8:1:2:bbbb::2")
        assert budget_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
        assert budget_key("2001:db8:1:3::1") != budget_key("2001:db8:1:2::1")
        assert budget_key("192.0.2.1") == "192.0.2.1"
