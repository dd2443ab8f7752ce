"""``edgesplit profile``: measure a model's blocks and transfers on this machine into a profile file."""

from __future__ import annotations

import argparse
import socket
import sys
from typing import TYPE_CHECKING

from runtime.contracts.tiers import TIERS

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers
    from runtime.contracts.profile import Profile


def summary(profile: Profile) -> str:
    """A short table: block, name, median ms and bytes per frame of each transfer named in every block."""
    names = [t.name for t in profile.input_transfers if not t.tl_id]
    lines = [f"{profile.model} on {profile.machine} ({profile.role}): {profile.n_blocks} blocks, "
             f"{sum(b.seconds for b in profile.blocks) * 1e3:.2f} ms in all (sum of medians)",
             f"{'block':>5}  {'name':<28}{'ms':>9}" + "".join(f"{n:>14}" for n in names)]
    rows: list[tuple[str, str, float | None, dict[str, int]]] = [
        ("-", "input", None, {t.name: t.bytes for t in profile.input_transfers})]
    rows += [(str(b.index), b.name, b.seconds, {t.name: t.bytes for t in b.transfers}) for b in profile.blocks]
    for index, name, seconds, sizes in rows:
        ms = f"{seconds * 1e3:9.3f}" if seconds is not None else f"{'':>9}"
        cells = "".join(f"{sizes[n]:>14,}" if n in sizes else f"{'-':>14}" for n in names)
        lines.append(f"{index:>5}  {name[:27]:<28}{ms}{cells}")
    tls = [("input", t) for t in profile.input_transfers if t.tl_id]
    tls += [(f"block {b.index}", t) for b in profile.blocks for t in b.transfers if t.tl_id]
    for where, t in tls:
        lines.append(f"{where}: {t.name} {t.bytes:,} B, encode {t.encode_seconds * 1e3:.3f} ms, "
                     f"decode {t.decode_seconds * 1e3:.3f} ms, top-1 agreement " + (f"{t.fidelity:.4g}" if t.fidelity is not None else "not measured"))
    return "\n".join(lines)


def cmd_profile(args: argparse.Namespace) -> int:
    from runtime.measure.defaults import DEFAULT_CODECS
    from runtime.measure.profiler import profile_model

    profile = profile_model(args.model, args.role, machine=args.machine, runs=args.runs, warmup=args.warmup,
                            codecs=args.codec or DEFAULT_CODECS, tls=args.tl or (), threads=args.threads,
                            progress=not args.no_progress, inputs=args.inputs)
    if args.out == "-":
        sys.stdout.write(profile.to_json() + "\n")
    else:
        profile.save(args.out)
    print(summary(profile), file=sys.stderr)
    if args.out != "-":
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def add_parser(sub: Subparsers) -> None:
    """The ``profile`` command, added to ``edgesplit``'s subparsers."""
    from runtime.measure.defaults import DEFAULT_CODECS

    host = socket.gethostname()
    p = sub.add_parser("profile", help="time a model's blocks and transfers on this machine; write a profile (JSON)")
    p.add_argument("--model", default="efficientnet_lite0",
                   help="bundled model or path/to/file.py:factory (default: efficientnet_lite0)")
    p.add_argument("--role", required=True, choices=TIERS,
                   help="the tier this machine serves (required)")
    p.add_argument("--machine", default=host, help=f"machine name recorded in the profile (default: {host})")
    p.add_argument("--out", required=True, metavar="FILE", help="profile to write; '-' prints it to stdout (required)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per block and per codec (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (default: 3)")
    p.add_argument("--codec", action="append", metavar="CODEC",
                   help=f"wire codec to measure (repeatable; default: {', '.join(DEFAULT_CODECS)})")
    p.add_argument("--tl", action="append", metavar="TL_JSON",
                   help="Transfer Layer artifact .json (or a bundled TL's id) to measure with each codec "
                   "(repeatable; default: none)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--inputs", type=int, default=4, help="bundled sample photos used as inputs (default: 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: show it)")
    p.set_defaults(func=cmd_profile)
