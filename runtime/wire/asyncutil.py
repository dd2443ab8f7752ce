"""Small asyncio helpers shared by the daemons."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task | None, timeout: float = 10.0, interval: float = 0.25) -> None:
    """Cancel ``task`` and wait for it to end, cancelling again until it does (bounded).

    One cancel() is not always enough: on Python 3.11 ``asyncio.wait_for`` drops a cancellation
    that races with its inner awaitable finishing, and a loop around it then carries on.
    """
    if task is None or task.done():
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait([task], timeout=interval)
    if not task.done():
        logger.warning("task %s did not stop within %.1fs of being cancelled", task.get_name(), timeout)
        return
    if not task.cancelled() and task.exception() is not None:
        logger.debug("task %s ended with %r", task.get_name(), task.exception())


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait (bounded) until ``event`` is set; False on timeout."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return False
