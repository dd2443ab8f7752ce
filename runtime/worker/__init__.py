"""Edge worker daemon: receives encoded feature tensors, runs the tail, returns results."""

from runtime.worker.config import WorkerConfig
from runtime.worker.server import WorkerServer, serve

__all__ = ["WorkerConfig", "WorkerServer", "serve"]
