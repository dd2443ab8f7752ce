"""What tiling itself costs in compute: a parallel stage's tiles against the untiled blocks, one process.

    python -m runtime.tools.dpfp_tiles --plan STAGE.json [--runs 5] [--threads 1]

For each fused block of the plan (``edgesplit plan --parallel --parallel-out``, or a stage from
dpfp_bench's JSON), times the untiled block on the whole map and each of its tiles
(:meth:`runtime.parallel.tiled.TiledSegment.run_tile`, halo included) in this process, one after
the other, the minimum of ``--runs`` runs each (so other work on the machine shows as little as
possible). Prints per block: the untiled time, the sum of the tiles (halo recomputation and
per-tile overheads: the work the workers do together), the slowest tile, and the slowest tile
against an ideal 1/K share of the untiled time. No workers, no link, no quotas: what remains between
this and a real stage's per-tile compute is contention for the machine's cores. glibc's allocator is set as
the workers set it (``runtime.wire.eventloop.tune_malloc``; ``EDGESPLIT_MALLOC=default`` leaves its defaults,
to compare).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.models.loader import LoadedModel
    from runtime.parallel.plan import ParallelStage


def best(fn: Callable[[], object], runs: int) -> float:
    times: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(stage: ParallelStage, loaded: LoadedModel, runs: int) -> list[dict[str, Any]]:
    import torch

    from runtime.parallel.receptive import partition
    from runtime.parallel.tiled import TiledSegment

    with torch.inference_mode():
        x = loaded.head(stage.blocks[0].start)(torch.randn(loaded.input_shape, generator=torch.Generator().manual_seed(0)))
        rows: list[dict[str, Any]] = []
        for b in stage.blocks:
            seg = TiledSegment(loaded.sliced, loaded.split(b.start).name, loaded.split(b.end).name)
            in_hw = (int(x.shape[-2]), int(x.shape[-1]))
            shares = [s for s in b.shares if s > 0]
            tiles = partition(seg.out_size(in_hw), shares, b.grid_cols)
            regions = seg.regions(in_hw, tiles)
            whole = seg.regions(in_hw, partition(seg.out_size(in_hw), [1.0]))[0]
            full = best(functools.partial(seg.run_tile, x, whole), runs)
            per: list[float] = []
            for reg in regions:
                crop = x[..., reg.input.rows.start: reg.input.rows.stop, reg.input.cols.start: reg.input.cols.stop].contiguous()
                per.append(best(functools.partial(seg.run_tile, crop, reg), runs))
            rows.append({"block": f"{b.start}..{b.end}", "tiles": len(regions), "grid_cols": b.grid_cols,
                         "untiled_seconds": full, "tile_seconds": per, "sum_over_untiled": sum(per) / full,
                         "slowest_over_ideal": max(per) / (full / len(regions))})
            x = seg.run_tile(x, whole)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.dpfp_tiles", description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="parallel plan JSON (edgesplit plan --parallel-out)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per block and tile (the minimum is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the emulated workers use 1)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.threads < 1:
        p.error("--runs and --threads must be >= 1")
    import torch

    from runtime.models.loader import load_model
    from runtime.parallel.plan import ParallelStage
    from runtime.wire.eventloop import tune_malloc

    tuned = tune_malloc()  # as the workers' daemons run
    torch.set_num_threads(args.threads)
    stage = ParallelStage.load(Path(args.plan))
    loaded = load_model(stage.model)
    rows = measure(stage, loaded, args.runs)
    print(f"{'block':<28} {'tiles':>5} {'untiled ms':>10} {'sum tiles ms':>12} {'sum/untiled':>11} "
          f"{'slowest ms':>10} {'slowest/(untiled/K)':>19}")
    for r in rows:
        print(f"{r['block']:<28} {r['tiles']:>5} {r['untiled_seconds'] * 1e3:>10.1f} {sum(r['tile_seconds']) * 1e3:>12.1f} "
              f"{r['sum_over_untiled']:>11.2f} {max(r['tile_seconds']) * 1e3:>10.1f} {r['slowest_over_ideal']:>19.2f}")
    full = sum(r["untiled_seconds"] for r in rows)
    crit = sum(max(r["tile_seconds"]) for r in rows)
    print(f"{'all blocks':<28} {'':>5} {full * 1e3:>10.1f} {sum(sum(r['tile_seconds']) for r in rows) * 1e3:>12.1f} "
          f"{'':>11} {crit * 1e3:>10.1f}   -> compute-only reduction bound {100 * (1 - crit / full):.1f}%")
    print(f"glibc allocator: {'tuned as the daemons (tune_malloc)' if tuned else 'its defaults'}")
    print(json.dumps(rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
