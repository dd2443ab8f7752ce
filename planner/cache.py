"""Bounded caches with an owner: the planner's only memory between searches.

:class:`LRU` is a small least-recently-used map. :class:`IdentityMemo` keeps values derived from
objects (a profile limited to some transfers) keyed by those objects' identity: an entry holds
its inputs alive, so no other object can have their ids while it lives, and a hit is the same
objects. Whoever owns one decides its size and its lifetime (the
re-planner holds the search's; a one-off search makes its own and drops it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A map of at most ``size`` entries; putting one more evicts the least recently used. Safe to share
    between the event loop and the search thread (a lock around each operation)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"an LRU holds at least one entry, not {size}")
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


class IdentityMemo:
    """Values made from some input objects, remembered per (kind, identity of each input)."""

    def __init__(self, size: int) -> None:
        self._lru: LRU[tuple[object, ...], tuple[tuple[object, ...], object]] = LRU(size)

    def get(self, kind: Hashable, inputs: tuple[object, ...], make: Callable[[], V]) -> V:
        """The value ``make()`` gave for ``inputs`` (the same objects) under ``kind``, made now if none is held."""
        key = (kind, *map(id, inputs))
        hit = self._lru.get(key)
        if hit is not None:  # its inputs are alive in the entry: these are they
            return hit[1]  # type: ignore[return-value]
        out = make()
        self._lru.put(key, (inputs, out))
        return out

    def clear(self) -> None:
        self._lru.clear()

    def __len__(self) -> int:
        return len(self._lru)
