"""gRPC's C-core experiments for every edgesplit process: ``GRPC_EXPERIMENTS`` defaults to
:data:`GRPC_EXPERIMENTS_DEFAULT`, gRPC's EventEngine client and listener off, so sockets are read and written on the
thread that polls grpc.aio's completion queue, one thread wake-up fewer per message each way (measured:
runtime/measure/results/overhead.md, 2026-12-04). A ``GRPC_EXPERIMENTS`` the user set is left as it is; set it empty
for gRPC's own defaults. gRPC reads the variable once, when it is first imported, so :func:`apply` runs where a process
enters edgesplit before anything imports grpc: the CLI package (``edgesplit`` and ``python -m runtime.cli.main``) and
the tools' and measurements' packages (``python -m runtime.tools.X`` / ``runtime.measure.X``), so what they measure
runs as the daemons do. This module imports nothing that imports grpc."""

from __future__ import annotations

import os

GRPC_EXPERIMENTS_ENV = "GRPC_EXPERIMENTS"
GRPC_EXPERIMENTS_DEFAULT = "-event_engine_client,-event_engine_listener"


def apply() -> None:
    """Set the default unless the user set ``GRPC_EXPERIMENTS`` (even empty)."""
    os.environ.setdefault(GRPC_EXPERIMENTS_ENV, GRPC_EXPERIMENTS_DEFAULT)
