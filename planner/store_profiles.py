"""The key a device profile text is stored under in the planner's store (``profiles``, :mod:`planner.store`):
its SHA-256, computed once per shared text object."""

from __future__ import annotations

import hashlib
import threading

_HASHED: dict[int, tuple[str, str]] = {}  # id(text) -> (text, hash): the planner shares one text per board type
_HASHED_MAX = 256
_HASHED_LOCK = threading.Lock()


def profile_hash(text: str) -> str:
    """The key a device profile is stored under: SHA-256 of its UTF-8 bytes, hex. The same string
    object (ProfileCache.shared: one per board type) is hashed once, not on every agent's write."""
    held = _HASHED.get(id(text))
    if held is not None and held[0] is text:
        return held[1]
    h = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    if len(text) > 4096:  # only documents worth it; the entry keeps the text alive, so its id stays its own
        with _HASHED_LOCK:  # the store thread and the attachment threads
            if len(_HASHED) >= _HASHED_MAX:
                _HASHED.clear()
            _HASHED[id(text)] = (text, h)
    return h
