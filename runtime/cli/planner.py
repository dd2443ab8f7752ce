"""``edgesplit planner serve|query|agents|print-config``: run the planner and ask it questions.

``edgesplit planner --listen HOST:PORT [serve flags]`` (the issue's form) is ``edgesplit planner
serve --listen HOST:PORT [serve flags]``; flags may come before a subcommand too
(``edgesplit planner --db X print-config``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from planner.config import PlannerConfig
from runtime.cli.common import (
    add_client_security_flags,
    add_config_flags,
    add_constraint_arguments,
    client_transport,
    config_from_args,
    start_tracing,
)
from runtime.contracts.config import to_toml

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers
    from runtime.proto.edgesplit.v1 import planner_pb2

SECTION = "planner"


def _config(args: argparse.Namespace) -> PlannerConfig:
    return config_from_args(args, PlannerConfig, SECTION)


def cmd_serve(args: argparse.Namespace) -> int:
    from planner.server import run_planner

    config = _config(args)
    start_tracing(config, "planner")
    asyncio.run(run_planner(config))
    return 0


def cmd_print_config(args: argparse.Namespace) -> int:
    import dataclasses

    from planner.store_sql import redact

    cfg = _config(args)
    print(to_toml(dataclasses.replace(cfg, store=redact(cfg.store)), SECTION), end="")  # no database password
    return 0


def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    """The one gRPC call to the planner (``query`` and ``agents``): ``method`` of its Planner service,
    to ``--planner`` within ``--timeout``, with the client security flags; its reply (that method's message)."""
    from runtime.daemon.planner_client import call_planner

    return call_planner(args.planner, method, request, args.timeout, client_transport(args))


def _plan_dict(plan: planner_pb2.Plan) -> dict[str, Any]:
    from google.protobuf import json_format

    d: dict[str, Any] = json_format.MessageToDict(plan, preserving_proto_field_name=True,
                                                  always_print_fields_with_no_presence=True)
    return d


def _route(plan: planner_pb2.Plan) -> tuple[str, str]:
    """(workers, split) cells of a plan: a chain shows each worker and where each slice ends."""
    workers = " > ".join([plan.worker_id or "(local)", *(h.worker_id for h in plan.next_hops)])
    ends = [plan.end_split, *(h.end_split for h in plan.next_hops[:-1])] if plan.next_hops else []
    return workers, "..".join([plan.split_id or "-", *ends])


_QUERY_TEXT = {"pin_blocks": "pin_block", "pin_layers": "pin_layer", "forbid_blocks": "forbid_block",
               "max_tier_seconds": "max_tier_seconds", "max_tier_share": "max_tier_share",
               "max_link_upload_bytes": "max_upload", "max_memory_bytes": "max_memory"}  # wire field -> argument
_QUERY_PLAIN = ("raw_input_stays", "min_fidelity", "objective", "include", "exclude")


def query_constraints(args: argparse.Namespace) -> planner_pb2.Constraints | None:
    """The constraints a query's flags give (None: none given, the agent's registered ones hold)."""
    from runtime.contracts.constraints import check_fields, from_text
    from runtime.proto.edgesplit.v1 import planner_pb2 as pb

    if not any(getattr(args, a) for a in (*_QUERY_TEXT.values(), *_QUERY_PLAIN)):
        return None
    text = from_text(**{f: getattr(args, a) or () for f, a in _QUERY_TEXT.items()},
                     names={f: "--" + a.replace("_", "-") for f, a in _QUERY_TEXT.items()})
    c = pb.Constraints(raw_input_stays=args.raw_input_stays, min_fidelity=args.min_fidelity or 0.0,
                       objective=args.objective or "", include_workers=args.include or (),
                       exclude_workers=args.exclude or (), **text)
    check_fields(c)
    return c


def cmd_query(args: argparse.Namespace) -> int:
    from runtime.proto.edgesplit.v1 import planner_pb2 as pb

    request = pb.PlanQuery(agent_id=args.agent, bandwidth_bytes_per_second=args.bandwidth_mbps * 125_000.0,
                           rtt_seconds=args.rtt_ms / 1e3, top_n=args.top, constraints=query_constraints(args))
    reply = _call(args, "QueryPlan", request)
    if args.json:
        print(json.dumps({"decision_seconds": reply.decision_seconds,
                          "candidates": [_plan_dict(p) for p in reply.candidates]}, indent=1))
        return 0
    if not reply.candidates:
        print(f"no configuration satisfies agent {args.agent}'s constraints under these conditions")
        return 1
    print(f"{'rank':>4}  {'worker':<16}{'split':<18}{'codec':<12}{'tl':<14}{'ms':>9}{'fps':>9}{'bytes':>12}  breakdown (ms)")
    for i, p in enumerate(reply.candidates, 1):
        parts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(p.breakdown_seconds.items()) if v)
        fps = f"{p.predicted_fps:.1f}" if p.predicted_fps < 1e9 else "inf"
        workers, split = _route(p)
        print(f"{i:>4}  {workers:<16}{split:<18}{p.codec or '-':<12}{p.tl_id or '-':<14}"
              f"{p.predicted_seconds * 1e3:>9.2f}{fps:>9}{p.predicted_bytes:>12,}  {parts}")
    print(f"decided in {reply.decision_seconds * 1e3:.2f} ms")
    return 0


