"""Benchmark of parallel stages (RFS/DPFP): DPFP against one worker, MoDNN-like and FTP-like.

    python -m runtime.tools.dpfp_bench --workers 1,2,4 --share 0.4 --delay-ms 2 --rate-mbps 200 \\
        --out runtime/tools/results/dpfp_vgg16

1. Profiles the model once inside a CPU quota of ``--share`` of one core (cgroup v1, 10 ms period,
   one torch thread): every emulated worker gets that quota, so the workers are equal and that
   profile is each one's (``edgesplit profile``).
2. Starts max(``--workers``) worker processes, each in its own quota, and one user-space relay per
   worker (``runtime.tools.netem``: ``--delay-ms`` one way, ``--rate-mbps`` per direction; each
   worker has its own link, but all pass through the coordinator's one process, so the planner costs
   one shared link by default; ``--link-mode per-worker`` costs a link per worker).
3. For each worker count K and strategy, asks ``edgesplit plan --parallel`` (the planner, as a
   subprocess: the runtime never imports it) for the stage and its predicted latency, runs it with
   the coordinator (``runtime.agent.parallel``) on a bundled photo and times the stage (the model
   from the input to the last tileable split; the classifier after it is not part of the stage).
   ``dpfp_halo``: DPFP with halos exchanged between workers, the fetch round's fixed cost not costed (it is measured).
4. Writes ``OUT.json`` and ``OUT.md``. Cgroups, processes, relays and temp files are removed at
   the end, also on failure or Ctrl-C. Without cgroup v1 (or root) it exits 2 saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.tools import dpfp_timeline

STRATEGIES = ("single_worker", "dpfp", "dpfp_halo", "dpfp_bands_barrier", "layer_by_layer", "fused_all")
HALO = "dpfp_halo"  # DPFP with the halo exchange between workers (edgesplit plan --parallel-halo)
PREVIOUS = "dpfp_bands_barrier"  # DPFP as first built: row bands only, uncalibrated, each block waits for the last
MiB = 2**20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.dpfp_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vgg16", help="bundled model")
    p.add_argument("--workers", default="1,2,4", help="worker counts to measure")
    p.add_argument("--share", type=float, default=0.4, help="CPU quota of each worker, in cores")
    p.add_argument("--delay-ms", type=float, default=2.0, help="one-way delay of each worker's link")
    p.add_argument("--rate-mbps", type=float, default=200.0, help="rate of each worker's link, each direction")
    p.add_argument("--link-mode", choices=("shared", "per-worker"), default="shared",
                   help="how the planner costs the links: the relays give each worker its own, but one "
                        "coordinator process relays and stitches for all (measured: shared predicts better)")
    p.add_argument("--relays", choices=("process", "inline", "none"), default="process",
                   help="process: each worker's relay is a process of its own (python -m runtime.tools.netem); inline: "
                        "relays in the coordinator's event loop (the first recorded runs), where relaying every byte "
                        "costs the coordinator's own CPU; none: straight to the workers, no emulated link (a diagnostic: "
                        "what the relays themselves cost; --delay-ms and --rate-mbps are still what the planner assumes)")
    p.add_argument("--frames", type=int, default=3, help="timed frames per configuration (after one warm-up)")
    p.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"strategies to measure ({PREVIOUS}: DPFP as first built, row bands only, no coordinator "
                        "term, each block waiting for the whole previous one: the same run's A/B of this issue's changes; "
                        f"{HALO}: DPFP with the halo exchange directly between workers where it predicts it cheaper)")
    p.add_argument("--sequential", action="store_true",
                   help="measure one strategy after the other (default: interleaved, frame i of every strategy in "
                        "turn, so all see the same load on a shared machine)")
    p.add_argument("--window", type=int, default=1,
                   help="also measure throughput with this many frames in flight through the stage (dpfp, dpfp_halo "
                        "and the single worker; frames x window frames); 1: latency only")
    p.add_argument("--codec", default="raw",
                   help="codec of crops and tiles (raw is exact; fp16/int8 shrink the bytes: the max rel. error column "
                        "states the fidelity)")
    p.add_argument("--no-grids", action="store_true", help="row bands only (the planner's --parallel-no-grids)")
    p.add_argument("--barrier", action="store_true",
                   help="the coordinator waits for a whole block before sending the next one's tiles (default: "
                        "wavefront, a tile goes once the tiles it reads are in)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="do not measure the coordinator's per-byte rate (runtime.agent.parallel_calibrate) and "
                        "leave it out of the cost model")
    p.add_argument("--max-predicted-seconds", type=float, default=20.0,
                   help="configurations predicted slower than this per frame are not run (reported as skipped)")
    p.add_argument("--profile-runs", type=int, default=3, help="timed runs of the profile")
    p.add_argument("--profile", default="", metavar="FILE",
                   help="use this worker profile (measured at the same --share) instead of profiling again")
    p.add_argument("--tile-factors", default="", metavar="FILE",
                   help="tile-compute factors file (python -m runtime.tools.dpfp_tilecal) for the planner; default: "
                        "measured at the start of the run inside a worker's quota; 'none': tiles priced by area alone")
    p.add_argument("--tile-factor-runs", type=int, default=3, help="timed runs per unit and tile shape when measuring them")
    p.add_argument("--out", default="runtime/tools/results/dpfp_vgg16", help="OUT.json and OUT.md are written")
    return p


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli.main", *args]


def profile(quotas, share: float, model: str, runs: int, out: Path) -> None:
    proc = subprocess.Popen(_cli("profile", "--model", model, "--role", "edge", "--machine", "worker", "--runs", str(runs),
                                 "--warmup", "1", "--codec", "raw", "--inputs", "1", "--threads", "1", "--no-progress",
                                 "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    quotas.new(share).add(proc.pid)
    _, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"profile failed: {err.decode()[-2000:]}")


def plan(profile_path: Path, k: int, strategy: str, args, names: list[str], out: Path, coord_mbytes: float = 0.0,
         block_ms: float = 0.0, factors: Path | None = None) -> dict:
    previous, halo = strategy == PREVIOUS, ["--parallel-halo", "--parallel-halo-round-ms", "0"] if strategy == HALO else []
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

    def __init__(self, loaded, stage, image, reference, wavefront: bool = True):
        from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator
        from runtime.wire.transport import TransportOptions

        self.image, self.reference = image, reference
        self.coord = ParallelCoordinator(loaded, stage, CoordinatorOptions(
            tile_deadline_seconds=300, transport=TransportOptions(max_message_bytes=256 * MiB), wavefront=wavefront))
        self.times: list[float] = []
        self.tiles: list = []
        self.blocks: list[list[float]] = []
        self.frames: list[tuple[float, list]] = []  # (start, that frame's tile reports): the timeline
        self.err, self.period = 0.0, None

    def _error(self, y) -> float:
        return float((y - self.reference).abs().max() / self.reference.abs().max())

    async def frame(self, record: bool = True) -> None:
        marks: list[float] = []
        t0 = time.perf_counter()
        y, reports = await self.coord.run_stage(self.image, lambda b, r, m=marks: m.append(time.perf_counter()))
        if record:
            self.times.append(time.perf_counter() - t0)
            self.tiles.extend(reports)
            self.frames.append((t0, reports))
            self.blocks.append([b - a for a, b in zip([t0, *marks[:-1]], marks, strict=True)])
        self.err = max(self.err, self._error(y))

    async def window(self, frames: int, window: int) -> None:
        gate = asyncio.Semaphore(window)

        async def one():
            async with gate:
                return await self.coord.run_stage(self.image)

        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one() for _ in range(frames)))
        self.period = (time.perf_counter() - t0) / len(outs)
        self.err = max(self.err, max(self._error(o) for o, _ in outs))

    def result(self):
        blocks = self.blocks
        medians = [statistics.median(b[j] for b in blocks) for j in range(len(blocks[0]))] if blocks else []
        return self.times, self.tiles, self.err, medians, self.period, self.frames


async def measure_all(ms: list[Measurement], frames: int, interleave: bool) -> None:
    """Latency frames of every strategy: interleaved (frame i of each in turn, so all see the same
    load on a shared machine) or one strategy after the other; each warms up with one frame first."""
    for m in ms:
        await m.frame(record=False)
    if interleave:
        for _ in range(frames):
            for m in ms:
                await m.frame()
    else:
        for m in ms:
            for _ in range(frames):
                await m.frame()


async def calibrate_coordinator(args, loaded, addresses: list[str]) -> dict:
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
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def _measure_k(args, k: int, names: list[str], prof: Path, tmp: Path, cal: dict, loaded, image,
                    factors: Path | None) -> list[dict]:
    import torch

    from runtime.parallel.plan import ParallelStage

    planned, ms, skipped = {}, {}, {}
    for strategy in [x for x in STRATEGIES if x in args.strategies.split(",")]:
        planned[strategy] = plan(prof, k, strategy, args, names, tmp / f"{k}-{strategy}.json", cal["bytes_per_second"] / 1e6,
                                 cal.get("block_overhead_seconds", 0.0) * 1e3, factors)
        stage = ParallelStage.from_json(planned[strategy]["stage"])
        if stage.predicted_seconds > args.max_predicted_seconds:
            skipped[strategy] = f"predicted above {args.max_predicted_seconds:g} s"
            continue
        with torch.inference_mode():
            reference = loaded.head(stage.blocks[-1].end)(image)
        ms[strategy] = Measurement(loaded, stage, image, reference, not args.barrier and strategy != PREVIOUS)
    try:
        await measure_all(list(ms.values()), args.frames, not args.sequential)
        for strategy, m in ms.items():
            if args.window > 1 and strategy in ("dpfp", HALO, "single_worker"):
                await m.window(args.frames * args.window, args.window)
    finally:
        for m in ms.values():
            await m.coord.close()
    rows = []
    for strategy, p in planned.items():
        rows.append(_row(k, strategy, p, ms[strategy].result() if strategy in ms else None, skipped.get(strategy, "")))
        r = rows[-1]
        if strategy in ms:
            r["halo_fallbacks"] = ms[strategy].coord.halo_fallbacks  # frames run again with gather and scatter
            print(f"K={k} {strategy:<15} predicted {r['predicted_seconds']:.3f} s measured {r['measured_seconds']:.3f} s",
                  file=sys.stderr)
    return rows


def _row(k: int, strategy: str, planned: dict, measured, skipped: str = "") -> dict:
    stage = planned["stage"]
    row = {"workers": k, "strategy": strategy, "predicted_seconds": stage["predicted_seconds"], "stage": stage,
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


def _slowest_compute(tiles, frames: int, blocks: int) -> list[float]:
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


async def run(args, tmp: Path, quotas) -> dict:

    from runtime.models.loader import load_model
    from runtime.parallel.plan import ParallelStage
    from runtime.tools.netem import DelayProxy, LinkShape
    from runtime.worker.process import spawn_worker

    counts = sorted({int(x) for x in args.workers.split(",")})
    prof = Path(args.profile) if args.profile else tmp / "worker.json"
    if not args.profile:
        t0 = time.perf_counter()
        profile(quotas, args.share, args.model, args.profile_runs, prof)
        print(f"profiled {args.model} at {args.share:g} core in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    factors = None if args.tile_factors == "none" else Path(args.tile_factors) if args.tile_factors else tmp / "factors.json"
    if factors is not None and not args.tile_factors:
        from runtime.tools.dpfp_tilecal import in_quota

        in_quota(quotas, args.share, args.model, factors, args.tile_factor_runs)
    loaded = load_model(args.model)
    workers, relays = [], []
    try:
        for i in range(max(counts)):
            w = spawn_worker(["--torch-threads", "1", "--max-message-bytes", str(256 * MiB), "--max-queue", "64",  # peers on loopback
                              "--halo-peer", "127.0.0.1", "--preload", args.model], timeout=300, log=tmp / f"worker{i}.log")
            workers.append(w)
            quotas.new(args.share).add(w.proc.pid)
            if args.relays == "none":
                relays.append(Direct(w.address))
            elif args.relays == "process":
                relays.append(RelayProcess(w.address, args.delay_ms, args.rate_mbps, tmp / f"relay{i}.log"))
            else:
                relays.append(await DelayProxy(w.address, LinkShape.from_ms_mbps(args.delay_ms, args.rate_mbps)).start())
        from runtime.agent.sources import open_source

        image = next(iter(open_source(loaded.spec, "samples", 1))).tensor
        cal = await calibrate_coordinator(args, loaded, [r.address for r in relays])
        rows = []
        for k in counts:
            rows += await _measure_k(args, k, [r.address for r in relays[:k]], prof, tmp, cal, loaded, image, factors)
        stage = ParallelStage.from_json(rows[-1]["stage"])
        last = stage.blocks[-1].end
        return {"rows": rows, "range": [stage.blocks[0].start, last], "coordinator": cal,
                "tile_factors": json.loads(factors.read_text()) if factors else None}
    finally:
        for r in relays:
            await r.close()
        for w in workers:
            w.stop(timeout=10)


_RELAYS = {"process": "a process each", "inline": "in the coordinator process",
           "none": "NOT USED in this run (--relays none: straight to the workers; the link figures are only what the planner assumed)"}


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def _blocks(r: dict) -> str:
    grids, halo = r.get("grid_cols") or [1] * len(r["blocks"]), sum(b.get("halo_input", 0) for b in r["stage"]["blocks"])
    fell = f", {r['halo_fallbacks']} frames fell back to gather" if r.get("halo_fallbacks") else ""
    return (f"{len(r['blocks'])}" + (f" ({sum(1 for c in grids if c > 1)} grids)" if any(c > 1 for c in grids) else "")
            + (f", {halo} by halo exchange" if halo else "") + fell)


def _breakdown(res: dict) -> list[str]:
    """Per fused block of each DPFP row: predicted and measured seconds, tiling."""
    out = ["", "Per fused block (DPFP rows; measured: median time from the previous block's last tile in (or the frame's start) to this block's last tile in; with the wavefront a block's tiles start before the previous block ends, so this may be less than its tiles take):", "",
           "| K | block | tiling | predicted s | measured s | slowest tile's compute s (worker-reported) |",
           "|---|---|---|---:|---:|---:|"]
    for r in res["rows"]:
        if r["strategy"] not in ("dpfp", HALO) or not r.get("measured_block_seconds"):
            continue
        grids = r.get("grid_cols") or [1] * len(r["blocks"])
        slow = r.get("slowest_tile_compute_seconds") or [None] * len(r["blocks"])
        for (a, b), c, p, m, w, h in zip(r["blocks"], grids, r["predicted_block_seconds"], r["measured_block_seconds"],
                                         slow, [b.get("halo_input", False) for b in r["stage"]["blocks"]], strict=True):
            tiling = (f"{r['workers_used'] // c}x{c} grid" if c > 1 else "row bands") + (", halo in" if h else "")
            out.append(f"| {r['workers']}{' (halo)' if r['strategy'] == HALO else ''} | {a}..{b} | {tiling} | {p:.3f} | "
                       f"{m:.3f} | {_fmt(w, '.3f')} |")
    return out


def _throughput(res: dict) -> list[str]:
    rows = [r for r in res["rows"] if r.get("window_period_seconds")]
    if not rows:
        return []
    base = next((r["window_period_seconds"] for r in rows if r["workers"] == 1 and r["strategy"] == "single_worker"), None)
    out = ["", f"Throughput with {res['args']['window']} frames in flight through the stage (seconds per frame = wall "
           f"time of {res['args']['frames'] * res['args']['window']} frames / their number; against the single worker "
           "with K=1 measured the same way). This is time per frame, not latency:", "",
           "| K | strategy | s per frame | reduction | speedup |", "|---|---|---:|---:|---:|"]
    for r in rows:
        p = r["window_period_seconds"]
        red = f"{100 * (1 - p / base):.1f}%" if base else "-"
        spd = f"{base / p:.2f}x" if base else "-"
        out.append(f"| {r['workers']} | {r['strategy']} | {p:.3f} | {red} | {spd} |")
    return out


def _factors_note(res: dict) -> str:
    tf = res.get("tile_factors")
    if not tf:
        return "each tile priced by its area share of the untiled block (no tile-compute factors)"
    return (f"each tile's area share times the unit's factor at that share, measured on real tiles by "
            f"runtime.tools.dpfp_tilecal ({len(tf['units'])} units, median of {tf['runs']} runs per tile shape, "
            f"{tf['threads']} thread, at {tf['measured_at']}"
            f"{', inside a worker quota' if not res['args'].get('tile_factors') else ', file ' + res['args']['tile_factors']})")


def markdown(res: dict) -> str:
    a = res["args"]
    single = {r["workers"]: r.get("measured_seconds") for r in res["rows"] if r["strategy"] == "single_worker"}
    base = single.get(1) or next(iter(single.values()), None)
    base_pred = next((r["predicted_seconds"] for r in res["rows"] if r["strategy"] == "single_worker"), None)
    cal = res.get("coordinator", {})
    coord = (f"the coordinator's per-byte rate, measured before planning by runtime.agent.parallel_calibrate over "
             f"{', '.join(cal['blocks'])}: {cal['bytes_per_second'] / 1e6:.1f} MB/s + "
             f"{cal.get('block_overhead_seconds', 0.0) * 1e3:.2f} ms per block (in the cost model)"
             if cal.get("bytes_per_second") else "the coordinator's per-byte work not costed")
    out = [f"# DPFP benchmark: {a['model']} {res['range'][0]}..{res['range'][1]}", "",
           f"Command: `{res['command']}`", "",
           f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, kernel {res['machine']['kernel']}, "
           f"Python {res['machine']['python']}, torch {res['machine']['torch']}; shared with other jobs: load average "
           f"{' / '.join(f'{x:.2f}' for x in res.get('load_before', []))} (1/5/15 min) before the run, "
           f"{' / '.join(f'{x:.2f}' for x in res.get('load_after', []))} after.", "",
           f"Each worker: its own cgroup v1 CPU quota of {a['share']:g} core (cfs_quota {round(a['share'] * 10000)} us "
           f"per 10,000 us), one torch thread; the coordinator (stitching, encoding) and the relays run outside the "
           f"quotas. Link: one user-space relay per worker "
           f"({_RELAYS.get(a.get('relays', 'inline'), '')}), {a['delay_ms']:g} ms one way, {a['rate_mbps']:g} Mbit/s "
           f"each direction (planned with --link-mode {a['link_mode']}; codec {a.get('codec', 'raw')}; "
           f"{'row bands only' if a.get('no_grids') else 'row bands or 2-D grids'}; {coord}; coordinator "
           f"{'waits for each whole block' if a.get('barrier') else 'wavefront: a tile goes once the tiles it reads are in'}). Times: the stage "
           f"alone, median of {a['frames']} frames after one warm-up "
           f"({'one strategy after the other' if a.get('sequential') else 'interleaved: frame i of every strategy in turn'}); "
           "reduction and speedup against the single worker "
           "measured with K=1, and against the single worker measured in the same K group (the same minutes of "
           "machine load); predicted: against the predicted single worker.", "",
           f"Tile compute: {_factors_note(res)}.", "",
           "| K | strategy | predicted s | measured s | pred. error | reduction (meas.) | speedup (meas.) | vs single "
           "worker, same K | reduction (pred.) | max rel. error | fused blocks |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        m = r.get("measured_seconds")
        red = f"{100 * (1 - m / base):.1f}%" if m and base else "-"
        spd = f"{base / m:.2f}x" if m and base else "-"
        same = single.get(r["workers"])
        same_k = f"{100 * (1 - m / same):.1f}% / {same / m:.2f}x" if m and same else "-"
        perr = f"{100 * (r['predicted_seconds'] / m - 1):+.0f}%" if m else "-"
        out.append(f"| {r['workers']} | {r['strategy']} | {r['predicted_seconds']:.3f} | "
                   f"{_fmt(m, '.3f') if m else 'skipped: ' + r['skipped']} | "
                   f"{perr} | {red} | {spd} | {same_k} | "
                   f"{_fmt(100 * (1 - r['predicted_seconds'] / base_pred) if base_pred else None, '.1f')}% | "
                   f"{_fmt(r.get('max_rel_error'), '.1e')} | "
                   f"{_blocks(r)} |")
    return "\n".join(out + _breakdown(res) + dpfp_timeline.markdown(res["rows"]) + _throughput(res)) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from runtime.tools.cpuquota import QuotaSet, unavailable

    why = unavailable()
    if why:
        print(f"dpfp_bench: cannot emulate the workers' CPU quotas: {why}; not run", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgesplit-dpfp-") as d, QuotaSet(f"edgesplit-dpfp-{os.getpid()}") as q:
        res = asyncio.run(run(args, Path(d), q))
    res.update(load_before=list(load_before), load_after=list(os.getloadavg()), args=vars(args), machine=machine(),
               command="python -m runtime.tools.dpfp_bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
