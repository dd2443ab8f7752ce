"""cancel_and_wait stops a task even when one cancellation is swallowed; CloseLater closes what was replaced."""

from __future__ import annotations

import asyncio

import pytest

from runtime.wire.asyncutil import CloseLater, cancel_and_wait


def test_cancel_and_wait_recancels_a_task_that_swallowed_a_cancellation():
    swallowed = []

    async def stubborn():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if not swallowed:  # what a lost wait_for cancellation looks like to the loop
                    swallowed.append(True)
                    continue
                raise

    async def main():
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(task, timeout=5, interval=0.05), 10)
        return task

    task = asyncio.run(main())
    assert swallowed and task.cancelled()


def test_cancel_and_wait_gives_up_after_its_timeout():
    release = []

    async def immortal():  # ignores cancellation until released
        while not release:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    async def main():
        task = asyncio.create_task(immortal())
        await asyncio.sleep(0)
        await asyncio.wait_for(cancel_and_wait(task, timeout=0.3, interval=0.05), 5)
        still_running = not task.done()
        release.append(True)
        task.cancel()  # wakes it; it sees the release and ends
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
        return still_running

    assert asyncio.run(main())


class _Closing:
    def __init__(self, fail: bool = False):
        self.closed, self.fail = 0, fail

    async def close(self) -> None:
        self.closed += 1
        if self.fail:
            raise RuntimeError("close failed (test)")


def test_close_later_closes_after_its_delay_and_not_before():
    async def main():
        later, obj = CloseLater(0.1), _Closing()
        later.add(obj)
        await asyncio.sleep(0.02)
        early = obj.closed
        for _ in range(100):  # bounded: 2 s at most
            if obj.closed:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0)  # the close task's done callback
        return early, obj.closed, len(later)

    assert asyncio.run(main()) == (0, 1, 0)


def test_close_now_closes_the_waiting_at_once_and_a_failed_close_stops_no_other(caplog):
    async def main():
        later = CloseLater(30.0)
        objs = [_Closing(), _Closing(fail=True), _Closing()]
        for o in objs:
            later.add(o)
        assert len(later) == 3 and not any(o.closed for o in objs)
        await asyncio.wait_for(later.close_now(), 5)
        await later.close_now()  # nothing left: no second close
        return [o.closed for o in objs], len(later)

    assert asyncio.run(main()) == ([1, 1, 1], 0)
    assert "close failed (test)" in caplog.text


def test_close_later_refuses_a_bad_delay():
    with pytest.raises(ValueError, match="finite number of seconds"):
        CloseLater(float("nan"))