def cmd_agents(args: argparse.Namespace) -> int:
    from runtime.proto.edgesplit.v1 import planner_pb2 as pb

    reply = _call(args, "ListAgents", pb.ListAgentsRequest())
    if args.json:
        from google.protobuf import json_format

        print(json.dumps([json_format.MessageToDict(a, preserving_proto_field_name=True) for a in reply.agents], indent=1))
        return 0
    print(f"{'agent':<20}{'model':<20}{'plan':>6}  {'worker':<16}{'split':<18}{'codec':<12}{'ms':>8}"
          f"{'MB/s':>9}{'rtt ms':>8}{'age s':>8}  refused")
    for a in reply.agents:
        p = a.plan
        refused = f"v{a.refused_version}: {a.refused_message}" if a.refused_version else "-"
        age = f"{a.telemetry_age_seconds:.1f}" if a.telemetry_age_seconds >= 0 else "-"
        workers, split = _route(p) if p.version else ("-", "-")
        print(f"{a.agent_id:<20}{a.model_id:<20}{p.version:>6}  {workers:<16}"
              f"{split:<18}{p.codec or '-':<12}{p.predicted_seconds * 1e3:>8.2f}"
              f"{a.bandwidth_bytes_per_second / 1e6:>9.2f}{a.rtt_seconds * 1e3:>8.1f}{age:>8}  {refused}")
    return 0


class _ServeByDefault(argparse.ArgumentParser):
    """A command group whose arguments, when they start with a flag (not -h/--help), name their subcommand
    later or not at all: ``planner --db X print-config`` is ``planner print-config --db X``, and with no
    subcommand among the words (``planner --listen HOST:PORT``) the flags go to ``serve``."""

    def parse_known_args(self, args: Iterable[str] | None = None,
                         namespace: Any = None) -> tuple[Any, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0].startswith("-") and args[0] not in ("-h", "--help"):
            at = self._subcommand_at(args)
            args.insert(0, "serve" if at is None else args.pop(at))
        return super().parse_known_args(args, namespace)

    def _subcommand_at(self, args: list[str]) -> int | None:
        """Where in ``args`` the first word that is not a flag's value is, if it names a subcommand."""
        subs = next(a for a in self._actions if isinstance(a, argparse._SubParsersAction)).choices
        takes_value = {opt: action.nargs != 0 for parser in subs.values() for action in parser._actions
                       for opt in action.option_strings}
        i = 0
        while i < len(args) and args[i].startswith("-") and args[i] != "--":
            flag = args[i]
            # --flag=VALUE is one word; an abbreviated flag is read as the flags it abbreviates (argparse's allow_abbrev)
            kinds = {takes_value[flag]} if flag in takes_value else {v for o, v in takes_value.items() if o.startswith(flag)}
            i += 2 if "=" not in flag and kinds != {False} else 1
        return i if i < len(args) and args[i] in subs else None


def add_parser(sub: Subparsers) -> None:
    """The ``planner`` command group, added to ``edgesplit``'s subparsers."""
    p = sub.add_parser("planner", help="the planner: ranks split configurations and pushes plans to agents",
                       description="'edgesplit planner --listen HOST:PORT [flags]' is short for "
                       "'edgesplit planner serve --listen HOST:PORT [flags]'; flags may also come "
                       "before a subcommand ('edgesplit planner --db X print-config').")
    p.__class__ = _ServeByDefault  # add_parser builds every subparser from one class; this one adds no state
    psub = p.add_subparsers(dest="planner_command", required=True, parser_class=argparse.ArgumentParser)

    s = psub.add_parser("serve", help="run the planner daemon")
    add_config_flags(s, PlannerConfig)
    s.set_defaults(func=cmd_serve)

    c = psub.add_parser("print-config", help="show the effective planner configuration (defaults < TOML < env < flags)")
    add_config_flags(c, PlannerConfig)
    c.set_defaults(func=cmd_print_config)

    q = psub.add_parser("query", help="rank configurations for a registered agent (optionally under other conditions)")
    q.add_argument("--planner", required=True, metavar="HOST:PORT", help="planner address")
    q.add_argument("--agent", required=True, help="agent id")
    q.add_argument("--bandwidth-mbps", type=float, default=0.0, help="link bandwidth in Mbit/s (default: measured)")
    q.add_argument("--rtt-ms", type=float, default=0.0, help="link RTT in ms (default: measured)")
    q.add_argument("--top", type=int, default=0, help="candidates to show (default: the planner's top_n)")
    g = q.add_argument_group("constraints", "any of these replaces the agent's registered constraints for this "
                             "query (as in 'edgesplit plan'; tiers: device, edge, cloud)")
    add_constraint_arguments(g, "worker", overriding=True)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")
    add_client_security_flags(q)
    q.set_defaults(func=cmd_query)

    a = psub.add_parser("agents", help="registered agents, their plans, links and refusals")
    a.add_argument("--planner", required=True, metavar="HOST:PORT", help="planner address")
    a.add_argument("--json", action="store_true", help="machine-readable output")
    a.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")
    add_client_security_flags(a)
    a.set_defaults(func=cmd_agents)
