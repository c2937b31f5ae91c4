"""gateway.http.gate: how many connections, from whom, and which idle one makes room."""

from __future__ import annotations

import resource

import pytest

from gateway.http import gate as gate_module
from gateway.http.gate import ConnectionGate, fd_capped
from gateway.metrics import Metrics


class Conn:
    def __init__(self, name: str, idle: bool = True) -> None:
        self.name, self.idle, self.evicted = name, idle, False

    def evictable(self) -> bool:
        return self.idle

    def evict(self) -> None:
        self.evicted = True

    def __repr__(self) -> str:
        return self.name


class TestConnectionGate:
    def test_the_longest_idle_connection_makes_room(self) -> None:
        gate = ConnectionGate(limit=3, per_client=10)
        a, b, c = Conn("a"), Conn("b"), Conn("c")
        for conn in (a, b, c):
            assert gate.admit(conn, "k1") is None
        gate.idle(a)  # a was active just now: b is the longest idle
        assert gate.admit(Conn("d"), "k2") is None
        assert (a.evicted, b.evicted, c.evicted) == (False, True, False)
        assert len(gate) == 3

    def test_busy_connections_are_never_closed_for_another(self) -> None:
        gate = ConnectionGate(limit=2, per_client=10)
        a, b = Conn("a"), Conn("b")
        gate.admit(a, "k")
        gate.admit(b, "k")
        gate.busy(a)
        gate.busy(b)
        assert gate.admit(Conn("c"), "k") == "max_connections"
        assert not a.evicted and not b.evicted

    def test_all_idle_until_one_has_a_request_and_once_it_is_done_or_closed(self) -> None:
        gate = ConnectionGate(limit=5, per_client=5)
        a, b = Conn("a"), Conn("b")
        assert gate.all_idle()  # (none open)
        gate.admit(a, "k")
        gate.admit(b, None)  # exempt ones count too
        assert gate.all_idle()
        gate.busy(b)
        assert not gate.all_idle()
        gate.idle(b)
        assert gate.all_idle()
        gate.busy(a)
        assert not gate.all_idle()
        gate.release(a)
        assert gate.all_idle()

    def test_idle_but_not_quiet_connections_are_kept(self) -> None:
        gate = ConnectionGate(limit=1, per_client=10)
        gate.admit(Conn("a", idle=False), "k")
        assert gate.admit(Conn("b"), "k") == "max_connections"

    def test_one_address_is_capped_and_makes_room_only_among_its_own(self) -> None:
        gate = ConnectionGate(limit=100, per_client=2)
        mine, theirs = [Conn("m1"), Conn("m2")], Conn("t1")
        gate.admit(theirs, "other")
        for conn in mine:
            gate.admit(conn, "me")
            gate.busy(conn)
        assert gate.admit(Conn("m3"), "me") == "max_connections_per_client"
        assert not theirs.evicted
        gate.idle(mine[0])
        assert gate.admit(Conn("m3"), "me") is None and mine[0].evicted

    def test_exempt_connections_count_only_towards_the_limit(self) -> None:
        gate = ConnectionGate(limit=3, per_client=1)
        assert [gate.admit(Conn(str(n)), None) for n in range(3)] == [None] * 3
        assert len(gate) == 3

    def test_release_is_idempotent_and_frees_the_address(self) -> None:
        gate = ConnectionGate(limit=10, per_client=1)
        a = Conn("a")
        gate.admit(a, "k")
        gate.release(a)
        gate.release(a)
        assert len(gate) == 0
        assert gate.admit(Conn("b"), "k") is None

    def test_open_connections_are_a_metric(self) -> None:
        metrics = Metrics()
        gate = ConnectionGate(limit=10, per_client=10, metrics=metrics)
        gate.admit(Conn("a"), "k")
        assert b"kore_gateway_connections 1.0" in metrics.render()


class TestDescriptorBudget:
    def test_connections_are_capped_below_the_descriptor_limit(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(gate_module.resource, "getrlimit", lambda _: (256, 256))
        assert fd_capped(4096, reserved=164) == 92
        assert fd_capped(50, reserved=164) == 50
        monkeypatch.setattr(gate_module.resource, "getrlimit", lambda _: (100, 100))
        assert fd_capped(4096, reserved=164) == 1

    def test_unlimited_descriptors_leave_max_connections(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        monkeypatch.setattr(gate_module.resource, "getrlimit", lambda _: unlimited)
        assert fd_capped(4096, reserved=164) == 4096
