"""A frame's compute handed to an executor and its result handed back to the event loop in one step
(issue 14's runtime overhead): the worker's decode + tail (runtime.worker.service); the agent's board
thread could take it too.

``loop.run_in_executor`` + ``asyncio.shield`` (what ``InferenceService.process`` used) returns through a
``concurrent.futures.Future``, its condition lock, a ``call_soon_threadsafe`` to copy the state into an
asyncio future, then one more loop pass for the shield's outer future before the awaiting task runs. Here
the executor thread schedules the result straight onto the loop: one ``call_soon_threadsafe``, one future.
Measured on uvloop, job end to the awaiting coroutine running, 5 ms idle before each job, six alternating rounds
under the bench lock (overhead.md, 04:03): p50 17 us run_in_executor + shield, 11 us here. In
``edgesplit bench`` the gain is below what three runs resolve (803 KB 2.21 -> 2.18 ms, means of three): after a
thread that computed (torch, 10 ms), waking the loop costs 67 us this way and 83 us the other (04:21), most of it
the wake-up itself.

The slot a frame holds is given back (``on_end``) when the compute has really ended, not when its waiter
stops waiting: a caller that is cancelled or times out cannot pile work up past the queue bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any


def submit(executor: Executor, fn: Callable[[], Any], on_end: Callable[[], None] | None = None) -> asyncio.Future[Any]:
    """Run ``fn()`` on ``executor``; the future (of the running loop) gets its result or exception.
    ``on_end()`` runs on the loop once ``fn`` has ended, whether or not anyone still waits (a cancelled
    future drops the result). Raises RuntimeError where the executor is shut down (``on_end`` not called)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def run() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = fn()
        except BaseException as e:  # handed to the waiter, as run_in_executor would
            error = e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the process is ending, nobody waits
            loop.call_soon_threadsafe(_settle, fut, value, error, on_end)

    executor.submit(run)
    return fut


def _settle(fut: asyncio.Future[Any], value: Any, error: BaseException | None, on_end: Callable[[], None] | None) -> None:
    try:
        if on_end is not None:
            on_end()
    finally:
        if not fut.done():  # else its waiter was cancelled: the result (or error) is dropped
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)
