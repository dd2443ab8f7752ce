"""``edgesplit agent [flags]``: run the device agent."""

from __future__ import annotations

import argparse
import asyncio

from runtime.cli.common import add_config_flags, component_config


def add_parser(sub) -> None:
    from runtime.agent.config import AgentConfig

    p = sub.add_parser("agent", help="run the device agent")
    add_config_flags(p, AgentConfig)
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    from runtime.agent.run import run_agent

    asyncio.run(run_agent(component_config(args, "agent")))
    return 0
