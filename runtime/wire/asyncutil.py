"""Small asyncio helpers shared by the daemons."""

from __future__ import annotations

import asyncio
import logging
import math
import random
from typing import Protocol

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


class Closeable(Protocol):
    async def close(self) -> None: ...


class CloseLater:
    """Close what was replaced once the work that may still hold it is done: each object given to :meth:`add` is
    closed ``after`` seconds later (frames in flight on an old stream or coordinator finish meanwhile), or at once
    by :meth:`close_now` (the owner closing), so none is left open when its owner is closed. A close that raises
    is logged, not lost in an unretrieved task."""

    def __init__(self, after: float = 30.0):
        if not (math.isfinite(after) and after >= 0):
            raise ValueError(f"close-later delay must be a finite number of seconds >= 0, got {after!r}")
        self.after = after
        self._waiting: list[tuple[Closeable, asyncio.TimerHandle]] = []  # not closed yet, with the timer that will
        self._closing: set[asyncio.Task] = set()  # closes started by a timer, held until they end

    def __len__(self) -> int:
        """Objects not yet closed (waiting for their time or closing)."""
        return len(self._waiting) + len(self._closing)

    def add(self, obj: Closeable) -> None:
        """Close ``obj`` ``after`` seconds from now (on the running loop)."""
        loop = asyncio.get_running_loop()
        self._waiting.append((obj, loop.call_later(self.after, self._due, obj)))

    def _due(self, obj: Closeable) -> None:
        self._waiting = [(o, h) for o, h in self._waiting if o is not obj]
        task = asyncio.get_running_loop().create_task(_close_logged(obj))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_now(self) -> None:
        """Close every object still waiting, now, and wait for the closes already started."""
        waiting, self._waiting = self._waiting, []
        for _, handle in waiting:
            handle.cancel()
        await asyncio.gather(*(_close_logged(o) for o, _ in waiting), *list(self._closing))


async def _close_logged(obj: Closeable) -> None:
    try:
        await obj.close()
    except Exception:  # one object's failed close must not stop the others'
        logger.warning("closing %r failed", obj, exc_info=True)


class Backoff:
    """Exponential back-off for retry loops: ``initial``, then times ``multiplier`` per failure, never
    above ``maximum``; :meth:`reset` after a success starts again at ``initial``.

    ``jitter`` (0..1) draws each delay uniformly from ``[delay * (1 - jitter), delay]``, so many
    clients that lost the same server do not all retry at the same instant.
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, multiplier: float = 2.0, jitter: float = 0.0,
                 rng: random.Random | None = None):
        if not (math.isfinite(initial) and initial >= 0):
            raise ValueError(f"back-off initial delay must be a finite number of seconds >= 0, got {initial!r}")
        if not (math.isfinite(maximum) and maximum >= initial):
            raise ValueError(f"back-off maximum {maximum!r} must be finite and at least the initial {initial!r}")
        if not multiplier >= 1:
            raise ValueError(f"back-off multiplier must be at least 1, got {multiplier!r}")
        if not 0 <= jitter <= 1:
            raise ValueError(f"back-off jitter must be within [0, 1], got {jitter!r}")
        self.initial, self.maximum, self.multiplier, self.jitter = initial, maximum, multiplier, jitter
        self._rng = rng or random.Random()
        self._delay = initial

    @property
    def current(self) -> float:
        """The delay the next failure waits (before jitter)."""
        return self._delay

    def next(self) -> float:
        """The delay to wait after one more failure; the one after it grows (bounded by ``maximum``)."""
        delay = self._delay
        self._delay = min(delay * self.multiplier, self.maximum)
        if self.jitter:
            delay *= 1.0 - self.jitter * self._rng.random()
        return delay

    def reset(self) -> None:
        """A success: the next failure waits ``initial`` again."""
        self._delay = self.initial

    async def sleep(self) -> float:
        """Wait :meth:`next` seconds; returns how long."""
        delay = self.next()
        await asyncio.sleep(delay)
        return delay
