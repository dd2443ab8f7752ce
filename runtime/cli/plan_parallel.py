"""``edgesplit plan --parallel``: propose a DPFP parallel stage from several edge workers' profiles.

Prints DPFP against the baselines of the same cost model (MoDNN-like layer by layer, FTP-like one
fused block, a single worker) and writes DPFP's stage as plan JSON (``--parallel-out``) for
``edgesplit agent --parallel-plan``. Importing this module loads no torch.
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.contracts import profile as profiles
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import InvalidInput

STRATEGIES = ("dpfp", "layer_by_layer", "fused_all", "single_worker")


def _link(text: str) -> Link:
    parts = text.split(",")
    if len(parts) != 2:
        raise InvalidInput(f"--parallel-link takes RTT_MS,MBPS, got {text!r}")
    try:
        return Link.from_mbps(float(parts[0]), float(parts[1]))
    except ValueError:
        raise InvalidInput(f"--parallel-link: RTT and bandwidth must be numbers in {text!r}") from None


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel stage (RFS/DPFP): fused blocks tiled over several edge workers")
    g.add_argument("--parallel", action="store_true",
                   help="propose a parallel stage over the edge-role --profile files (one per worker, same model, "
                        "measured at the model's input size) instead of ranking splits")
    g.add_argument("--parallel-link", metavar="RTT_MS,MBPS",
                   help="the link between the coordinator and each worker (one shared link; required with --parallel)")
    g.add_argument("--parallel-link-mode", choices=("shared", "per-worker"), default="shared",
                   help="shared: the workers share that one link (scatter/gather bytes add up); per-worker: each "
                        "worker has a link like it of its own (the largest band counts)")
    g.add_argument("--parallel-coordinator-mbytes", type=float, default=0.0, metavar="MB_PER_S",
                   help="the coordinator's own rate, in MB/s, of cropping, encoding, decoding and stitching the bytes "
                        "it sends and receives (measure it with 'python -m runtime.agent.parallel_calibrate'); "
                        "0: not costed")
    g.add_argument("--parallel-block-overhead-ms", type=float, default=0.0, metavar="MS",
                   help="the coordinator's fixed cost per fused block, in ms (measured with the same calibration); "
                        "0: not costed")
    g.add_argument("--parallel-tile-factors", metavar="FILE.json",
                   help="tile-compute factors by tile size measured on real tiles ('python -m runtime.tools.dpfp_tilecal', "
                        "run where the workers run): the cost model multiplies each tile's area share by them, for DPFP "
                        "and every baseline (default: tiles priced by their area share alone)")
    g.add_argument("--parallel-halo", action="store_true",
                   help="let DPFP exchange halos directly between workers where it predicts that cheaper: a block's "
                        "tiles stay on the workers and the next block's workers fetch only the border rows they lack "
                        "from their neighbours (default: the coordinator gathers and re-scatters between blocks)")
    g.add_argument("--parallel-halo-round-ms", type=float, default=0.0, metavar="MS",
                   help="fixed cost of a block's worker-to-worker fetch round, in ms, besides its RTT and bytes "
                        "(with --parallel-halo; 0: not costed)")
    g.add_argument("--parallel-no-grids", action="store_true",
                   help="tile every block in full-width row bands (default: a 2-D grid where it cuts halos)")
    g.add_argument("--parallel-first", default="input", metavar="SPLIT",
                   help="split point where the parallel range begins (the coordinator runs the model up to it)")
    g.add_argument("--parallel-end", metavar="SPLIT",
                   help="split point where it ends (default: the last one before global pooling/flatten)")
    g.add_argument("--parallel-workers", metavar="A,B,...",
                   help="worker addresses written into the plan, in --profile order (default: the profiles' machine names)")
    g.add_argument("--parallel-codec", default="raw", help="codec of crops and tiles on the wire (raw is exact)")
    g.add_argument("--parallel-out", metavar="FILE.json", help="write DPFP's stage as plan JSON for 'edgesplit agent --parallel-plan'")
    g.add_argument("--parallel-strategy", default="dpfp", choices=STRATEGIES,
                   help="which strategy's stage --parallel-out writes (the baselines too, to measure them)")


def cmd_plan_parallel(args: argparse.Namespace) -> int:
    from planner.parallel_plan import propose, report
    from runtime.wire.codec import get_codec

    if not args.parallel_link:
        raise InvalidInput("--parallel needs --parallel-link RTT_MS,MBPS (the coordinator <-> workers link)")
    get_codec(args.parallel_codec)  # InvalidInput with the valid names
    if not 0 <= args.parallel_coordinator_mbytes < 1e6:
        raise InvalidInput(f"--parallel-coordinator-mbytes must be 0..1e6 MB/s, got {args.parallel_coordinator_mbytes}")
    if not 0 <= args.parallel_block_overhead_ms < 60_000:
        raise InvalidInput(f"--parallel-block-overhead-ms must be 0..60000, got {args.parallel_block_overhead_ms}")
    if not 0 <= getattr(args, "parallel_halo_round_ms", 0.0) < 60_000:
        raise InvalidInput(f"--parallel-halo-round-ms must be 0..60000, got {args.parallel_halo_round_ms}")
    loaded = [profiles.load(p) for p in args.profile or ()]
    edge = [p for p in loaded if p.role != "device"]
    if not edge:
        raise InvalidInput("--parallel needs edge worker profiles (--profile FILE, role edge), one per worker")
    workers = [w.strip() for w in args.parallel_workers.split(",")] if args.parallel_workers else None
    factors = None
    if getattr(args, "parallel_tile_factors", None):
        from planner.dpfp_factors import load as load_factors

        factors = load_factors(args.parallel_tile_factors)  # InvalidInput: unreadable, wrong format, out of range
        if factors.model != edge[0].model:
            raise InvalidInput(f"--parallel-tile-factors is for {factors.model!r}, the profiles for {edge[0].model!r}")
    prop = propose(edge, _link(args.parallel_link), args.parallel_first, args.parallel_end, workers,
                   args.parallel_codec, shared_link=args.parallel_link_mode == "shared",
                   coordinator_bytes_per_second=args.parallel_coordinator_mbytes * 1e6, grids=not args.parallel_no_grids,
                   block_overhead_seconds=args.parallel_block_overhead_ms / 1e3, tile_factors=factors,
                   halo=getattr(args, "parallel_halo", False),
                   halo_round_seconds=getattr(args, "parallel_halo_round_ms", 0.0) / 1e3)
    if args.json:
        print(json.dumps({name: {"seconds": plan.seconds, "workers": plan.workers,
                                 "blocks": [[prop.split_names[f], prop.split_names[e]] for f, e in plan.blocks],
                                 "shares": [list(s) for s in plan.shares],
                                 "grid_cols": [c.cols for c in plan.breakdown]} for name, plan in prop.plans.items()},
                         indent=1))
    else:
        print("\n".join(report(prop)))
    if args.parallel_out:
        stage = prop.stage
        if args.parallel_strategy != "dpfp":
            from planner.parallel_plan import stage_from_plan

            stage = stage_from_plan(prop.plans[args.parallel_strategy], prop.problem, prop.split_names, stage.workers,
                                    stage.codec, stage.model)
        with open(args.parallel_out, "w") as f:
            json.dump(stage.to_json(), f, indent=1)
        print(f"{args.parallel_strategy} stage written to {args.parallel_out}", file=sys.stderr)
    return 0
