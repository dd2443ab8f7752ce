"""``edgesplit import-peers``: turn Scission/ScissionTL benchmark data into profile and network files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from planner.peers import import_network, import_profiles, network_to_json
from runtime.cli.common import DefaultsHelpFormatter

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    fmt = DefaultsHelpFormatter
    p = sub.add_parser("import-peers", formatter_class=fmt,
                       help="convert Scission/ScissionTL benchmark data into edgesplit profile and network files")
    p.add_argument("file", help="e.g. planner/peers/scission_benchmarks.json")
    p.add_argument("--out", required=True, help="directory for MODEL--MACHINE.json and network-NAME.json")
    p.add_argument("--model", action="append", help="only these models (repeat)")
    p.set_defaults(func=cmd_import_peers)


def cmd_import_peers(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for (machine, model), p in sorted(import_profiles(args.file).items()):
        if args.model and model not in args.model:
            continue
        p.save(out / f"{model}--{machine}.json".replace("/", "_"))
        written += 1
    d = json.loads(Path(args.file).read_text())
    for name in d.get("networks", {}) or ({"default": 0} if "network" in d else {}):
        (out / f"network-{name}.json").write_text(network_to_json(import_network(args.file, name)) + "\n")
    print(f"wrote {written} profiles and the network files to {out}")
    return 0
