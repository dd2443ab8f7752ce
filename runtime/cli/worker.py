"""``edgesplit worker [flags]``: run the edge worker daemon."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from runtime.cli.common import add_config_flags, component_config, start_tracing
from runtime.wire import eventloop

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    from runtime.worker.config import WorkerConfig

    p = sub.add_parser("worker", help="run the edge worker daemon")
    add_config_flags(p, WorkerConfig)
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from runtime.worker.server import run_worker

    config = component_config(args, "worker")
    start_tracing(config, "worker")
    eventloop.run(run_worker(config))
    return 0
