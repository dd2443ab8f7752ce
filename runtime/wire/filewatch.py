"""A value loaded from files and loaded again when they change: certificates, tokens, CRLs.

:class:`FileWatch` holds what ``load`` made from a few files. :meth:`FileWatch.check` looks at the
files' modification times and sizes (at most once per ``interval``) and, when one changed or a
reload was requested (:func:`request_reload`, which SIGHUP calls in every daemon), loads them
again. A file that cannot be read or loaded keeps the previous value (logged once per change) and
is tried again at the next check, so a renewal caught half-written is picked up once complete.
The first load is not guarded: a bad file at start stops the process.

Used by the server certificates (runtime.wire.security), client credentials
(runtime.wire.reloading), the tokens file (runtime.daemon.auth) and the CRL
(runtime.daemon.revocation).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0  # default: how often a watch looks at its files

T = TypeVar("T")
Stamp = tuple[tuple[int, int], ...]

_generation = 0  # bumped by request_reload (SIGHUP)


def request_reload() -> None:
    """Make every FileWatch load its files again at its next check, changed or not (SIGHUP)."""
    global _generation
    _generation += 1


def generation() -> int:
    """How many reloads were requested."""
    return _generation


def stamp(paths: Iterable[str]) -> Stamp:
    """(mtime in ns, size) of each file; (-1, -1) for one that cannot be looked at."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((-1, -1))
    return tuple(out)


class FileWatch(Generic[T]):
    """``value`` = ``load()``, made again when ``paths`` change or a reload is requested (see module doc)."""

    def __init__(self, paths: Iterable[str], load: Callable[[], T], what: str, interval: float = RECHECK_SECONDS):
        self.paths = tuple(p for p in paths if p)
        self.what = what  # names the value in logs ("CRL", "tokens file", ...)
        self.interval = interval  # seconds between looks at the files (0: at every check)
        self.reloads = 0  # values loaded after the first (tests, logs)
        self._load = load
        self._lock = threading.Lock()  # grpc calls a server's certificate fetcher from its own threads
        self._stamp = stamp(self.paths)  # taken before loading: a change while loading is seen next time
        self._generation = _generation
        self.value: T = load()
        self._checked = time.monotonic()
        self._failed: tuple[Stamp, int] | None = None  # the change whose load failed (logged once)

    def check(self) -> bool:
        """Load again if the files changed or a reload was requested; True when ``value`` was replaced."""
        now = time.monotonic()
        with self._lock:
            if self._generation == _generation and now - self._checked < self.interval:
                return False
            self._checked = now
            current, gen = stamp(self.paths), _generation
            if current == self._stamp and gen == self._generation:
                return False
            self._generation = gen  # a requested reload is tried once; a changed file until it loads
            try:
                value = self._load()
            except Exception as e:  # a bad or half-written file: keep the working value
                if self._failed != (current, gen):
                    self._failed = (current, gen)
                    logger.error("%s changed but cannot be loaded, keeping the current one: %s", self.what, e)
                return False
            self.value, self._stamp, self._failed = value, current, None
            self.reloads += 1
        logger.info("%s reloaded from %s", self.what, ", ".join(self.paths))
        return True
