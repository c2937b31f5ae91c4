"""gateway.http.keyless: the per-address budget of keyless requests and the keyless share."""

from __future__ import annotations

import pytest

from gateway.http.keyless import KeylessBudget
from tests.conftest import FakeClock


@pytest.fixture
def budget(clock: FakeClock) -> KeylessBudget:
    return KeylessBudget(share=2, rate_per_s=10, burst=5, max_hold_s=1.0, clock=clock)


class TestKeylessBudget:
    def test_a_burst_is_answered_at_once_then_held_one_interval_each(
            self, budget: KeylessBudget) -> None:
        holds = [budget.hold_s("192.0.2.1") for _ in range(8)]
        assert holds[:5] == [0.0] * 5
        assert holds[5:] == pytest.approx([0.1, 0.2, 0.3], abs=1e-4)

    def test_each_address_has_its_own_budget(self, budget: KeylessBudget) -> None:
        for _ in range(6):
            budget.hold_s("192.0.2.1")
        assert budget.hold_s("192.0.2.2") == 0.0

    def test_the_budget_refills_with_time(self, budget: KeylessBudget,
                                          clock: FakeClock) -> None:
        for _ in range(6):
            budget.hold_s("192.0.2.1")
        clock.advance(0.6)
        assert budget.hold_s("192.0.2.1") == 0.0

    def test_a_hold_is_capped_and_not_charged(self, budget: KeylessBudget,
                                              clock: FakeClock) -> None:
        holds = [budget.hold_s("192.0.2.1") for _ in range(40)]
        assert holds[-20:] == [1.0] * 20
        clock.advance(1.0)  # had the capped ones been charged, this would still be capped
        assert budget.hold_s("192.0.2.1") == pytest.approx(0.1, abs=1e-4)

    def test_the_share_bounds_held_answers(self, budget: KeylessBudget) -> None:
        assert budget.enter() and budget.enter()
        assert not budget.enter()
        budget.leave()
        assert budget.enter()
