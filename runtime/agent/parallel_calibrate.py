"""The coordinator's own per-byte rate, for the DPFP cost model (``edgesplit plan --parallel-coordinator-mbytes``).

    python -m runtime.agent.parallel_calibrate --model vgg16 --workers HOST:PORT,HOST:PORT --link 1,1000

Runs a calibration stage on the real workers over the real link: single-split blocks that hold only
pointwise layers (VGG's ReLUs: many bytes, little compute), each on all workers, a few frames after a
warm-up; with ``--compute-blocks N`` (default 2) also the last N single-split blocks with a convolution
(small maps, real compute: see ``COMPUTE_BLOCKS``). Per block, the measured wall time minus the slowest tile's own worker time (queue, decode,
compute, as the worker reports it) minus the link's modelled time (RTT + bytes / bandwidth, as
``planner.dpfp`` costs it: all bytes on one shared link, or the largest crop and tile on links of
their own) is what the cost model does not see: the coordinator's
cropping, encoding, gRPC, decoding and stitching, and the transport's per-byte work. A least-squares
line through the samples (blocks of different sizes) splits it into a fixed cost per block and a
per-byte rate; where the line has no positive slope or a negative intercept, the rate is the bytes
over the whole rest and the fixed cost 0. A rate of 0 means the rest was not measurable (at or below
zero).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator
from runtime.contracts.errors import EdgesplitError, InvalidInput
from runtime.models.loader import LoadedModel
from runtime.parallel.plan import ParallelStage, TiledBlock
from runtime.parallel.receptive import CONV, POINTWISE

MAX_BLOCKS = 3
"""Pointwise calibration blocks used at most (the first, middle and last pointwise split of the model)."""
COMPUTE_BLOCKS = 2
"""Compute blocks added by default: the last two single-split units with a convolution (the smallest
maps: few bytes). While the workers compute, each one's gRPC answer, the relays and the coordinator
wait for a core on a shared machine; a pointwise block, where the workers hardly compute, misses that
part of the fixed cost per block (measured on VGG-16 with 4 workers on 2 cores: ~3 ms per round with
pointwise blocks, 10-20 ms within real blocks)."""


@dataclass(frozen=True)
class Calibration:
    bytes_per_second: float  # 0: not measurable
    blocks: tuple[str, ...]  # the calibration blocks, START..END
    frames: int
    bytes: int  # sent + received over all measured frames
    rest_seconds: float  # wall time the compute and the link do not explain, summed
    block_overhead_seconds: float = 0.0  # fixed cost per block (0: none found)


def calibration_stage(loaded: LoadedModel, workers: Sequence[str], compute_blocks: int = 0) -> ParallelStage:
    """Single-split blocks of pointwise layers only, on all ``workers`` (InvalidInput if the model has none),
    and the last ``compute_blocks`` single-split blocks with a convolution (see ``COMPUTE_BLOCKS``)."""
    from runtime.parallel.tiled import segment_geometry

    found, compute = [], []
    for i in range(len(loaded.sliced.split_points) - 1):
        try:
            g = segment_geometry(loaded.sliced, i, i + 1)
        except EdgesplitError:
            continue
        if all(layer.kind == POINTWISE for layer in g):
            found.append(i)
        elif any(layer.kind == CONV for layer in g):
            compute.append(i)
    if not found:
        raise InvalidInput(f"{loaded.name} has no tileable pointwise block to calibrate the coordinator with")
    picks = sorted({found[0], found[len(found) // 2], found[-1]})[:MAX_BLOCKS]
    picks += compute[len(compute) - compute_blocks:] if compute_blocks > 0 else []
    return ParallelStage(tuple(workers), tuple(TiledBlock(loaded.split(i).name, loaded.split(i + 1).name,
                                                          (1.0,) * len(workers)) for i in picks), model=loaded.name)


async def calibrate(loaded: LoadedModel, workers: Sequence[str], rtt_seconds: float, bandwidth_bytes_per_second: float,
                    frames: int = 3, options: CoordinatorOptions | None = None, shared_link: bool = True,
                    compute_blocks: int = 0) -> Calibration:
    """Measure the coordinator's per-byte rate against ``workers`` (see the module docstring)."""
    if not (frames >= 1 and bandwidth_bytes_per_second > 0 and rtt_seconds >= 0 and 0 <= compute_blocks <= 16):
        raise InvalidInput("calibration needs frames >= 1, bandwidth > 0, RTT >= 0 and 0..16 compute blocks")
    stage = calibration_stage(loaded, workers, compute_blocks)
    blocks = tuple(f"{b.start}..{b.end}" for b in stage.blocks)
    samples: list[tuple[int, float]] = []  # (bytes, rest) per block and frame
    for b in stage.blocks:  # each block on its own, from its own input map
        one = ParallelStage(stage.workers, (b,), model=loaded.name)
        coord = ParallelCoordinator(loaded, one, options)
        try:
            await coord.prepare()
            with torch.inference_mode():
                x = loaded.head(b.start)(torch.randn(loaded.input_shape, generator=torch.Generator().manual_seed(0)))
            for f in range(frames + 1):
                t0 = time.perf_counter()
                _, reports = await coord.run_stage(x)
                wall = time.perf_counter() - t0
                if f == 0:
                    continue  # warm-up
                nbytes = sum(r.sent_bytes + r.received_bytes for r in reports)
                on_link = nbytes if shared_link else max(r.sent_bytes for r in reports) + max(r.received_bytes for r in reports)
                link = rtt_seconds + on_link / bandwidth_bytes_per_second
                samples.append((nbytes, wall - max(r.worker_seconds for r in reports) - link))
        finally:
            await coord.close()
    rate, fixed = fit(samples)
    return Calibration(rate, blocks, frames, sum(b for b, _ in samples), sum(r for _, r in samples), fixed)


