"""Benchmark of parallel stages (RFS/DPFP): DPFP against one worker, MoDNN-like and FTP-like.

    python -m runtime.tools.dpfp_bench --workers 1,2,4 --share 0.4 --delay-ms 2 --rate-mbps 200 \\
        --out runtime/tools/results/dpfp_vgg16

1. Profiles the model once inside a CPU quota of ``--share`` of one core (cgroup v1, ``--period-us`` period,
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
   ``dpfp_halo``: DPFP with halos exchanged between workers, the fetch round's fixed cost not costed (it is measured),
   each halo block's tiles sent early (the workers wait for the kept tiles); ``dpfp_halo_acked``: the same plan, each
   halo block's tiles sent once those they read have answered (the A/B of early dispatch).
   The coordinator runs on the agent's event loop with glibc's allocator set as the daemons set it
   (``runtime.wire.eventloop.run``: uvloop, ``tune_malloc``; ``EDGESPLIT_EVENT_LOOP=asyncio`` and
   ``EDGESPLIT_MALLOC=default`` leave them, to compare; the result records both).
4. Writes ``OUT.json`` and ``OUT.md``. Cgroups, processes, relays and temp files are removed at
   the end, also on failure or Ctrl-C. Without cgroup v1 (or root) it exits 2 saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.daemon.cgroup import MIN_QUOTA_US, PERIOD_US
from runtime.tools.dpfp_measure import (
    ACKED,
    HALO,
    PREVIOUS,
    STRATEGIES,
    Direct,
    Measurement,
    MiB,
    Relay,
    RelayProcess,
    calibrate_coordinator,
    measure_all,
    plan,
    profile,
    recovered_tiles,
    result_row,
)
from runtime.tools.dpfp_report import machine, markdown
from runtime.wire import eventloop

if TYPE_CHECKING:
    import torch

    from runtime.daemon.cgroup import CpuQuota
    from runtime.models.loader import LoadedModel
    from runtime.tools.cpuquota import QuotaSet


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.dpfp_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vgg16", help="bundled model")
    p.add_argument("--workers", default="1,2,4", help="worker counts to measure")
    p.add_argument("--share", type=float, default=0.4, help="CPU quota of each worker, in cores")
    p.add_argument("--period-us", default=str(PERIOD_US),
                   help="cgroup CPU period of every quota (profile, tile factors, workers): a worker runs at full speed "
                        "for share x period, then waits out the rest of it; the kernel takes quotas of 1000 us or more. "
                        "Several (10000,2500): the profile and tile factors at the first, and every strategy measured "
                        "at each, the workers' groups switched between frames (interleaved: the same plans and load)")
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
                        f"{HALO}: DPFP with the halo exchange directly between workers where it predicts it cheaper, "
                        f"a halo block's tiles sent once those they read are sent (early dispatch); {ACKED}: the same "
                        "plan, sent once those they read have answered, a round through the coordinator per block)")
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


async def _measure_k(args: argparse.Namespace, k: int, names: list[str], prof: Path, tmp: Path, cal: dict[str, Any],
                    loaded: LoadedModel, image: torch.Tensor, factors: Path | None,
                    groups: list[CpuQuota]) -> list[dict[str, Any]]:
    import torch

    from runtime.parallel.plan import ParallelStage

    planned: dict[str, dict[str, Any]] = {}
    ms: dict[tuple[str, int], Measurement] = {}
    skipped: dict[str, str] = {}
    for strategy in [x for x in STRATEGIES if x in args.strategies.split(",")]:
        planned[strategy] = planned[HALO] if strategy == ACKED and HALO in planned else plan(  # the same plan
            prof, k, strategy, args, names, tmp / f"{k}-{strategy}.json", cal["bytes_per_second"] / 1e6,
            cal.get("block_overhead_seconds", 0.0) * 1e3, factors)
        stage = ParallelStage.from_json(planned[strategy]["stage"])
        if stage.predicted_seconds > args.max_predicted_seconds:
            skipped[strategy] = f"predicted above {args.max_predicted_seconds:g} s"
            continue
        with torch.inference_mode():
            reference = loaded.head(stage.blocks[-1].end)(image)
        for period in args.periods:
            ms[strategy, period] = Measurement(loaded, stage, image, reference, not args.barrier and strategy != PREVIOUS,
                                               halo_early=strategy != ACKED, period_us=period)

    def switch(m: Measurement) -> None:  # the workers' groups to this measurement's period
        if len(args.periods) > 1:
            for g in groups:
                g.set_period(m.period_us)

    try:
        await measure_all(list(ms.values()), args.frames, not args.sequential, switch)
        for (strategy, _), m in ms.items():
            if args.window > 1 and strategy in ("dpfp", HALO, ACKED, "single_worker"):
                switch(m)
                await m.window(args.frames * args.window, args.window)
    finally:
        for g in groups if len(args.periods) > 1 else ():  # the next K group starts at the first period
            g.set_period(args.periods[0])
        for m in ms.values():
            await m.coord.close()
    rows: list[dict[str, Any]] = []
    for strategy, p in planned.items():
        for period in args.periods:
            got = ms.get((strategy, period))
            rows.append(result_row(k, strategy, p, got.result() if got else None, skipped.get(strategy, "")))
            r = rows[-1]
            r["period_us"] = period
            if got is not None:
                r["halo_fallbacks"] = got.coord.halo_fallbacks  # frames resumed with gather and scatter
                r["halo_recovered_tiles"] = recovered_tiles(got.coord)  # of those frames' tiles: fetched back, run again
                print(f"K={k} {strategy:<15} {period} us: predicted {r['predicted_seconds']:.3f} s measured "
                      f"{r['measured_seconds']:.3f} s", file=sys.stderr)
    return rows


async def run(args: argparse.Namespace, tmp: Path, quotas: QuotaSet) -> dict[str, Any]:

    from runtime.models.loader import load_model
    from runtime.parallel.plan import ParallelStage
    from runtime.tools.netem import DelayProxy, LinkShape
    from runtime.worker.process import WorkerProcess, spawn_worker

    counts = sorted({int(x) for x in args.workers.split(",")})
    prof = Path(args.profile) if args.profile else tmp / "worker.json"
    if not args.profile:
        t0 = time.perf_counter()
        profile(quotas, args.share, args.model, args.profile_runs, prof, args.period_us)
        print(f"profiled {args.model} at {args.share:g} core in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    factors = None if args.tile_factors == "none" else Path(args.tile_factors) if args.tile_factors else tmp / "factors.json"
    if factors is not None and not args.tile_factors:
        from runtime.tools.dpfp_tilecal import in_quota

        in_quota(quotas, args.share, args.model, factors, args.tile_factor_runs, period_us=args.period_us)
    loaded = load_model(args.model)
    workers: list[WorkerProcess] = []
    relays: list[Relay] = []
    groups: list[CpuQuota] = []
    try:
        for i in range(max(counts)):
            w = spawn_worker(["--torch-threads", "1", "--max-message-bytes", str(256 * MiB), "--max-queue", "64",  # peers on loopback
                              "--halo-peer", "127.0.0.1", "--preload", args.model], timeout=300, log=tmp / f"worker{i}.log")
            workers.append(w)
            groups.append(quotas.new(args.share, args.period_us))
            groups[-1].add(w.proc.pid)
            if args.relays == "none":
                relays.append(Direct(w.address))
            elif args.relays == "process":
                relays.append(RelayProcess(w.address, args.delay_ms, args.rate_mbps, tmp / f"relay{i}.log"))
            else:
                relays.append(await DelayProxy(w.address, LinkShape.from_ms_mbps(args.delay_ms, args.rate_mbps)).start())
        from runtime.agent.sources import open_source

        image = next(iter(open_source(loaded.spec, "samples", 1))).tensor
        cal = await calibrate_coordinator(args, loaded, [r.address for r in relays])
        rows: list[dict[str, Any]] = []
        for k in counts:
            rows += await _measure_k(args, k, [r.address for r in relays[:k]], prof, tmp, cal, loaded, image, factors,
                                     groups[:k])
        stage = ParallelStage.from_json(rows[-1]["stage"])
        last = stage.blocks[-1].end
        return {"rows": rows, "range": [stage.blocks[0].start, last], "coordinator": cal,
                "tile_factors": json.loads(factors.read_text()) if factors else None}
    finally:
        for r in relays:
            await r.close()
        for w in workers:
            w.stop(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        args.periods = [int(x) for x in args.period_us.split(",")][:8]
    except ValueError:
        p.error(f"--period-us takes microseconds, comma-separated: {args.period_us!r}")
    args.period_us = args.periods[0]
    if any(not 1000 <= x <= 1_000_000 or round(args.share * x) < MIN_QUOTA_US for x in args.periods):
        p.error(f"--period-us must be 1000..1000000 and --share x --period-us at least the kernel's {MIN_QUOTA_US} us "
                f"quota (a share of {args.share:g} core needs {-(-MIN_QUOTA_US // args.share):.0f} us or more)")
    from runtime.daemon.cgroup import unavailable
    from runtime.tools.cpuquota import QuotaSet

    why = unavailable()
    if why:
        print(f"dpfp_bench: cannot emulate the workers' CPU quotas: {why}; not run", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    load_before = os.getloadavg()
    tuned = eventloop.tune_malloc()  # eventloop.run sets it again: the same settings
    with tempfile.TemporaryDirectory(prefix="edgesplit-dpfp-") as d, QuotaSet(f"edgesplit-dpfp-{os.getpid()}") as q:
        res = eventloop.run(run(args, Path(d), q))
    res.update(load_before=list(load_before), load_after=list(os.getloadavg()), args=vars(args), machine=machine(),
               event_loop=eventloop.loop_name(), malloc="tuned" if tuned else "defaults",
               command="python -m runtime.tools.dpfp_bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
