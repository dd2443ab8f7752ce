"""The one ``edgesplit`` console command: the only package that imports both runtime and planner.

Importing this package (every ``edgesplit`` command and ``python -m runtime.cli.main`` do, before anything
imports grpc) sets gRPC's C-core experiments for the process and the daemons it starts: ``GRPC_EXPERIMENTS``
defaults to :data:`GRPC_EXPERIMENTS_DEFAULT`, gRPC's EventEngine client and listener off, so sockets are read
and written by gRPC's iomgr TCP path on the thread that polls the completion queue (grpc.aio's poller), one
thread wake-up fewer per message each way. A ``GRPC_EXPERIMENTS`` the user set is left as it is; set it empty
(``GRPC_EXPERIMENTS=``) for gRPC's own defaults. gRPC reads the variable once, when it is first imported, so
it must be set here, not later (runtime.contracts.grpcenv; the tools' and measurements' packages apply it too). Measured (runtime/measure/results/overhead.md, 2026-12-04, ``edgesplit bench
--split 45 --split 10 --codec raw``, alternating pairs): the 803 KB frame's runtime overhead lower in 15 of 18
pairs over four runs (one tie; median 2.66 -> 2.50 ms against the parent commit), gRPC both ways 0.1-0.4 ms lower,
62 KB 2.18 -> 2.01 ms; TLS and mTLS tests pass with it.
"""

from runtime.contracts.grpcenv import GRPC_EXPERIMENTS_DEFAULT, GRPC_EXPERIMENTS_ENV, apply

__all__ = ["GRPC_EXPERIMENTS_DEFAULT", "GRPC_EXPERIMENTS_ENV"]

apply()
