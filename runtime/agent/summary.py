"""Per-run summary: stage latency percentiles, bytes per frame, compression ratio, overhead."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence

from runtime.agent.client import FrameResult
from runtime.models.slicing import SplitPoint


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty sequence."""
    data = sorted(values)
    k = max(0, min(len(data) - 1, round(q / 100 * (len(data) - 1))))
    return data[k]


def runtime_overhead(r: FrameResult) -> float:
    """What the runtime adds to an edge frame, in seconds: end-to-end minus head and tail
    compute, minus time spent queueing behind other frames (board thread, edge executor), minus a
    chained frame's wait on the worker's next tier."""
    t = r.times
    return (t["total"] - t["head"] - t["edge_tail"] - t.get("board_queue", 0.0) - t.get("edge_queue", 0.0)
            - t.get("edge_forward", 0.0))


def stage_stats(results: Sequence[FrameResult]) -> dict[str, dict[str, float]]:
    """p50/p95 in milliseconds for every stage seen, plus the runtime overhead of edge frames."""
    stages: dict[str, list[float]] = {}
    for r in results:
        for k, v in r.times.items():
            stages.setdefault(k, []).append(v * 1e3)
        if r.where == "edge" and "edge_tail" in r.times:
            overhead = runtime_overhead(r)
            stages.setdefault("overhead", []).append(overhead * 1e3)
    return {k: {"p50": percentile(v, 50), "p95": percentile(v, 95), "n": len(v)} for k, v in stages.items()}


def tile_table(seconds: Mapping[str, Sequence[float]], failed: Mapping[str, int],
               compute: Mapping[str, Sequence[float]] | None = None) -> str:
    """Per worker of a parallel stage (sorted): tiles it computed, its failed attempts, p50/p95 tile round
    trip (ms; 0 when it computed none) and, given ``compute``, the p50 of its own compute (ms)."""
    lines = [f"{'worker':<24} {'tiles':>6} {'failed':>6} {'p50 ms':>8} {'p95 ms':>8}"
             + (f" {'compute p50':>11}" if compute is not None else "")]
    for w in sorted(set(seconds) | set(failed)):
        s = [v * 1e3 for v in seconds.get(w, ())]
        n, s = len(s), s or [0.0]
        line = f"{w:<24} {n:>6} {failed.get(w, 0):>6} {percentile(s, 50):>8.2f} {percentile(s, 95):>8.2f}"
        if compute is not None:
            line += f" {percentile([v * 1e3 for v in compute.get(w, ())] or [0.0], 50):>11.2f}"
        lines.append(line)
    return "\n".join(lines)


def _tile_lines(results: Sequence[FrameResult]) -> list[str]:
    """The per-worker tile times of the frames that went through a parallel stage (none: no lines)."""
    seconds: dict[str, list[float]] = {}
    failed: dict[str, int] = {}
    for r in results:
        for w, vs in r.tile_seconds.items():
            seconds.setdefault(w, []).extend(vs)
        for w, n in r.tile_failures.items():
            failed[w] = failed.get(w, 0) + n
    if not seconds and not failed:
        return []
    return ["parallel stage tiles by worker (round trip)", tile_table(seconds, failed)]


def _bytes_line(results: Sequence[FrameResult], split: SplitPoint) -> str | None:
    wire = [r.wire_bytes for r in results if r.wire_bytes]
    if not wire:
        return None
    mean = statistics.fmean(wire)
    return f"bytes/frame {mean:,.0f} (raw fp32 at split {split.fp32_bytes:,}; compression {split.fp32_bytes / mean:.2f}x)"


def summarize(results: Sequence[FrameResult], split: SplitPoint, codec: str, model: str,
              split_of: Callable[[str], SplitPoint] | None = None) -> str:
    """The run's summary. ``split``/``codec``: the configuration the agent started with; when plans
    changed it during the run, each configuration's frames get their own bytes line, against the raw
    size at their own split (``split_of`` maps a split name to its point)."""
    edge = [r for r in results if r.where == "edge"]
    configs: dict[tuple[str, str], list[FrameResult]] = {}
    for r in results:
        configs.setdefault((r.split, r.codec), []).append(r)
    lines = [
        f"== edgesplit summary: {model} split {split.index} ({split.name}, {list(split.out_shape)}) codec {codec}",
        f"frames {len(results)}: {len(edge)} on the edge, "
        + (f"{len(par)} through a parallel stage, " if (par := [r for r in results if r.where == "parallel"]) else "")
        + f"{len(results) - len(edge) - len(par)} local"
        + (f"; {sum(r.refined for r in edge)} ambiguous edge results re-run on the board"
           if any(r.refined for r in edge) else ""),
    ]
    if split_of is None or set(configs) <= {(split.name, codec)}:
        line = _bytes_line(results, split)
        lines += [line] if line else []
    else:
        lines[0] += " at the end"
        lines.append(f"plans changed the configuration: {len(configs)} used, in order of first use")
        for (name, cfg_codec), group in configs.items():
            point = split_of(name)
            versions = sorted({r.plan_version for r in group})
            line = _bytes_line(group, point) or "no bytes sent (every frame ran on the board)"
            lines.append(f"  split {point.index} ({name}) codec {cfg_codec}, plan v{'/v'.join(map(str, versions))}: "
                         f"{len(group)} frames; {line}")
    lines.append(f"{'stage':<14}{'p50 ms':>10}{'p95 ms':>10}{'n':>6}")
    order = ["board_queue", "head", "tl_encode", "encode", "board_return", "transfer_edge", "edge_queue", "edge_decode",
             "edge_tail", "edge_forward", "local_tail", "overhead", "total"]
    stats = stage_stats(results)
    for stage in order:
        if stage in stats:
            s = stats[stage]
            lines.append(f"{stage:<14}{s['p50']:>10.2f}{s['p95']:>10.2f}{s['n']:>6}")
    lines += _tile_lines(results)
    return "\n".join(lines)
