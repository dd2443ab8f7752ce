"""``edgesplit bench``: loopback latency by stage, bytes per frame and overhead per codec."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("bench", help="loopback benchmark: latency by stage, bytes per frame and overhead per codec")
    p.add_argument("--model", default="efficientnet_lite0", help="model (default: efficientnet_lite0)")
    p.add_argument("--split", action="append", help="split point(s) (default: the model's default); repeatable")
    p.add_argument("--codec", action="append", help="codec(s) (default: all); repeatable")
    p.add_argument("--frames", type=int, default=60, help="timed frames per configuration (default: 60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames first (default: 10)")
    p.add_argument("--window", type=int, default=1, help="frames in flight (default: 1, for clean stage times)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side (default: 1)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON here")
    p.add_argument("--tl", default="", help="Transfer Layer artifact .json (or a bundled TL's id): benchmark its split with it "
                   "(default: none)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from runtime.measure.bench import run_bench

    return run_bench(args)
