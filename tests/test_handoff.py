"""runtime.wire.handoff.submit: the executor's result straight back to the loop, the frame's slot
given back only when the compute has ended (issue 14)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime.wire.handoff import submit


def test_result_and_error_reach_the_waiter():
    ended: list[str] = []

    async def main():
        with ThreadPoolExecutor(1) as ex:
            assert await submit(ex, lambda: threading.current_thread().name, lambda: ended.append("a")) != \
                threading.current_thread().name  # ran on the executor, not on the loop
            with pytest.raises(ZeroDivisionError):
                await submit(ex, lambda: 1 // 0, lambda: ended.append("b"))

    asyncio.run(main())
    assert ended == ["a", "b"]


def test_a_cancelled_waiter_keeps_the_slot_until_the_compute_ends():
    """The queue bound counts running computes: cancelling the frame's task must not free its slot early."""
    gate = threading.Event()
    ended: list[float] = []

    async def main():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1) as ex:
            fut = submit(ex, gate.wait, lambda: ended.append(loop.time()))
            waiter = asyncio.ensure_future(fut)
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await asyncio.sleep(0.05)
            assert ended == []  # still computing: the slot is held
            gate.set()
            for _ in range(200):  # bounded: 2 s at most
                if ended:
                    break
                await asyncio.sleep(0.01)
            assert len(ended) == 1
            assert fut.cancelled()  # the result was dropped, not delivered to nobody

    asyncio.run(main())


def test_a_shut_down_executor_raises_and_ends_nothing():
    ended: list[int] = []

    async def main():
        ex = ThreadPoolExecutor(1)
        ex.shutdown()
        with pytest.raises(RuntimeError):
            submit(ex, lambda: 1, lambda: ended.append(1))

    asyncio.run(main())
    assert ended == []
