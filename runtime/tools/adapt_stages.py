"""Where a plan's prediction and a frame's measured latency part (issue 11): per stage, per steady phase.

The planner predicts a plan's latency as a sum of parts (``Plan.breakdown_seconds``, runtime.contracts
.costmodel: ``compute:TIER``, and per link ``encode``, ``rtt``, ``transfer``, ``return``, ``decode``);
each result line carries the measured stages (``times_ms``). This pairs them, frame by frame, under the
plan (or the fallback table's entry) each frame ran under, read back from the planner's store after a
run, and reports medians per stage, so the largest source of a prediction error can be named:

==========  ============================================  ==============================================
stage       predicted                                     measured (agent's ``times_ms``)
==========  ============================================  ==============================================
device      ``compute:device``                            ``head`` + ``tl_encode`` + ``local_tail``
encode      ``encode:*``                                  ``encode``
network     ``rtt:*`` + ``transfer:*`` + ``return:*``     ``transfer_edge`` - ``edge_held`` (the worker's
                                                          hold, from its own clock)
queue       ``queue:board`` + ``queue:link`` (the waits at     ``edge_queue`` + ``board_queue``
            the agent's frame rate, planner.workload)
decode      ``decode:*``                                  ``edge_decode``
edge        ``compute:edge`` (and further tiers)          ``edge_tail``
other       (none)                                        ``total`` - the stages above (threads, gRPC)
==========  ============================================  ==============================================

Since the planner holds a term for the board runtime's own time (planner.compute.Overhead), the local
configuration's ``compute:device`` includes the measured ``overhead_local`` and every ``encode:*`` the
measured ``overhead_edge``, both of which the measured side counts under ``other``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

STAGES = ("device", "encode", "network", "queue", "decode", "edge", "other")


def predicted_parts(breakdown: dict[str, float]) -> dict[str, float]:
    """``Plan.breakdown_seconds`` grouped into :data:`STAGES` (seconds)."""
    out = dict.fromkeys(STAGES, 0.0)
    for key, seconds in breakdown.items():
        kind, _, where = key.partition(":")
        if kind == "compute":
            out["device" if where == "device" else "edge"] += seconds
        elif kind in ("rtt", "transfer", "return"):
            out["network"] += seconds
        elif kind in ("encode", "decode"):
            out[kind] += seconds
        elif kind == "queue":  # the board's and the link's waits (planner.workload): the resource's, not the device's
            out["queue"] += seconds
    return out


def measured_parts(times_ms: dict[str, float]) -> dict[str, float]:
    """A result line's ``times_ms`` grouped into :data:`STAGES` (seconds)."""
    t = {k: v / 1e3 for k, v in times_ms.items()}
    out = dict.fromkeys(STAGES, 0.0)
    out["device"] = t.get("head", 0.0) + t.get("tl_encode", 0.0) + t.get("local_tail", 0.0)
    out["encode"] = t.get("encode", 0.0)
    if "transfer_edge" in t:
        held = t.get("edge_held", t.get("edge_queue", 0.0) + t.get("edge_decode", 0.0) + t.get("edge_tail", 0.0))
        out["network"] = max(0.0, t["transfer_edge"] - held)
        out["decode"], out["edge"] = t.get("edge_decode", 0.0), t.get("edge_tail", 0.0)
        out["queue"] = t.get("edge_queue", 0.0) + max(0.0, held - t.get("edge_queue", 0.0) - out["decode"] - out["edge"])
    out["queue"] += t.get("board_queue", 0.0)
    out["other"] = max(0.0, t.get("total", 0.0) - sum(out[s] for s in STAGES if s != "other"))
    return out


def plan_breakdowns(db: Path, agent_id: str) -> dict[tuple[int, str], dict[str, float]]:
    """(plan version, split) -> predicted parts, for every plan the planner issued ``agent_id`` and each
    entry of its fallback table (as the agent's result lines look predictions up)."""
    import sqlite3

    from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

    # the planner's SQLite store (planner/store.py: table plans, one serialized Plan per row), read-only; the
    # runtime's tools do not import the planner
    db_ro = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = db_ro.execute("SELECT plan FROM plans WHERE agent_id=? ORDER BY version DESC", (agent_id,)).fetchall()
    finally:
        db_ro.close()
    history = [ppb.Plan.FromString(bytes(blob)) for (blob,) in rows]
    out: dict[tuple[int, str], dict[str, float]] = {}
    for p in history:
        out[(p.version, p.split_id)] = predicted_parts(dict(p.breakdown_seconds))
        for band in p.fallbacks:
            out.setdefault((p.version, band.plan.split_id), predicted_parts(dict(band.plan.breakdown_seconds)))
    return out


def by_stage(frames: list[dict[str, Any]], plans: dict[tuple[int, str], dict[str, float]]) -> dict[str, dict[str, float]]:
    """Medians (ms) of predicted and measured per stage over ``frames`` that ran where their plan said
    (no fallback) and whose plan is known: {stage: {"predicted_ms", "measured_ms"}}, plus "frames"."""
    pairs = [(plans[(r["plan_version"], r["split"])], measured_parts(r["times_ms"])) for r in frames
             if (r["plan_version"], r["split"]) in plans
             and not (r.get("fallback_reason") or "").startswith(("deadline", "worker"))]
    out: dict[str, dict[str, float]] = {}
    for s in STAGES:
        if pairs:
            out[s] = {"predicted_ms": round(statistics.median(p[s] for p, _ in pairs) * 1e3, 2),
                      "measured_ms": round(statistics.median(m[s] for _, m in pairs) * 1e3, 2)}
    out["frames"] = {"n": float(len(pairs))}
    return out


def table(phases: list[dict[str, Any]]) -> list[str]:
    """Markdown: one row per stage, predicted/measured per steady phase."""
    rows = [ph for ph in phases if ph.get("stages")]
    if not rows:
        return ["(no plan breakdowns: the planner's store was not readable)"]
    head = "| stage | " + " | ".join(f"{ph['mbps']:g} Mbit/s ({ph['plan']}) predicted / measured ms" for ph in rows) + " |"
    lines = [head, "|---|" + "---:|" * len(rows)]
    for s in STAGES:
        cells = []
        for ph in rows:
            v = ph["stages"].get(s)
            cells.append(f"{v['predicted_ms']:g} / {v['measured_ms']:g}" if v else "-")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines
