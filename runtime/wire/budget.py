"""A byte budget shared by every stream of a worker: the bytes held in incomplete chunked frames.

Each :class:`runtime.wire.transport.FrameAssembler` charges the budget as a frame's chunks arrive
and releases it when the frame completes, fails, is cancelled or its stream ends. A charge that
would pass the total first evicts holders whose frame is older than ``timeout`` (they learn it
on their next message), then refuses with RESOURCE_EXHAUSTED: a stranger that opens streams and
never finishes a frame holds at most the total, and only until someone needs the room.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from runtime.contracts.errors import Overloaded

DEFAULT_TOTAL_BYTES = 256 * 2**20  # all incomplete frames of a worker together
DEFAULT_TIMEOUT_SECONDS = 10.0  # an incomplete frame older than this may be evicted


class Holder(Protocol):
    def evict(self) -> None:
        """Drop the partial frame (the holder's bytes are released by the budget)."""


class ByteBudget:
    """Bytes held per holder, capped in total; stale holders are evicted when room is needed."""

    def __init__(self, total_bytes: int = DEFAULT_TOTAL_BYTES, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self.total_bytes = total_bytes
        self.timeout = timeout
        self.clock = clock
        self.held = 0  # bytes held now, all holders
        self.evicted = 0  # partial frames dropped for age
        self._holders: dict[int, tuple[Holder, int, float]] = {}  # id -> (holder, bytes, since)

    def charge(self, holder: Holder, n: int) -> None:
        """Add ``n`` bytes to ``holder``'s share; Overloaded when the total cannot take them."""
        if self.held + n > self.total_bytes:
            self._evict_stale()
        if self.held + n > self.total_bytes:
            raise Overloaded(f"the worker holds {self.held} bytes of incomplete frames, its limit is "
                             f"{self.total_bytes} (--max-reassembly-bytes); retry, or send smaller frames")
        _, held, since = self._holders.get(id(holder), (holder, 0, self.clock()))
        self._holders[id(holder)] = (holder, held + n, since)
        self.held += n

    def release(self, holder: Holder) -> None:
        entry = self._holders.pop(id(holder), None)
        if entry is not None:
            self.held -= entry[1]

    def age(self, holder: Holder) -> float:
        entry = self._holders.get(id(holder))
        return 0.0 if entry is None else self.clock() - entry[2]

    def _evict_stale(self) -> None:
        now = self.clock()
        for holder, _, since in list(self._holders.values()):
            if now - since > self.timeout:
                self.release(holder)
                holder.evict()
                self.evicted += 1
