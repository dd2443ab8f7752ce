"""Where one parallel block's round goes beyond compute: CPU quotas, relays, contention (issue 13).

    python -m runtime.tools.dpfp_round --workers 4 --block features_26,features_30 [--frames 10]

Starts ``--workers`` worker processes (one torch thread each) and runs one fused block of VGG-16 (or
``--model``) as a 2x2 grid (row bands for fewer than 4 workers) over them, ``--frames`` frames after
two warm-ups, in six settings: without a quota, with each worker in a CPU quota of ``--share`` core
(cgroup v1, ``--period-us``), and with only each worker's busiest thread in such a quota (its compute
thread: the one that used the most CPU in the settings before; the worker's gRPC threads run free, so
an answer never waits for the worker's next quota period); each straight to the workers and through one
relay process per worker (``runtime.tools.netem``, ``--delay-ms`` one way, ``--rate-mbps``). For each it prints the block's
span and, from the tiles' timelines (``runtime.tools.dpfp_timeline``), the critical tile's network
+ gRPC time (round trip less the worker's own queue, decode and compute), the mean of that over the
block's tiles, the critical tile's compute and the spread between the first and last answer.
Without cgroup v1 (or root) the quota settings are skipped. The coordinator runs as the agent does
(``runtime.wire.eventloop.run``: uvloop and glibc's allocator set; ``EDGESPLIT_EVENT_LOOP=asyncio`` /
``EDGESPLIT_MALLOC=default`` leave them, to compare).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.wire import eventloop

if TYPE_CHECKING:
    import torch

    from runtime.agent.parallel_maps import TileReport
    from runtime.models.loader import LoadedModel
    from runtime.tools.cpuquota import QuotaSet

MiB = 2**20


async def _block(loaded: LoadedModel, addresses: list[str], x: torch.Tensor, start: str, end: str,
                 frames: int) -> dict[str, float]:
    from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator
    from runtime.parallel.plan import ParallelStage, TiledBlock
    from runtime.tools import dpfp_timeline
    from runtime.wire.transport import TransportOptions

    cols = 2 if len(addresses) == 4 else 1
    stage = ParallelStage(tuple(addresses), (TiledBlock(start, end, (1.0,) * len(addresses), grid_cols=cols),),
                          model=loaded.name)
    coord = ParallelCoordinator(loaded, stage, CoordinatorOptions(
        tile_deadline_seconds=60, transport=TransportOptions(max_message_bytes=256 * MiB)))
    runs: list[tuple[float, list[TileReport]]] = []
    try:
        await coord.prepare()
        for f in range(frames + 2):
            t0 = time.perf_counter()
            _, reports = await coord.run_stage(x)
            if f >= 2:
                runs.append((t0, reports))
    finally:
        await coord.close()
    m = dpfp_timeline.medians(runs, 1)[0]
    net = statistics.median(statistics.mean(r.answered_at - r.sent_at - r.worker_seconds for r in reps) for _, reps in runs)
    spread = statistics.median(max(r.answered_at for r in reps) - min(r.answered_at for r in reps) for _, reps in runs)
    return {"span": m["span"], "net": m["net+grpc"], "mean_net": net, "compute": m["compute"], "spread": spread}


def thread_cpu(pid: int) -> dict[int, int]:
    """CPU clock ticks (user + system) of each thread of ``pid`` so far (/proc/PID/task/TID/stat)."""
    out: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(task.name)] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return out


def busiest_thread(pid: int, before: dict[int, int]) -> int:
    """The thread of ``pid`` that used the most CPU since ``before`` (:func:`thread_cpu`): a worker's compute thread."""
    now = thread_cpu(pid)
    return max(now, key=lambda tid: now[tid] - before.get(tid, 0))


