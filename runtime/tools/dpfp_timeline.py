"""Where a parallel stage's time goes, block by block (dpfp_bench's timeline table; issue 13).

Every tile's :class:`runtime.agent.parallel.TileReport` carries coordinator timestamps (crop cut,
request handed to gRPC, answer in, tile stitched) and the worker's own queue, decode and compute
times. For each fused block this takes the tile that finished last (the block's critical tile) and
splits the block's measured span (previous block's end to this block's end) into:

- ``wait``: the previous block's end to the critical tile's crop being cut (negative with the
  wavefront when the crop was ready before the previous block's last tile);
- ``encode``: cutting done to the request handed to gRPC (codec encode + message build, coordinator);
- ``queue``, ``decode``, ``compute``: as the worker reported them;
- ``net+grpc``: the round trip less the worker's own times (both relays, gRPC on both ends, the
  worker's encode of its answer);
- ``stitch``: the answer in to the tile written into the output map (decode + copy, coordinator).

A halo tile sent before the previous block ended (early dispatch: its worker waits for the kept
tiles itself) counts from the previous block's end instead: no wait or encode, and ``net+grpc`` is
the answer in less the previous block's end less the worker's own times. That is what the
exchange adds after the previous block is in; it may be negative when the worker started before
the coordinator saw the previous block's last answer.

Bytes moved per block: through the coordinator (crops and tiles) and worker to worker (the crop
parts each worker fetched from its neighbours in a halo exchange, ``TileResult.peer_bytes``).

Medians over frames, per block; a frame's span in total is the sum of its blocks' spans.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.agent.parallel_maps import TileReport

TERMS = ("wait", "encode", "queue", "decode", "compute", "net+grpc", "stitch")


def frame_terms(t0: float, reports: Sequence[TileReport], blocks: int) -> list[dict[str, float]]:
    """One frame's per-block split (``reports``: that frame's TileReports, ``t0``: its start)."""
    out: list[dict[str, float]] = []
    prev_end = t0
    for b in range(blocks):
        tiles = [t for t in reports if t.block == b and t.done_at]
        if not tiles:
            out.append({})
            continue
        crit = max(tiles, key=lambda t: t.done_at)
        remote = crit.sent_at > 0 and crit.answered_at > 0
        early = remote and crit.early and crit.sent_at < prev_end  # counted from the previous block's end
        rtt = crit.answered_at - (prev_end if early else crit.sent_at) if remote else 0.0
        worker = crit.queue_seconds + crit.decode_seconds + crit.compute_seconds if remote else 0.0
        row = {"span": crit.done_at - prev_end, "wait": 0.0 if early else crit.ready_at - prev_end,
               "encode": (crit.sent_at - crit.ready_at) if remote and not early else 0.0,
               "queue": crit.queue_seconds if remote else 0.0, "decode": crit.decode_seconds if remote else 0.0,
               "compute": crit.compute_seconds, "net+grpc": rtt - worker if remote else 0.0,
               "stitch": (crit.done_at - crit.answered_at) if remote else crit.done_at - crit.ready_at - crit.compute_seconds,
               "max_compute": max(t.compute_seconds for t in tiles),
               "coordinator_cpu": sum((t.sent_at - t.ready_at) + (t.done_at - t.answered_at) for t in tiles
                                      if t.sent_at and t.answered_at),
               "bytes": float(sum(t.sent_bytes + t.received_bytes + t.peer_bytes for t in tiles)),
               "peer_bytes": float(sum(t.peer_bytes for t in tiles))}
        out.append(row)
        prev_end = crit.done_at
    return out


def medians(frames: Sequence[tuple[float, Sequence[TileReport]]], blocks: int) -> list[dict[str, float]]:
    """Per block, the median of each term over ``frames`` ((start, reports) pairs)."""
    per = [frame_terms(t0, reps, blocks) for t0, reps in frames]
    out = []
    for b in range(blocks):
        rows = [f[b] for f in per if f[b]]
        out.append({k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {})
    return out


def markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table for dpfp_bench's OUT.md (``rows``: result rows with a ``timeline``)."""
    rows = [r for r in rows if r.get("timeline") and r["strategy"] in ("dpfp", "dpfp_halo", "dpfp_halo_acked")
            and r["workers"] > 1]
    if not rows:
        return []
    out = ["", "Where each block's time goes (DPFP rows, median over frames; the block's critical tile = the one "
           "stitched last; span = previous block's end to this block's end = wait + encode + queue + decode + "
           "compute + net+grpc + stitch; coordinator ms = encode + stitch summed over all the block's tiles; "
           "MB moved = through the coordinator + worker to worker, of which w2w = the crop parts workers fetched from "
           "their neighbours; runtime.tools.dpfp_timeline):", "",
           "| K | block | span ms | " + " | ".join(f"{t} ms" for t in TERMS) + " | coordinator ms | MB moved | w2w MB |",
           "|---|---|---:|" + "---:|" * len(TERMS) + "---:|---:|---:|"]
    for r in rows:
        total = dict.fromkeys(("span", *TERMS, "coordinator_cpu", "bytes", "peer_bytes"), 0.0)
        for (a, b), t in zip(r["blocks"], r["timeline"], strict=True):
            if not t:
                continue
            for k in total:
                total[k] += t.get(k, 0.0)  # records before peer_bytes have none
            out.append(_line(r.get("label", r["workers"]), f"{a}..{b}", t, r["strategy"]))
        out.append(_line(r.get("label", r["workers"]), "**all blocks**", total, r["strategy"]))
    return out


def _line(k: int | str, name: str, t: dict[str, float], strategy: str = "dpfp") -> str:
    label = f"{k}" + {"dpfp_halo": " (halo)", "dpfp_halo_acked": " (halo, acked)"}.get(strategy, "")
    return (f"| {label} | {name} | {t['span'] * 1e3:.1f} | " + " | ".join(f"{t[x] * 1e3:.1f}" for x in TERMS)
            + f" | {t['coordinator_cpu'] * 1e3:.1f} | {t['bytes'] / 1e6:.2f} | {t.get('peer_bytes', 0.0) / 1e6:.2f} |")
