"""One timer per stream (server.watchdog) bounds each wait as `asyncio.timeout` per
wait did: from the wait's start (idle) or at one deadline, time between waits not
counted, someone else's cancellation left a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from server.watchdog import Watchdog


async def test_each_wait_is_bounded_from_its_own_start() -> None:
    watchdog = Watchdog(idle_s=0.15)
    try:
        for _ in range(6):  # 0.3 s in all: more than the bound, each wait within it
            await watchdog.wait(asyncio.sleep(0.05))
        await asyncio.sleep(0.3)  # between waits: not counted
        assert await watchdog.wait(asyncio.sleep(0.01, result="late but fine")) == "late but fine"
        with pytest.raises(TimeoutError):
            await watchdog.wait(asyncio.sleep(1))
        assert watchdog.fired
    finally:
        watchdog.close()


async def test_a_deadline_bounds_all_waits_together() -> None:
    watchdog = Watchdog(deadline=asyncio.get_running_loop().time() + 0.2)
    try:
        await watchdog.wait(asyncio.sleep(0.1))
        with pytest.raises(TimeoutError):
            await watchdog.wait(asyncio.sleep(0.2))
    finally:
        watchdog.close()


async def test_the_earlier_of_idle_and_deadline_applies() -> None:
    loop = asyncio.get_running_loop()
    watchdog = Watchdog(idle_s=10, deadline=loop.time() + 0.1)
    started = loop.time()
    with pytest.raises(TimeoutError):
        await watchdog.wait(asyncio.sleep(5))
    assert loop.time() - started < 1
    watchdog.close()


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    watchdog = Watchdog(idle_s=5)

    async def waiting() -> None:
        await watchdog.wait(asyncio.sleep(10))

    task = asyncio.create_task(waiting())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not watchdog.fired
    watchdog.close()


async def test_an_expired_wait_leaves_the_task_usable() -> None:
    watchdog = Watchdog(idle_s=0.05)
    with pytest.raises(TimeoutError):
        await watchdog.wait(asyncio.sleep(1))
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # no cancellation left pending
    assert await watchdog.wait(asyncio.sleep(0, result=1)) == 1
    watchdog.close()
