"""dpfp_bench's measuring parts: profiling and planning as subprocesses, the coordinator's timed frames,
its calibration, the emulated links (one relay per worker) and each strategy's result row (issue 13).

``python -m runtime.tools.dpfp_bench`` drives them; ``runtime.tools.dpfp_round`` uses the links too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from runtime.daemon import children
from runtime.tools import dpfp_timeline

if TYPE_CHECKING:
    import torch

    from runtime.agent.parallel import ParallelCoordinator
    from runtime.agent.parallel_maps import TileReport
    from runtime.models.loader import LoadedModel
    from runtime.parallel.plan import ParallelStage
    from runtime.tools.cpuquota import QuotaSet

STRATEGIES = ("single_worker", "dpfp", "dpfp_halo", "dpfp_halo_acked", "dpfp_bands_barrier", "layer_by_layer",
              "fused_all")
HALO = "dpfp_halo"  # DPFP with the halo exchange between workers (edgesplit plan --parallel-halo)
ACKED = "dpfp_halo_acked"  # the same halo plan, each halo block's tiles sent only once those they read have answered
PREVIOUS = "dpfp_bands_barrier"  # DPFP as first built: row bands only, uncalibrated, each block waits for the last
MiB = 2**20

Frames = list[tuple[float, list["TileReport"]]]
"""(start, that frame's tile reports) per frame: the timeline's input."""
Measured = tuple[list[float], list["TileReport"], float, list[float], "float | None", Frames]
""":meth:`Measurement.result`: frame times, tile reports, largest relative error, per-block medians, the
window's period (None: not run), the frames."""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli.main", *args]


def profile(quotas: QuotaSet, share: float, model: str, runs: int, out: Path, period_us: int = 10_000) -> None:
    proc = subprocess.Popen(_cli("profile", "--model", model, "--role", "edge", "--machine", "worker", "--runs", str(runs),
                                 "--warmup", "1", "--codec", "raw", "--inputs", "1", "--threads", "1", "--no-progress",
                                 "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    quotas.new(share, period_us).add(proc.pid)
    _, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"profile failed: {err.decode()[-2000:]}")


def plan(profile_path: Path, k: int, strategy: str, args: argparse.Namespace, names: list[str], out: Path,
         coord_mbytes: float = 0.0, block_ms: float = 0.0, factors: Path | None = None) -> dict[str, Any]:
    previous = strategy == PREVIOUS
    halo = ["--parallel-halo", "--parallel-halo-round-ms", "0"] if strategy in (HALO, ACKED) else []
    cmd = ["plan", "--parallel", "--parallel-link", f"{2 * args.delay_ms},{args.rate_mbps}",
           "--parallel-link-mode", args.link_mode,
           "--parallel-coordinator-mbytes", f"{0.0 if previous else coord_mbytes:.3f}", "--parallel-codec", args.codec,
           "--parallel-block-overhead-ms", f"{0.0 if previous else block_ms:.3f}",
           *(["--parallel-no-grids"] if args.no_grids or previous else []),
           *(["--parallel-tile-factors", str(factors)] if factors and not previous else []),
           *halo, "--parallel-strategy", "dpfp" if previous or halo else strategy, "--parallel-out", str(out),
           "--parallel-workers", ",".join(names)]
    for _ in range(k):
        cmd += ["--profile", str(profile_path)]
    res = subprocess.run(_cli(*cmd), capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"edgesplit plan failed: {res.stderr[-2000:]}")
    return {"table": res.stdout, "stage": json.loads(out.read_text())}


class Measurement:
    """One strategy's stage on one coordinator: latency frames (with each block's wall time), then
    optionally throughput with several frames in flight."""

    def __init__(self, loaded: LoadedModel, stage: ParallelStage, image: torch.Tensor, reference: torch.Tensor,
                 wavefront: bool = True, halo_early: bool = True, period_us: int = 10_000):
        from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator
        from runtime.wire.transport import TransportOptions

        self.image, self.reference, self.period_us = image, reference, period_us  # the workers' quota period
        self.coord = ParallelCoordinator(loaded, stage, CoordinatorOptions(
            tile_deadline_seconds=300, transport=TransportOptions(max_message_bytes=256 * MiB), wavefront=wavefront,
            halo_early=halo_early))
        self.times: list[float] = []
        self.tiles: list[TileReport] = []
        self.blocks: list[list[float]] = []
        self.frames: Frames = []  # (start, that frame's tile reports): the timeline
        self.err = 0.0
        self.period: float | None = None

    def _error(self, y: torch.Tensor) -> float:
        return float((y - self.reference).abs().max() / self.reference.abs().max())

    async def frame(self, record: bool = True) -> None:
        marks: list[float] = []
        t0 = time.perf_counter()

        def on_block(block: int, done: list[TileReport]) -> None:
            marks.append(time.perf_counter())

        y, reports = await self.coord.run_stage(self.image, on_block)
        if record:
            self.times.append(time.perf_counter() - t0)
            self.tiles.extend(reports)
            self.frames.append((t0, reports))
            self.blocks.append([b - a for a, b in zip([t0, *marks[:-1]], marks, strict=True)])
        self.err = max(self.err, self._error(y))

    async def window(self, frames: int, window: int) -> None:
        gate = asyncio.Semaphore(window)

        async def one() -> tuple[torch.Tensor, list[TileReport]]:
            async with gate:
                return await self.coord.run_stage(self.image)

        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one() for _ in range(frames)))
        self.period = (time.perf_counter() - t0) / len(outs)
        self.err = max(self.err, max(self._error(o) for o, _ in outs))

    def result(self) -> Measured:
        blocks = self.blocks
        medians = [statistics.median(b[j] for b in blocks) for j in range(len(blocks[0]))] if blocks else []
        return self.times, self.tiles, self.err, medians, self.period, self.frames


