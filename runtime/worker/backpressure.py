"""Backpressure on a worker's InferStream: a bounded number of results per stream.

A stream takes a slot before it starts a frame (or queues an error result) and gives it back once
the result has been handed to gRPC. At ``--max-stream-results`` the stream's reader waits, so the
worker stops reading that stream and a client that never reads its results stalls its own writes
(HTTP/2 flow control) instead of growing the worker's memory. The service's ``unsent_results`` is
the sum over its streams (its own accounting, read by tests and operators).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


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