def fit(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(bytes per second, fixed seconds per block) from (bytes, rest seconds) samples (see the module)."""
    n = len(samples)
    total_bytes, rest = sum(b for b, _ in samples), sum(r for _, r in samples)
    mb, mr = total_bytes / n, rest / n
    var = sum((b - mb) ** 2 for b, _ in samples)
    if var > 0:
        slope = sum((b - mb) * (r - mr) for b, r in samples) / var
        intercept = mr - slope * mb
        if slope > 0 and intercept >= 0:
            return 1.0 / slope, intercept
    return (total_bytes / rest if rest > 0 else 0.0), 0.0




def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.agent.parallel_calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="bundled model the workers serve")
    p.add_argument("--workers", required=True, metavar="A,B,...", help="worker addresses (HOST:PORT)")
    p.add_argument("--link", required=True, metavar="RTT_MS,MBPS", help="the link as 'edgesplit plan --parallel-link' takes it")
    p.add_argument("--link-mode", choices=("shared", "per-worker"), default="shared",
                   help="how the planner will cost the link ('edgesplit plan --parallel-link-mode')")
    p.add_argument("--frames", type=int, default=3, help="measured frames per calibration block (after one warm-up)")
    p.add_argument("--compute-blocks", type=int, default=COMPUTE_BLOCKS,
                   help="also this many single-split blocks with a convolution (the last ones, smallest maps): the fixed "
                        "cost per block while the workers compute (0: pointwise blocks only, as before)")
    args = p.parse_args(argv)
    from runtime.models.loader import load_model

    try:
        rtt_ms, mbps = (float(v) for v in args.link.split(","))
    except ValueError:
        p.error(f"--link takes RTT_MS,MBPS (two numbers), got {args.link!r}")
    if not (args.frames >= 1 and rtt_ms >= 0 and mbps > 0):
        p.error("--frames must be >= 1, RTT >= 0 and the rate > 0")
    cal = asyncio.run(calibrate(load_model(args.model), [w.strip() for w in args.workers.split(",") if w.strip()],
                                rtt_ms / 1e3, mbps * 125_000.0, args.frames, shared_link=args.link_mode == "shared",
                                compute_blocks=args.compute_blocks))
    print(f"coordinator: {cal.bytes_per_second / 1e6:.1f} MB/s + {cal.block_overhead_seconds * 1e3:.2f} ms per block "
          f"({cal.bytes} bytes, {cal.rest_seconds * 1e3:.1f} ms not explained by compute and link; blocks "
          f"{', '.join(cal.blocks)}, {cal.frames} frames each)")
    print(f"edgesplit plan --parallel ... --parallel-coordinator-mbytes {cal.bytes_per_second / 1e6:.1f} "
          f"--parallel-block-overhead-ms {cal.block_overhead_seconds * 1e3:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
