"""``edgesplit plan``: rank split configurations from profile files, without any daemon."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from planner.peers import import_network, import_profiles, load_network
from planner.search import search
from runtime.cli.common import DefaultsHelpFormatter, add_constraint_arguments
from runtime.contracts import profile as profiles
from runtime.contracts.costmodel import Configuration, Constraints, Link, Network, Tier, pin_layers
from runtime.contracts.errors import InvalidInput
from runtime.contracts.tiers import DEVICE, TIERS

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers

K = TypeVar("K")
V = TypeVar("V")


def _pairs(values: Sequence[str] | None, flag: str, conv: tuple[Callable[[str], K], Callable[[str], V]]) -> dict[K, V]:
    out: dict[K, V] = {}
    for v in values or ():
        key, sep, val = v.partition("=")
        if not sep:
            raise InvalidInput(f"{flag} takes KEY=VALUE, got {v!r}")
        try:
            out[conv[0](key)] = conv[1](val)
        except ValueError:
            raise InvalidInput(f"{flag}: cannot read {v!r}") from None
    return out


def _links(values: Sequence[str] | None) -> dict[tuple[str, str], Link]:
    out: dict[tuple[str, str], Link] = {}
    for v in values or ():
        parts = v.split(",")
        if len(parts) != 4:
            raise InvalidInput(f"--link takes SRC,DST,RTT_MS,MBPS (machine or tier names), got {v!r}")
        try:
            out[(parts[0], parts[1])] = Link.from_mbps(float(parts[2]), float(parts[3]))
        except ValueError:
            raise InvalidInput(f"--link: RTT and bandwidth must be numbers in {v!r}") from None
    return out


def load_inputs(args: argparse.Namespace) -> tuple[list[Tier], Network]:
    """Profiles grouped into tiers by role (device, edge, cloud), and the network."""
    loaded: list[profiles.Profile] = [profiles.load(p) for p in args.profile or ()]
    links: dict[tuple[str, str], Link] = {}
    if args.peers:
        if not args.model:
            raise InvalidInput("--peers needs --model (e.g. vgg19)")
        peer = import_profiles(args.peers)
        loaded += [p for (_, model), p in sorted(peer.items()) if model == args.model]
        if not loaded:
            raise InvalidInput(f"{args.peers} has no model {args.model!r}")
        links.update(import_network(args.peers, args.network_name).links)
    if args.network:
        links.update(load_network(args.network).links)
    links.update(_links(args.link))
    if not loaded:
        raise InvalidInput("give profiles with --profile FILE (from 'edgesplit profile') or --peers FILE --model M")
    by_role: dict[str, list[profiles.Profile]] = {}
    for p in loaded:
        by_role.setdefault(p.role, []).append(p)
    if DEVICE not in by_role:
        raise InvalidInput("one profile must have role 'device' (frames start on the device)")
    required = set(args.require or ())
    tiers = [Tier(r, tuple(by_role[r]), required=r in required) for r in TIERS if r in by_role]
    return tiers, Network(links)


def constraints_from(args: argparse.Namespace, tiers: list[Tier]) -> Constraints:
    pins = _pairs(args.pin_block, "--pin-block", (int, str))
    if args.pin_layer:
        pins.update(pin_layers(tiers[0].profiles[0], _pairs(args.pin_layer, "--pin-layer", (int, str))))
    forbid: dict[int, frozenset[str]] = {}
    for b, t in _pairs(args.forbid_block, "--forbid-block", (int, str)).items():
        forbid[b] = forbid.get(b, frozenset()) | {t}
    return Constraints(
        pin_blocks=pins, forbid_blocks=forbid, raw_input_stays=args.raw_input_stays,
        max_upload_bytes=_pairs(args.max_upload, "--max-upload", (str, int)),
        max_tier_seconds=_pairs(args.max_tier_seconds, "--max-tier-seconds", (str, float)),
        max_tier_share=_pairs(args.max_tier_share, "--max-tier-share", (str, float)),
        max_memory_bytes=_pairs(args.max_memory, "--max-memory", (str, int)),
        include_machines=frozenset(args.include or ()), exclude_machines=frozenset(args.exclude or ()),
        min_fidelity=args.min_fidelity)


def to_json(c: Configuration, rank: int) -> dict[str, Any]:
    return {
        "rank": rank, "seconds": c.seconds, "fps": c.fps, "upload_bytes": c.upload_bytes, "plan": c.describe(),
        "stages": [{"tier": s.tier, "machine": s.machine, "blocks": [s.first_block, s.end_block],
                    "compute_seconds": s.compute_seconds, "seconds": s.seconds} for s in c.stages],
        "hops": [{"from": h.src_machine, "to": h.dst_machine, "split": h.split, "transfer": h.transfer.name,
                  "bytes": h.transfer.bytes, "encode_seconds": h.encode_seconds, "rtt_seconds": h.rtt_seconds,
                  "transfer_seconds": h.transfer_seconds, "decode_seconds": h.decode_seconds,
                  "return_seconds": h.return_seconds} for h in c.hops],
        "breakdown_seconds": c.breakdown(),
    }


def cmd_plan(args: argparse.Namespace) -> int:
    if args.parallel:  # RFS/DPFP: a parallel stage over the edge profiles
        from runtime.cli.plan_parallel import cmd_plan_parallel

        return cmd_plan_parallel(args)
    tiers, network = load_inputs(args)
    cons = constraints_from(args, tiers)
    t0 = time.perf_counter()
    ranked = search(tiers, network, cons, objective=args.objective, top_n=args.top, include_return=not args.no_return)
    decision = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"decision_seconds": decision, "configurations": [to_json(c, i + 1) for i, c in enumerate(ranked)]},
                         indent=1))
    else:
        n = tiers[0].profiles[0].n_blocks
        print(f"{tiers[0].profiles[0].model}: {n} blocks, tiers {', '.join(t.name for t in tiers)}; "
              f"objective {args.objective}; searched in {decision * 1e3:.2f} ms")
        if not ranked:
            print("no configuration satisfies the constraints")
        print(f"{'rank':>4} {'seconds':>10} {'fps':>8} {'upload MB':>10}  plan")
        for i, c in enumerate(ranked, 1):
            print(f"{i:>4} {c.seconds:>10.4f} {c.fps:>8.2f} {c.upload_bytes / 1e6:>10.4f}  {c.describe()}")
    if args.plot:
        from planner.plot import plot_splits

        plot_splits(tiers, network, cons, args.plot, include_return=not args.no_return)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0 if ranked else 1


def add_parser(sub: Subparsers) -> None:
    fmt = DefaultsHelpFormatter
    p = sub.add_parser("plan", formatter_class=fmt,
                       help="rank split configurations from profile files and a network description (no daemon)")
    p.add_argument("--profile", action="append", metavar="FILE", help="a profile (its role says its tier); repeat")
    p.add_argument("--peers", metavar="FILE", help="plan from Scission/ScissionTL benchmark data instead (with --model)")
    p.add_argument("--model", help="model in the --peers file")
    p.add_argument("--network-name", default="default", help="which network of the --peers file")
    p.add_argument("--network", metavar="FILE", help='network file: {"links": [{"source", "destination", "rtt_ms", "bandwidth_mbps"}]}')
    p.add_argument("--link", action="append", metavar="SRC,DST,RTT_MS,MBPS", help="a link (machine or tier names); repeat")
    p.add_argument("--require", action="append", metavar="TIER", help="this tier must run at least one block")
    add_constraint_arguments(p, "machine")
    p.add_argument("--top", type=int, default=5, help="how many configurations to print")
    p.add_argument("--no-return", action="store_true", help="leave out the result's trip back (as Scission does)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", metavar="FILE.png", help="draw per-split latency stacked into device/transfer/edge")
    from runtime.cli.plan_parallel import add_parallel_arguments

    add_parallel_arguments(p)
    p.set_defaults(func=cmd_plan)
