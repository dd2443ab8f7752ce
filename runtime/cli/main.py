"""``edgesplit``: one console command with subcommands.

    edgesplit models [MODEL]            bundled models; a model's valid split points
    edgesplit worker [flags]            edge worker daemon
    edgesplit agent [flags]             device agent
    edgesplit health-check HOST:PORT    exit 0 only when the daemon is SERVING
    edgesplit print-config worker|agent [flags]
    edgesplit demo                      worker + agent on loopback on a bundled default
    edgesplit bench                     loopback latency/bytes benchmark per codec
    edgesplit tl train|eval|list|sweep  Transfer Layers (runtime/transfer)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from typing import Any, Callable, Sequence, get_type_hints

from runtime.contracts.config import load_config, to_toml
from runtime.contracts.errors import EdgesplitError

logger = logging.getLogger("edgesplit")

# repeatable flags whose field names are plural
_FLAG_NAMES = {"models": "model", "tls": "tl", "next_tiers": "next_tier", "next_hops": "next_hop"}


def _components() -> dict[str, tuple[type, str]]:
    from runtime.agent.config import AgentConfig
    from runtime.worker.config import WorkerConfig

    return {"worker": (WorkerConfig, "worker"), "agent": (AgentConfig, "agent")}


def _add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field; defaults shown, values left None unless given."""
    p.add_argument("--config", metavar="FILE", help="TOML file with a [section] of these settings")
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + _FLAG_NAMES.get(f.name, f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # argparse %-formats help strings: a literal % (as in "10 %") must be doubled
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        typ = str(hints[f.name])
        if "tuple" in typ:
            p.add_argument(flag, dest=f.name, action="append", metavar="VALUE", help=help_text + "; repeatable")
        elif typ == "bool" or typ == "<class 'bool'>":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            conv: Callable[[str], Any] = int if "int" in typ else float if "float" in typ else str
            p.add_argument(flag, dest=f.name, type=conv, metavar=f.name.upper(), help=help_text)


def _config_from_args(args: argparse.Namespace, component: str):
    cls, section = _components()[component]
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return load_config(cls, section, config_file=args.config, overrides=overrides)


# -- commands -------------------------------------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    from runtime.models import get_spec, list_models

    if not args.model:
        rows = [(n, get_spec(n)) for n in list_models()]
        if args.json:
            print(json.dumps([{"name": n, "weights": s.weights, "input_size": list(s.input_size)} for n, s in rows], indent=1))
            return 0
        print(f"{'model':<20}{'input':<10}weights")
        for name, spec in rows:
            print(f"{name:<20}{'x'.join(map(str, spec.input_size)):<10}{spec.weights}")
        print("\nA user model is accepted wherever a name is: path/to/file.py:factory or path/to/program.pt2")
        return 0
    from runtime.agent.run import default_split
    from runtime.models.loader import load_model

    loaded = load_model(args.model)
    table = loaded.sliced.table()
    if args.json:
        print(json.dumps({"model": loaded.name, "digest": loaded.digest, "split_points": table}, indent=1))
        return 0
    default = default_split(loaded).index
    print(f"{loaded.name}: {len(table)} valid split points (weights {loaded.digest}); * = default")
    wn = max(4, *(len(r["name"]) for r in table)) + 2
    wl = max(5, *(len(r["layer"]) for r in table)) + 2
    print(f"{'index':>5}  {'name':<{wn}}{'layer':<{wl}}{'output shape':<22}{'fp32 bytes':>12}")
    for row in table:
        mark = "*" if row["index"] == default else " "
        shape = "x".join(map(str, row["out_shape"]))
        print(f"{row['index']:>4}{mark}  {row['name']:<{wn}}{row['layer']:<{wl}}{shape:<22}{row['fp32_bytes']:>12,}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from runtime.worker.server import run_worker

    config = _config_from_args(args, "worker")
    asyncio.run(run_worker(config))
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from runtime.agent.run import run_agent

    config = _config_from_args(args, "agent")
    asyncio.run(run_agent(config))
    return 0


def cmd_print_config(args: argparse.Namespace) -> int:
    config = _config_from_args(args, args.component)
    print(to_toml(config, _components()[args.component][1]), end="")
    return 0


def cmd_health_check(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(args.address) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as e:
        print(f"{args.address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{args.address}: {status}")
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from runtime.measure.demo import run_demo

    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from runtime.measure.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesplit", description="Split DNN inference between IIoT boards and edge servers.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list bundled models, or a model's valid split points")
    p.add_argument("model", nargs="?", help="bundled name or path/to/file.py:factory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    from runtime.agent.config import AgentConfig
    from runtime.worker.config import WorkerConfig

    p = sub.add_parser("worker", help="run the edge worker daemon")
    _add_config_flags(p, WorkerConfig)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("agent", help="run the device agent")
    _add_config_flags(p, AgentConfig)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("print-config", help="show the effective configuration (defaults < TOML < env < flags)")
    csub = p.add_subparsers(dest="component", required=True)
    for name, cls in (("worker", WorkerConfig), ("agent", AgentConfig)):
        cp = csub.add_parser(name, help=f"effective {name} configuration")
        _add_config_flags(cp, cls)
    p.set_defaults(func=cmd_print_config)

    p = sub.add_parser("health-check", help="ask a daemon's gRPC health service; exit 0 only when SERVING")
    p.add_argument("address", help="HOST:PORT or unix:/path.sock")
    p.add_argument("--service", default="", help="service name to check (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default: 3)")
    p.set_defaults(func=cmd_health_check)

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

    p = sub.add_parser("bench", help="loopback benchmark: latency by stage, bytes per frame and overhead per codec")
    p.add_argument("--model", default="efficientnet_lite0", help="model (default: efficientnet_lite0)")
    p.add_argument("--split", action="append", help="split point(s) (default: the model's default); repeatable")
    p.add_argument("--codec", action="append", help="codec(s) (default: all); repeatable")
    p.add_argument("--frames", type=int, default=60, help="timed frames per configuration (default: 60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed frames first (default: 10)")
    p.add_argument("--window", type=int, default=1, help="frames in flight (default: 1, for clean stage times)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side (default: 1)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON here")
    p.add_argument("--tl", default="", help="Transfer Layer artifact .json: benchmark its split with it (default: none)")
    p.set_defaults(func=cmd_bench)

    from runtime.cli.tl import add_parser as add_tl_parser

    add_tl_parser(sub)  # edgesplit tl train|eval|list

    from runtime.cli.plan import add_parser as add_plan_parser

    add_plan_parser(sub)  # edgesplit plan, edgesplit import-peers

    from runtime.cli.validate import add_parser as add_plan_check_parser

    add_plan_check_parser(sub)  # edgesplit plan-check

    from runtime.cli.planner import add_parser as add_planner_parser

    add_planner_parser(sub)  # edgesplit planner serve|query|agents|print-config

    from runtime.cli.profile import add_parser as add_profile_parser

    add_profile_parser(sub)  # edgesplit profile
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except EdgesplitError as e:
        print(f"edgesplit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command reads or writes (missing directory, permissions, disk full)
        where = f": {e.filename}" if e.filename else ""
        print(f"edgesplit: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
