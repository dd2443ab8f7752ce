"""``edgesplit plan-check``: predicted against measured end-to-end latency for every split, on loopback.

1. Profile the model on this machine for both roles (device and edge run here, one torch thread each).
2. Start a worker on loopback, measure every split, and calibrate the link on two of them: what
   a frame took beyond the profiled compute (head, encode, decode, tail) against its bytes, at
   the split with the fewest bytes and the split with the most. The line through those two points
   gives the RTT (intercept: the fixed per-frame cost of the whole path, gRPC and thread hand-offs
   included, which is what the agent's probes see) and the bandwidth (slope). The other splits
   are out of sample.
3. For every split: the planner's prediction for that cut (the same search the planner runs,
   pinned to the cut, with the codec under test) against the median measured over real frames.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from planner.search import search
from runtime.cli.common import DefaultsHelpFormatter
from runtime.contracts.costmodel import Constraints, Link, Network, Tier
from runtime.contracts.profile import Profile, Transfer
from runtime.contracts.tiers import DEVICE, EDGE

if TYPE_CHECKING:
    from runtime.cli.common import Subparsers
    from runtime.models.loader import LoadedModel
    from runtime.models.slicing import SplitPoint


def _only(p: Profile, codec: str) -> Profile:
    def keep(ts: Sequence[Transfer]) -> tuple[Transfer, ...]:
        return tuple(t for t in ts if t.name == codec)

    return replace(p, blocks=tuple(replace(b, transfers=keep(b.transfers)) for b in p.blocks),
                   input_transfers=keep(p.input_transfers))


def predict(device: Profile, edge: Profile, link: Link, cut: int) -> float:
    """The planner's predicted seconds when the device runs ``cut`` blocks and the edge the rest."""
    n = device.n_blocks
    pins = dict.fromkeys(range(cut), DEVICE)
    pins.update(dict.fromkeys(range(cut, n), EDGE))
    net = Network({(DEVICE, EDGE): link})
    best = search([Tier(DEVICE, (device,)), Tier(EDGE, (edge,))], net, Constraints(pin_blocks=pins), top_n=1)
    return best[0].seconds


async def _measure(loaded: LoadedModel, splits: list[SplitPoint], codec: str, address: str, frames: int,
                   warmup: int) -> dict[int, dict[str, Any]]:
    from runtime.measure.bench import _bench_one

    rows: dict[int, dict[str, Any]] = {}
    for sp in splits:
        print(f"... {loaded.name} split {sp.index} ({sp.name})", file=sys.stderr, flush=True)
        rows[sp.index] = await _bench_one(loaded, sp, codec, address, frames, warmup, 1)
    return rows


def run(model: str, codec: str, frames: int, warmup: int, runs: int) -> list[str]:
    import torch

    from runtime.measure.profiler import profile_model
    from runtime.models.loader import load_model
    from runtime.models.slicing import OUTPUT
    from runtime.worker.process import spawn_worker

    torch.set_num_threads(1)
    loaded = load_model(model)
    device = _only(profile_model(loaded, DEVICE, DEVICE, runs=runs, codecs=(codec,), progress=False), codec)
    edge = _only(profile_model(loaded, EDGE, EDGE, runs=runs, codecs=(codec,), progress=False), codec)
    splits = [sp for sp in loaded.sliced.split_points if sp.name != OUTPUT]
    worker = spawn_worker(["--torch-threads", "1", "--max-queue", "64"])
    try:
        measured = asyncio.run(_measure(loaded, splits, codec, worker.address, frames, warmup))
    finally:
        worker.stop()
    size = {i: device.transfers_after(i)[0].bytes for i in measured}
    zero = Link(0.0, 1e15)  # compute only: no RTT, free bytes
    compute = {i: predict(device, edge, zero, i) for i in measured}
    extra = {i: row["p50_ms"]["total"] / 1e3 - compute[i] for i, row in measured.items()}
    small, large = min(measured, key=lambda i: size[i]), max(measured, key=lambda i: size[i])
    slope = (extra[large] - extra[small]) / max(1, size[large] - size[small])
    bw = 1.0 / slope if slope > 0 else 1e12
    rtt = max(0.0, extra[small] - size[small] / bw)
    link = Link(rtt, bw)
    lines = [f"### {loaded.name}, codec {codec}: link calibrated at splits {small} and {large}: "
             f"RTT {rtt * 1e3:.2f} ms, {bw / 1e6:.0f} MB/s", "",
             "| split | bytes | predicted ms | measured p50 ms | error |", "|---|---:|---:|---:|---:|"]
    errors = []
    for i, row in measured.items():
        pred = predict(device, edge, link, i) * 1e3
        meas = row["p50_ms"]["total"]
        err = (pred - meas) / meas
        errors.append(abs(err))
        lines.append(f"| {i} {row['split']} | {size[i]:,} | {pred:.2f} | {meas:.2f} | {err * 100:+.1f}% |")
    within = sum(e <= 0.10 for e in errors)
    lines += ["", f"median |error| {statistics.median(errors) * 100:.1f}%, {within}/{len(errors)} splits within 10%, "
                  f"worst {max(errors) * 100:.1f}%", ""]
    return lines


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser("plan-check", formatter_class=DefaultsHelpFormatter,
                       help="predicted vs measured end-to-end latency for every split (worker on loopback)")
    p.add_argument("--model", action="append", help="model(s) to check (default: efficientnet_lite0, resnet18)")
    p.add_argument("--codec", default="int8+lz4", help="wire codec every split is measured with")
    p.add_argument("--frames", type=int, default=20, help="timed frames per split")
    p.add_argument("--warmup", type=int, default=3, help="untimed frames per split before timing")
    p.add_argument("--runs", type=int, default=20, help="profiling runs per block")
    p.set_defaults(func=cmd_plan_check)


def cmd_plan_check(args: argparse.Namespace) -> int:
    cmd = "edgesplit plan-check " + " ".join(sys.argv[2:])
    print(f"`{cmd.strip()}`\n")
    for model in args.model or ("efficientnet_lite0", "resnet18"):
        print("\n".join(run(model, args.codec, args.frames, args.warmup, args.runs)), flush=True)
    return 0
