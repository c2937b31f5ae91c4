"""A worker's heap once it listens: start-up frozen, young collections rarer."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.http.server import GC_YOUNG_THRESHOLD, settle_heap


@pytest.fixture
def restored_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_collector")
def test_settle_heap_freezes_start_up_and_raises_only_the_young_threshold() -> None:
    before = gc.get_threshold()

    settle_heap()

    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
    assert GC_YOUNG_THRESHOLD > before[0]
