"""``edgesplit``: one console command with subcommands; this module is the root (parser, common
flags, dispatch, error handling). Each verb is its own module of :mod:`runtime.cli` with
``add_parser(subparsers)`` and its command function.

    edgesplit models [MODEL]            bundled models; a model's valid split points
    edgesplit worker [flags]            edge worker daemon
    edgesplit agent [flags]             device agent
    edgesplit health-check HOST:PORT    exit 0 only when the daemon is SERVING
    edgesplit print-config worker|agent [flags]
    edgesplit demo                      worker + agent on loopback on a bundled default
    edgesplit bench                     loopback latency/bytes benchmark per codec
    edgesplit bench-scenarios           strategies x emulated IIoT links, the board under a CPU quota
    edgesplit bench-planner-fleet       simulated agents over real gRPC against a planner subprocess
    edgesplit tl train|eval|list|sweep  Transfer Layers (runtime/transfer)
    edgesplit plan, import-peers        rank split configurations from profiles; import Scission data
    edgesplit plan-check                predicted against measured latency per split
    edgesplit planner serve|query|agents|print-config
    edgesplit profile                   time a model's blocks and transfers into a profile file
    edgesplit certs ca|issue|token      site CA, per-role certificates, bearer tokens (mTLS quick start)
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from runtime.cli import GRPC_EXPERIMENTS_DEFAULT, GRPC_EXPERIMENTS_ENV
from runtime.cli.logs import add_log_flags, add_log_flags_to_subcommands, setup_logging
from runtime.contracts.errors import EdgesplitError
from runtime.wire.eventloop import tune_malloc

logger = logging.getLogger("edgesplit")
GRPC_EPILOG = (f"gRPC: every command runs with {GRPC_EXPERIMENTS_ENV}={GRPC_EXPERIMENTS_DEFAULT} (gRPC's EventEngine "
               f"client and listener off: one thread wake-up fewer per message) unless {GRPC_EXPERIMENTS_ENV} is set; "
               f"set it empty for gRPC's own defaults.")

# The verbs' modules in runtime.cli, in the order 'edgesplit --help' lists them. A verb's module is
# imported only when the parser is built; its heavy imports (torch, the models) wait for its command.
VERBS = ("models", "worker", "agent", "submit", "print_config", "health_check", "demo", "bench", "bench_scenarios", "tl", "plan", "import_peers",
         "validate", "planner", "profile", "certs", "bench_planner_fleet")


def build_parser(verbs: Sequence[str] = VERBS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesplit", description="Split DNN inference between IIoT boards and edge servers.",
                                     epilog=GRPC_EPILOG)
    parser.add_argument("--version", action=_VersionAction, help="print the installed version and exit")
    add_log_flags(parser, root=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in verbs:
        importlib.import_module(f"runtime.cli.{verb}").add_parser(sub)
    add_log_flags_to_subcommands(parser)
    return parser


class _VersionAction(argparse.Action):
    """``--version``: reads the package metadata only when asked (importlib.metadata costs ~0.15 s,
    too much for every ``health-check`` probe)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, default: Any = argparse.SUPPRESS,
                 help: str | None = None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from importlib import metadata

        try:
            version = metadata.version("edgesplit")
        except metadata.PackageNotFoundError:  # running from a checkout that was never installed
            version = "unknown (not installed)"
        print(f"edgesplit {version}")
        parser.exit()


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser with only the verb named in ``argv`` when its module is known (``health-check`` then
    imports no torch: a probe must answer in well under a second); all verbs otherwise (--help, typos)."""
    rest = list(argv)
    while rest and rest[0].startswith("-"):
        rest = rest[2:] if rest[0] in ("--log-level", "--log-format") else rest[1:]
    verb = rest[0].replace("-", "_") if rest else ""
    if verb in VERBS:
        parser = build_parser((verb,))
        if rest[0] in _subcommands(parser):
            return parser
    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._subparsers._group_actions for name in action.choices} if parser._subparsers else set()  # type: ignore[union-attr]


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser_for(argv)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    # every command allocates as the daemons do (runtime.wire.eventloop.run sets it too): a profile, a local
    # baseline or a bench's own compute timed with glibc's defaults would fault fresh pages in that the agent
    # and the worker never fault (MobileNetV2's full model 23-26 ms against 17 unrestricted); EDGESPLIT_MALLOC=default
    tune_malloc()
    try:
        code: int = args.func(args)  # the verb's cmd_* function
        return code
    except BrokenPipeError:  # output piped into `head` that exited: not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not raise again
        return 141  # 128 + SIGPIPE, as a shell reports it
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