async def measure_all(ms: list[Measurement], frames: int, interleave: bool,
                      switch: Callable[[Measurement], None] = lambda m: None) -> None:
    """Latency frames of every strategy: interleaved (frame i of each in turn, so all see the same
    load on a shared machine) or one strategy after the other; each warms up with one frame first.
    ``switch(m)`` runs before each of m's frames (the workers' quota period)."""
    for m in ms:
        switch(m)
        await m.frame(record=False)
    order = [m for _ in range(frames) for m in ms] if interleave else [m for m in ms for _ in range(frames)]
    for m in order:
        switch(m)
        await m.frame()


async def calibrate_coordinator(args: argparse.Namespace, loaded: LoadedModel, addresses: list[str]) -> dict[str, Any]:
    """The coordinator's per-byte rate against all workers through their relays (0: not calibrated)."""
    if args.no_calibrate:
        return {"bytes_per_second": 0.0, "blocks": [], "note": "not calibrated (--no-calibrate)"}
    from runtime.agent.parallel import CoordinatorOptions
    from runtime.agent.parallel_calibrate import COMPUTE_BLOCKS, calibrate
    from runtime.wire.transport import TransportOptions

    cal = await calibrate(loaded, addresses, 2 * args.delay_ms / 1e3, args.rate_mbps * 125_000.0, args.frames,
                          CoordinatorOptions(tile_deadline_seconds=300,
                                             transport=TransportOptions(max_message_bytes=256 * MiB)),
                          shared_link=args.link_mode == "shared", compute_blocks=COMPUTE_BLOCKS)
    print(f"coordinator calibrated: {cal.bytes_per_second / 1e6:.1f} MB/s + {cal.block_overhead_seconds * 1e3:.2f} ms "
          f"per block over {', '.join(cal.blocks)}", file=sys.stderr)
    return {"bytes_per_second": cal.bytes_per_second, "block_overhead_seconds": cal.block_overhead_seconds,
            "blocks": list(cal.blocks), "bytes": cal.bytes,
            "rest_seconds": cal.rest_seconds, "frames": cal.frames}


class Relay(Protocol):
    """A worker's link as the coordinator sees it: the address to call, closed after the run."""

    @property
    def address(self) -> str: ...

    async def close(self) -> None: ...


class Direct:
    """No relay (``--relays none``): the coordinator talks to the worker itself."""

    def __init__(self, address: str):
        self.address = address

    async def close(self) -> None:
        return None


class RelayProcess:
    """``python -m runtime.tools.netem`` as a process of its own (a real link costs the coordinator no CPU)."""

    def __init__(self, target: str, delay_ms: float, rate_mbps: float, log: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.tools.netem", "--target", target, "--delay-ms",
                                      str(delay_ms), "--rate-mbps", str(rate_mbps), "--log-level", "WARNING"],
                                     stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True)  # noqa: SIM115
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"relay to {target} did not start: {line!r}; see {log}")
        self.address = line.split("listening on ", 1)[1].split(" ", 1)[0]

    async def close(self) -> None:
        children.stop(self.proc)


def recovered_tiles(coord: ParallelCoordinator) -> dict[str, int]:
    """After failed halo exchanges, the tiles the coordinator fetched back from the workers keeping them and
    those it computed again, over every frame it ran (``edgesplit_agent_halo_recovered_tiles_total{how}``)."""
    reg = coord.metrics.registry
    return {how: int(reg.get_sample_value("edgesplit_agent_halo_recovered_tiles_total", {"how": how}) or 0)
            for how in ("fetched", "recomputed")}


def result_row(k: int, strategy: str, planned: dict[str, Any], measured: Measured | None,
               skipped: str = "") -> dict[str, Any]:
    stage = planned["stage"]
    row: dict[str, Any] = {"workers": k, "strategy": strategy, "predicted_seconds": stage["predicted_seconds"], "stage": stage,
           "blocks": [[b["start"], b["end"]] for b in stage["blocks"]],
           "grid_cols": [b.get("grid_cols", 1) for b in stage["blocks"]],
           "predicted_block_seconds": [b["predicted_seconds"] for b in stage["blocks"]],
           "workers_used": max(sum(1 for s in b["shares"] if s > 0) for b in stage["blocks"]), "skipped": skipped}
    if measured is not None:
        times, tiles, err, block_medians, period, frames = measured
        row.update(measured_block_seconds=block_medians, window_period_seconds=period,
                   measured_seconds=statistics.median(times), measured_min=min(times), measured_max=max(times),
                   frames=len(times), max_rel_error=err, tile_failures=sum(len(t.failures) for t in tiles),
                   local_tiles=sum(1 for t in tiles if t.ran_on == "local"),
                   slowest_tile_compute_seconds=_slowest_compute(tiles, len(times), len(stage["blocks"])),
                   timeline=dpfp_timeline.medians(frames, len(stage["blocks"])))
    return row


def _slowest_compute(tiles: list[TileReport], frames: int, blocks: int) -> list[float]:
    """Per block, the median over frames of its slowest tile's compute as the worker reported it."""
    per: list[list[float]] = [[] for _ in range(blocks)]
    if not frames or len(tiles) % frames:
        return []
    n = len(tiles) // frames
    for f in range(frames):
        frame = tiles[f * n: (f + 1) * n]
        for b in range(blocks):
            per[b].append(max((t.compute_seconds for t in frame if t.block == b), default=0.0))
    return [statistics.median(v) for v in per]
