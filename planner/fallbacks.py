"""Fallback plans keyed by bandwidth band (issue 11): the agent must not wait for the planner when
its link collapses (or comes back).

With each plan the planner ranks the agent's configurations again at bandwidths around the measured
one (``GRID``: x1/256 .. x16, one octave apart) on one link, ``band_worker``: the plan's worker, or
under a local plan the candidate worker with the fastest measured link. Neighbouring grid points
with the same best configuration form one band; a band ends halfway (geometrically) between two
grid points whose best configurations differ; the first band starts at 0, the last has no upper
bound. The table goes out in the plan (``Plan.fallbacks``); the agent switches by itself when its
measured bandwidth to that worker leaves the running plan's band (runtime.agent.fallbacks), and the
planner confirms or refines with a newer plan once the telemetry shows the new bandwidth.

Every other figure (RTT, the device's speed, constraints, the other workers) is the planner's
current one; only the bandwidth of ``band_worker``'s link varies. Unknown links get no table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from planner import decide
from planner.state import AgentState, PlannerState
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

# RePlanner.rank(st, top_n, bandwidth=..., record=...) -> (ranked, seconds, current)
Rank = Callable[..., Awaitable[Any]]
K = TypeVar("K")  # a configuration's key
R = TypeVar("R")  # a ranked configuration

GRID = tuple(2.0 ** k for k in range(-8, 5))  # bandwidth factors around the measured one, ascending
MAX_BANDS = len(GRID)  # at most one band per grid point


def band_worker(state: PlannerState, st: AgentState, plan: pb.Plan) -> tuple[str, float]:
    """(worker id, measured bandwidth) of the link the table is keyed on; ("", 0) when none is measured."""
    if plan.worker_id:
        lk = state.measured_link(st, plan.worker_id)
        return (plan.worker_id, lk.bandwidth_bytes_per_second) if lk and lk.bandwidth_bytes_per_second > 0 else ("", 0.0)
    best = ("", 0.0)
    for c in state.candidates(st):
        lk = state.measured_link(st, c.worker_id)
        if lk is not None and lk.bandwidth_bytes_per_second > best[1]:
            best = (c.worker_id, lk.bandwidth_bytes_per_second)
    return best


async def attach(state: PlannerState, rank: Rank, st: AgentState, plan: pb.Plan) -> float:
    """Fill ``plan.fallbacks`` and ``plan.band_worker_address`` (left empty when no link is measured);
    ``rank`` ranks as RePlanner.rank does. Returns the bandwidth the grid was ranked around (0: none)."""
    wid, measured = band_worker(state, st, plan)
    if not wid or wid not in state.workers:
        return 0.0
    record = dataclasses.replace(st.record, workers=(wid,))  # only this worker (and the board)
    points = []
    for factor in GRID:
        bw = measured * factor
        ranked, _, _ = await rank(st, 1, bandwidth=bw, record=record)
        if ranked:
            points.append((bw, decide.config_key(st.device, ranked[0]), ranked[0]))
    bands = _bands(points)
    for lo, hi, r in bands[:MAX_BANDS]:
        entry = lean(decide.to_plan(st.record, st.device, r, ""))
        plan.fallbacks.append(pb.BandPlan(min_bandwidth_bytes_per_second=lo, max_bandwidth_bytes_per_second=hi,
                                          plan=entry))
    plan.band_worker_address = state.workers[wid].record.address
    return measured


def lean(entry: pb.Plan) -> pb.Plan:
    """A table entry without what its plan already says (agent and model ids) or its band does (a
    reason naming the band), nor figures only the running plan reports (creation time, fps):
    what the agent switches to (split, codec, TL, worker, route) and its prediction (seconds, their
    breakdown, and the bytes per frame they price: a uint64, at most 10 bytes per entry on the wire,
    with which the agent re-costs the entry's transfer, runtime.agent.prediction). Every plan the
    planner holds carries its table: 13 full entries were 13.6 KB of a plan's 15.2 KB in memory
    (10,000 plans), lean ones 9.3 KB (and 2.9 KB instead of 4.0 KB serialized), before the bytes."""
    for name in ("agent_id", "model_id", "reason", "created_unix", "predicted_fps"):
        entry.ClearField(name)
    return entry


def _bands(points: Sequence[tuple[float, K, R]]) -> list[tuple[float, float, R]]:
    """[(min, max, ranked)] from ascending (bandwidth, key, ranked) points; max 0 = no upper bound."""
    starts: list[tuple[float, K, R]] = []  # each band's (min, key, ranked); its max is the next one's min
    for i, (bw, key, r) in enumerate(points):
        if starts and starts[-1][1] == key:
            continue
        starts.append((0.0 if i == 0 else math.sqrt(points[i - 1][0] * bw), key, r))
    return [(lo, starts[j + 1][0] if j + 1 < len(starts) else 0.0, r) for j, (lo, _, r) in enumerate(starts)]