async def run(args: argparse.Namespace, quotas: QuotaSet | None) -> list[tuple[str, str, dict[str, float]]]:
    import torch

    from runtime.models.loader import load_model
    from runtime.tools.dpfp_measure import Direct, Relay, RelayProcess
    from runtime.worker.process import spawn_worker

    loaded = load_model(args.model)
    start, end = args.block.split(",")
    with torch.inference_mode():
        x = loaded.head(start)(torch.randn(loaded.input_shape, generator=torch.Generator().manual_seed(0)))
    tmp = Path(tempfile.mkdtemp(prefix="edgesplit-round-"))
    workers = [spawn_worker(["--torch-threads", "1", "--max-message-bytes", str(256 * MiB), "--preload", args.model],
                            timeout=300) for _ in range(args.workers)]
    rows: list[tuple[str, str, dict[str, float]]] = []
    before = {w.proc.pid: thread_cpu(w.proc.pid) for w in workers}
    settings = ("none", f"{args.share:g} core", f"{args.share:g} core, compute thread")
    try:
        for quota in settings if quotas is not None else ("none",):
            if quota == settings[1] and quotas is not None:  # listed only with quotas
                for w in workers:
                    quotas.new(args.share, args.period_us).add(w.proc.pid)
            elif quota == settings[2] and quotas is not None:
                for w in workers:
                    quotas.release(w.proc.pid)
                    quotas.new(args.share, args.period_us).add_thread(busiest_thread(w.proc.pid, before[w.proc.pid]))
            for relay in ("direct", "relay process"):
                links: list[Relay] = [Direct(w.address) if relay == "direct" else
                         RelayProcess(w.address, args.delay_ms, args.rate_mbps, tmp / f"relay{i}.log")
                         for i, w in enumerate(workers)]
                try:
                    rows.append((quota, relay, await _block(loaded, [lk.address for lk in links], x, start, end, args.frames)))
                finally:
                    for lk in links:
                        await lk.close()
                print(f"{quota:<9} {relay:<13} " + " ".join(f"{k} {v * 1e3:.1f} ms" for k, v in rows[-1][2].items()),
                      file=sys.stderr)
    finally:
        for w in workers:
            w.stop(timeout=10)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.dpfp_round", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="vgg16", help="bundled model")
    p.add_argument("--block", default="features_26,features_30", help="START,END split points of the block")
    p.add_argument("--workers", type=int, default=4, help="worker processes (4: a 2x2 grid; else row bands)")
    p.add_argument("--frames", type=int, default=10, help="timed frames per setting (after two warm-ups)")
    p.add_argument("--share", type=float, default=0.4, help="CPU quota of each worker in the quota settings, in cores")
    p.add_argument("--period-us", type=int, default=10_000, help="cgroup CPU period of the quotas")
    p.add_argument("--delay-ms", type=float, default=0.5, help="one-way delay of each relay")
    p.add_argument("--rate-mbps", type=float, default=1000.0, help="rate of each relay, each direction")
    args = p.parse_args(argv)
    if not (1 <= args.workers <= 16 and 1 <= args.frames <= 1000 and 0 < args.share <= 4 and 1000 <= args.period_us <= 1_000_000):
        p.error("--workers 1..16, --frames 1..1000, --share 0..4, --period-us 1000..1000000")
    if "," not in args.block:
        p.error("--block takes START,END")
    from runtime.daemon.cgroup import unavailable
    from runtime.tools.cpuquota import QuotaSet

    load = os.getloadavg()
    why = unavailable()
    if why:
        print(f"dpfp_round: no CPU quotas ({why}); only the settings without them", file=sys.stderr)
        rows = eventloop.run(run(args, None))
    else:
        with QuotaSet(f"edgesplit-round-{os.getpid()}") as q:
            rows = eventloop.run(run(args, q))
    print(f"{args.model} block {args.block} on {args.workers} workers, {args.frames} frames each; coordinator on "
          f"{eventloop.loop_name()}, allocator {'tuned' if eventloop.tune_malloc() else 'glibc defaults'}; load average "
          f"{' / '.join(f'{v:.2f}' for v in load)} before, {' / '.join(f'{v:.2f}' for v in os.getloadavg())} after")
    print("| quota | link | span ms | critical tile net+gRPC ms | mean net+gRPC ms | critical tile compute ms | answers spread ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for quota, relay, m in rows:
        print(f"| {quota} | {relay} | {m['span'] * 1e3:.1f} | {m['net'] * 1e3:.1f} | {m['mean_net'] * 1e3:.1f} | "
              f"{m['compute'] * 1e3:.1f} | {m['spread'] * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
