"""Backpressure on a worker's InferStream: a bounded number of results per stream, and an end for a
stream whose client stopped reading.

A stream takes a slot before it starts a frame (or queues an error result) and gives it back once
the result has been handed to gRPC. At ``--max-stream-results`` the stream's reader waits, so the
worker stops reading that stream and a client that never reads its results stalls its own writes
(HTTP/2 flow control) instead of growing the worker's memory. The service's ``unsent_results`` is
the sum over its streams (its own accounting, read by tests and operators).

Stopping to read bounds such a stream but would keep it (and its slots) for ever; :class:`StallGuard`
ends it: a result handed to gRPC that is not sent within ``--stalled-stream-seconds`` (the client's
receive window stays full: it does not read) ends the stream RESOURCE_EXHAUSTED
(``edgesplit_worker_stalled_streams_total``). The status travels behind the unread results, so a
client that reads again sees them and then the status; the worker frees the stream's state at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from runtime.daemon.interceptors import end_call

logger = logging.getLogger(__name__)


class Accounts(Protocol):
    unsent_results: int  # results of all streams computed or queued and not yet sent


class ResultSlots:
    """One stream's slots; ``take`` before producing a result, ``give`` once it is sent, ``close`` at the end."""

    def __init__(self, limit: int, accounts: Accounts):
        self._free = asyncio.Semaphore(limit)
        self._accounts = accounts
        self.held = 0  # this stream's results not yet sent

    async def take(self) -> None:
        await self._free.acquire()
        self.held += 1
        self._accounts.unsent_results += 1

    async def put(self, queue: asyncio.Queue[Any], item: object) -> None:
        """Take a slot, then queue ``item`` (an error result the stream answers at once)."""
        await self.take()
        await queue.put(item)

    def give(self) -> None:
        self._free.release()
        self.held -= 1
        self._accounts.unsent_results -= 1

    def close(self) -> None:
        """The stream ended: what it still held is no longer anyone's."""
        self._accounts.unsent_results -= self.held
        self.held = 0


class StallGuard:
    """Ends a stream whose result is not sent within ``seconds`` of being handed to gRPC.

    ``arm`` when a result goes to gRPC, ``disarm`` once it is sent (and at the stream's end). The
    guard must be made inside the RPC's task (it cancels that task)."""

    def __init__(self, seconds: float, context: Any, on_stall: Callable[[], None]):
        self.seconds = seconds
        self.context = context  # the RPC's grpc.aio.ServicerContext (None: no status, only the cancel)
        self.on_stall = on_stall  # counts it (the metric)
        self.stalled = False
        self._task = asyncio.current_task()
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.seconds, self._fire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self.stalled = True
        self.on_stall()
        message = (f"this stream's results went unread for {self.seconds:g} s (--stalled-stream-seconds): the worker "
                   "ended it; read results as they come, or open a new stream")
        peer = self.context.peer() if self.context is not None else "?"
        logger.warning("ending the stream from %s: a result could not be sent for %g s (the client does not read)",
                       peer, self.seconds)
        # the status goes out behind the unread results (it completes when the client reads or leaves);
        # the handler task is cancelled at once so its state is freed now
        end_call(self.context, self._task, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
