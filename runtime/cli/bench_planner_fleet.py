"""``edgesplit bench-planner-fleet``: simulated agents over real gRPC against a real planner subprocess
(runtime/measure/fleet): registrations per second, step-to-push p50/p99, health latency, planner CPU
and RSS, errors by code. Results as JSON and markdown in ``--out``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from runtime.measure.fleet.options import FleetOptions

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers

QUICK_OUT = "/tmp/edgesplit-fleet-quick"

_FLAGS = (  # flag, field, type, help (the default comes from FleetOptions)
    ("--agents", "agents", int, "simulated agents"),
    ("--board-types", "board_types", int, "distinct device profiles (efficientnet_lite0, compute x2, x3, ...)"),
    ("--workers", "workers", int, "simulated workers (they register every --worker-reregister-seconds)"),
    ("--worker-reregister-seconds", "worker_reregister_seconds", float, "worker re-registration period"),
    ("--telemetry-interval", "telemetry_interval_seconds", float,
     "seconds between an agent's reports (its heartbeat; a bandwidth step is reported at once); 1 = the old 1 Hz"),
    ("--step-fraction", "step_fraction", float, "share of agents stepping their bandwidth down and up"),
    ("--step-period", "step_period_seconds", float, "seconds between a stepping agent's steps"),
    ("--high-bandwidth", "high_bandwidth", float, "bytes/s reported before a step down"),
    ("--low-bandwidth", "low_bandwidth", float, "bytes/s reported after a step down"),
    ("--duration", "duration_seconds", float, "seconds of the measured phase"),
    ("--settle", "settle_seconds", float, "seconds between the last registration and the measured phase"),
    ("--register-timeout", "register_timeout_seconds", float, "the registration phase ends after this long"),
    ("--register-concurrency", "register_concurrency", int, "RegisterAgent calls in flight per loader process"),
    ("--loaders", "loaders", int, "loader processes (0: one per 2,500 agents, at most 8)"),
    ("--channels", "channels", int, "gRPC channels (TCP connections) per loader process"),
    ("--hold-seconds", "hold_seconds", float, "the planner's --hold-seconds (0: step-to-push measures the planner, "
                                              "not its deliberate hysteresis)"),
    ("--replicas", "replicas", int, "planner replicas on one shared store (agents spread over them, follow a broken "
                                    "session to the next one as behind a Service); needs --store"),
    ("--store", "store", str, "the replicas' store: 'postgresql' starts a throw-away PostgreSQL server for the run "
                              "(needs the server binaries: initdb, pg_ctl), or a postgresql:// URL; empty: SQLite per planner"),
    ("--kill-after", "kill_after_seconds", float, "SIGKILL replica 0 this many seconds into the measured phase (0: none); "
                                                  "the report gives its agents' re-attach times"),
    ("--cprofile", "cprofile", str, "write the planner's cProfile here (read it with python -m pstats FILE; "
                                    "with replicas, FILE-K per replica)"),
    ("--out", "out_dir", str, "folder for the JSON and markdown"),
    ("--name", "name", str, "file stem of the results"),
    ("--seed", "seed", int, "random phases and jitter"),
)


def add_parser(sub: Subparsers) -> None:
    d = FleetOptions()
    p = sub.add_parser("bench-planner-fleet", help="planner load: simulated agents over real gRPC against a planner subprocess",
                       description=__doc__)
    for flag, name, typ, text in _FLAGS:
        p.add_argument(flag, dest=name, type=typ, default=getattr(d, name), help=f"{text} (default: {getattr(d, name)})")
    p.add_argument("--planner-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for 'edgesplit planner serve' (repeatable; e.g. --planner-arg=--store=...)")
    p.add_argument("--gc-pauses", action="store_true", help="time the planner's garbage collections of the oldest "
                   "generation (each holds its event loop); in the results and in OUT/NAME_gc.json")
    p.add_argument("--no-pin", action="store_true", help="do not pin the planner and the loaders to separate cores")
    p.add_argument("--quick", action="store_true", help=f"CI mode (<= 60 s): 200 agents, 15 s measured, steps every 5 s; results in {QUICK_OUT} "
                   "unless --out is given")
    p.set_defaults(func=cmd_bench_fleet)


def cmd_bench_fleet(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from runtime.measure.fleet import report
    from runtime.measure.fleet.options import quick
    from runtime.measure.fleet.run import run

    options = FleetOptions(**{name: getattr(args, name) for _, name, _, _ in _FLAGS},
                           planner_args=tuple(args.planner_arg), pin=not args.no_pin, gc_pauses=args.gc_pauses,
                           command="edgesplit " + " ".join(sys.argv[1:]))
    if args.quick:  # its results go to a temporary folder unless --out says otherwise
        out = args.out_dir if args.out_dir != FleetOptions.out_dir else QUICK_OUT
        options = replace(quick(options), out_dir=out, command=options.command)
    result = run(options, lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    paths = report.write(result, options.out_dir, options.name)
    print(report.markdown(result))
    print("wrote " + ", ".join(map(str, paths)), file=sys.stderr)
    return 0 if result["planner_exit"] is None else 1
