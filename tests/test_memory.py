"""A started gateway's process collects garbage less often, with start-up frozen."""

from __future__ import annotations

import gc

from server.app import Gateway
from server.memory import YOUNG_GC_THRESHOLD, tune_garbage_collection


async def test_a_started_gateway_tunes_the_collector(gateway: Gateway) -> None:
    assert gc.get_threshold()[0] == YOUNG_GC_THRESHOLD
    assert gc.get_freeze_count() > 10_000  # modules, descriptors, the gateway's own objects


def test_start_up_is_frozen_once_per_process() -> None:
    tune_garbage_collection()
    frozen = gc.get_freeze_count()
    tune_garbage_collection()  # another gateway in the same process (the tests)
    assert gc.get_freeze_count() == frozen
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1  # what is made later is still collected
