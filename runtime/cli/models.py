"""``edgesplit models [MODEL]``: the bundled models, or a model's valid split points."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("models", help="list bundled models, or a model's valid split points")
    p.add_argument("model", nargs="?", help="bundled name or path/to/file.py:factory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    if not args.model:
        return _list_models(args.json)
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


def _list_models(as_json: bool) -> int:
    from runtime.models import get_spec, list_models

    rows = [(n, get_spec(n)) for n in list_models()]
    if as_json:
        print(json.dumps([{"name": n, "weights": s.weights, "input_size": list(s.input_size)} for n, s in rows], indent=1))
        return 0
    print(f"{'model':<20}{'input':<10}weights")
    for name, spec in rows:
        print(f"{name:<20}{'x'.join(map(str, spec.input_size)):<10}{spec.weights}")
    print("\nA user model is accepted wherever a name is: path/to/file.py:factory or path/to/program.pt2")
    return 0
