"""Edge worker daemon: receives encoded feature tensors, runs the tail, returns results."""

from __future__ import annotations

from typing import Any

from runtime.worker.config import WorkerConfig

__all__ = ["WorkerConfig", "WorkerServer", "serve"]


def __getattr__(name: str) -> Any:
    """The server (and torch) load on first use, so ``edgesplit --help`` and the config stay light."""
    if name in ("WorkerServer", "serve"):
        from runtime.worker import server

        return getattr(server, name)
    raise AttributeError(f"module 'runtime.worker' has no attribute {name!r}")
