"""``edgesplit agent [flags]``: run the device agent."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from runtime.cli.common import add_config_flags, component_config, start_tracing
from runtime.wire import eventloop

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    from runtime.agent.config import AgentConfig

    p = sub.add_parser("agent", help="run the device agent")
    add_config_flags(p, AgentConfig)
    g = p.add_argument_group("parallel stage (RFS/DPFP): fused blocks tiled over several workers (flags only)")
    g.add_argument("--parallel-plan", metavar="PLAN.json", default="",
                   help="run every frame through this parallel stage ('edgesplit plan --parallel --parallel-out'): "
                        "the board runs up to its first block and after its last, the workers the tiles")
    g.add_argument("--parallel-workers", metavar="A,B,...", default="",
                   help="worker addresses HOST:PORT replacing the plan's workers, in the plan's order")
    g.add_argument("--tile-deadline-seconds", type=float, default=10.0,
                   help="a tile without an answer by then is recomputed on another worker or locally (default 10)")
    g.add_argument("--parallel-codec", default="", help="codec of crops and tiles (default: the plan's; raw is exact)")
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    config = component_config(args, "agent")
    start_tracing(config, "agent")
    if getattr(args, "parallel_plan", ""):
        from runtime.agent.parallel_run import ParallelRunOptions, run_parallel

        workers = tuple(w.strip() for w in args.parallel_workers.split(",") if w.strip())
        eventloop.run(run_parallel(config, ParallelRunOptions(args.parallel_plan, workers, args.tile_deadline_seconds,
                                                            args.parallel_codec)))
        return 0
    from runtime.agent.run import run_agent

    eventloop.run(run_agent(config))
    return 0
