"""cancel_and_wait stops a task even when one cancellation is swallowed."""

from __future__ import annotations

import asyncio

from runtime.wire.asyncutil import cancel_and_wait


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
