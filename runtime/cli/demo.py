"""``edgesplit demo``: a worker and an agent on loopback, streaming frames of a bundled model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="start a worker and an agent on loopback and stream frames of a bundled model")
    p.add_argument("--model", default="efficientnet_lite0", help="model (default: efficientnet_lite0)")
    p.add_argument("--split", default="", help="split point (default: the model's default)")
    p.add_argument("--codec", default="auto", help="wire codec (default: auto = ans with a transform TL, else int8+lz4)")
    p.add_argument("--frames", type=int, default=50, help="frames to stream (default: 50)")
    p.add_argument("--source", default="samples", help="frame source (default: the bundled sample photos)")
    p.add_argument("--tl", default="bundled", help="Transfer Layer artifact .json or id: the agent encodes with it, the "
                   "worker decodes; 'bundled' = the TL shipped for the model (EfficientNet-Lite0 split 45, transform), "
                   "'none' = no TL (default: bundled)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from runtime.measure.demo import run_demo

    return run_demo(args)
