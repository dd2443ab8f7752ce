"""The key a device profile text is stored under in the planner's store (``profiles``, :mod:`planner.store`):
its SHA-256. No cache here: a record carries its text's hash (``AgentRecord.profile_sha256``), taken from
whoever computed it already (the servicer's ProfileCache key, the store's own column)."""

from __future__ import annotations

import hashlib


def profile_hash(text: str) -> str:
    """The key a device profile is stored under: SHA-256 of its UTF-8 bytes, hex."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
