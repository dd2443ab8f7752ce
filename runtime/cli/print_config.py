"""``edgesplit print-config worker|agent|planner [flags]``: the effective configuration, as TOML
(``edgesplit planner print-config`` is the same as ``edgesplit print-config planner``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from runtime.cli.common import add_config_flags, component_config, components
from runtime.contracts.config import to_toml

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("print-config", help="show the effective configuration (defaults < TOML < env < flags)")
    csub = p.add_subparsers(dest="component", required=True)
    for name, (cls, _section) in components().items():
        cp = csub.add_parser(name, help=f"effective {name} configuration")
        add_config_flags(cp, cls)
    p.set_defaults(func=cmd_print_config)


def cmd_print_config(args: argparse.Namespace) -> int:
    config = component_config(args, args.component)
    print(to_toml(config, components()[args.component][1]), end="")
    return 0
