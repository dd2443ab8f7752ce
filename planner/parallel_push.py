"""The planner's parallel stages (RFS/DPFP) for the plans it pushes.

When the re-planner issues a plan for an agent, :meth:`ParallelPlanner.attach` considers running
the model's tileable range over several workers instead: the workers the agent may use that hold
a profile of its model (at least ``min_workers``) and whose link from the agent is known
(:meth:`PlannerState.link`: measured, or the configured assumption; a worker without a bandwidth
is left out, as for any offload). DPFP (:mod:`planner.dpfp`) plans the stage on those links (one
link shared by the workers, the slowest of them: the agent's own uplink carries every tile), and
the whole frame is predicted as the device's head up to the stage + the stage + the rest after it.
The rest runs where it is predicted fastest: on the device, or on a candidate worker whose link the
agent measured (an assumed link is never priced for it) as its RTT + the map at the stage's end
(in the stage's codec) and the model's output over its bandwidth + its profile's blocks after the
stage (:func:`tail_on_worker`); such a worker goes into ``ParallelStage.tail_worker_id/_address``
and the agent sends it the stitched map (and runs the rest itself if it fails). When that beats the plan's own prediction by ``min_gain``, the
stage goes into ``Plan.parallel`` (with the prediction in its blocks) and the plan's
``predicted_seconds`` becomes the parallel prediction; otherwise the plan is left as it is.

A plan is reconsidered when the workers the agent may use change while its configuration stays
the same (a second worker registers, one leaves, the agent's link to one becomes measured or expires:
only then may it run the rest): :meth:`ParallelPlanner.changed` remembers the
candidate set each plan was considered with; on a change it says to issue the plan again when the
plan has a stage (its workers changed) or when a trial on a copy of the plan would attach one.

Tiles are priced as ``edgesplit plan --parallel-tile-factors`` prices them when the planner was given
the model's tile-compute factors (``--parallel-tile-factors FILE``, one file per model, measured by
``python -m runtime.tools.dpfp_tilecal`` inside a worker's quota; :func:`planner.dpfp_factors.load_many`
checks them at start-up); a model without a file is priced by area.

With ``--parallel-halo`` (``PlannerConfig.parallel_halo``, and ``--parallel-halo-round-ms``) DPFP may
choose, per block boundary, to keep the map on the workers and exchange halos between them, as
``edgesplit plan --parallel-halo`` does; such blocks carry ``ParallelBlock.halo_input``. The agent's
workers must list one another with ``--halo-peer`` (else a halo tile is refused and the agent runs
the frame with gather and scatter), and an agent started with ``--no-parallel-halo`` never uses it.

The model's receptive geometry is taken once per model (the model is loaded for it and dropped;
at most ``max_models`` geometries are kept) in the caller's executor: this module does nothing on
the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from planner import parallel_plan as PP
from planner.dpfp_factors import TileFactors
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import EdgesplitError
from runtime.contracts.profile import Profile
from runtime.parallel.plan import ParallelStage

if TYPE_CHECKING:  # annotations only: planner.state imports the re-planner's hooks
    from concurrent.futures import Executor

    from planner.state import AgentState, PlannerState
    from runtime.proto.edgesplit.v1 import planner_pb2 as pb

logger = logging.getLogger(__name__)

MAX_REMEMBERED = 200_000
"""Agents whose last considered worker set is remembered (the oldest forgotten first: such an agent's
next decision runs one trial DPFP, then it is remembered again)."""


@dataclass(frozen=True)
class Candidate:
    """A worker a parallel stage may use: id, address, its profile of the model, the agent's link to it
    (measured, or the planner's assumption), and that link as measured (None: not measured; such a worker
    never runs the rest of the model after the stage)."""

    worker_id: str
    address: str
    profile: Profile
    link: Link
    measured: Link | None = None


@dataclass(frozen=True)
class Proposal:
    stage: ParallelStage  # worker addresses; shares per worker; tail_worker: who runs the rest ("": the device)
    seconds: float  # the whole frame: device head + stage + tail (head_seconds + stage_seconds + tail_seconds)
    stage_seconds: float
    head_seconds: float = 0.0  # the device up to the stage
    tail_seconds: float = 0.0  # the rest after the stage: on the device, or on tail_worker with its transfers
    tail_worker: Candidate | None = None  # the worker that runs the rest (None: the device)


def tail_on_worker(device: Profile, c: Candidate, end: int, bytes_per_element: int) -> float | None:
    """The rest of the model from split ``end`` on candidate ``c``: its measured RTT + the map at ``end``
    (encoded at ``bytes_per_element``) and the model's output (fp32) over its measured bandwidth + its
    profile's blocks ``end``..n. None when it cannot be priced: no measured link (never assumed fast), a
    profile of other blocks than the device's, or no map size at ``end`` in the device's profile."""
    lk, n = c.measured, device.n_blocks
    if lk is None or lk.rtt_seconds <= 0 or c.profile.n_blocks != n or not 0 < end < n:
        return None
    map_bytes = device.blocks[end - 1].output_bytes * bytes_per_element // 4
    result_bytes = device.blocks[n - 1].output_bytes
    if map_bytes <= 0 or result_bytes <= 0:
        return None
    return (lk.rtt_seconds + (map_bytes + result_bytes) / lk.bandwidth_bytes_per_second
            + device_seconds(c.profile, end, n))


def device_seconds(device: Profile, first: int, end: int) -> float:
    """The device's compute from split ``first`` to split ``end`` (profile block j runs split j -> j+1)."""
    return sum(b.seconds for b in device.blocks[first:end])


class ParallelPlanner:
    """Owns the geometry cache; proposes and attaches parallel stages."""

    def __init__(self, min_workers: int = 2, min_gain: float = 0.1, max_models: int = 4, codec: str = "raw",
                 tile_factors: Mapping[str, TileFactors] | None = None, halo: bool = False,
                 halo_round_seconds: float = 0.0):
        self.min_workers = min_workers  # fewer candidate workers: no parallel stage
        self.min_gain = min_gain  # the stage must beat the plan's prediction by this fraction
        self.max_models = max_models  # geometries kept (each is small; taking one loads the model once)
        self.codec = codec  # codec of crops and tiles (raw: exact)
        self.tile_factors = dict(tile_factors or {})  # model -> measured tile-compute factors (none: by area)
        self.halo = halo  # may blocks take their input by halo exchange between workers (edgesplit plan --parallel-halo)
        self.halo_round_seconds = halo_round_seconds  # a fetch round's fixed cost (--parallel-halo-round-ms; 0: not costed)
        self._geometry: OrderedDict[str, PP.Geometry | None] = OrderedDict()  # None: the model cannot be tiled
        self._seen: OrderedDict[str, Hashable] = OrderedDict()  # agent id -> workers its plan was considered with

    def _remember(self, agent_id: str, cands: Sequence[Candidate]) -> bool:
        """Record the candidate set of ``agent_id``'s plan; True when it differs from the one remembered."""
        key = tuple((c.worker_id, c.address, c.measured is not None) for c in cands)  # measured: may run the rest
        old = self._seen.pop(agent_id, None)
        self._seen[agent_id] = key
        while len(self._seen) > MAX_REMEMBERED:
            self._seen.popitem(last=False)
        return old != key

    async def changed(self, state: PlannerState, st: AgentState, executor: Executor) -> bool:
        """The re-planner's hook for an agent whose configuration stays: True when its plan should be
        issued again because the workers it may use changed since the plan was considered (the plan has
        a stage, or a trial :meth:`attach` on a copy of it would add one). Never raises."""
        plan = st.plan
        cands = candidates(state, st)
        if plan is None or not self._remember(st.record.id, cands):
            return False
        if plan.parallel.blocks:
            logger.info("agent %s: the workers it may use changed; its parallel stage is planned again", plan.agent_id)
            return True
        if len(cands) < self.min_workers:
            return False
        trial = type(plan)()
        trial.CopyFrom(plan)
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, self.attach, trial, st.device, cands)
        except Exception:
            logger.exception("agent %s: parallel stage not reconsidered", plan.agent_id)
            return False

    def geometry(self, model: str) -> PP.Geometry | None:
        if model in self._geometry:
            self._geometry.move_to_end(model)
            return self._geometry[model]
        from runtime.models import list_models

        if model not in list_models():
            # a name from the wire (profiles): only a bundled model is ever loaded here. runtime.models.get_spec reads
            # 'file.py:factory' and '.pt2' names as files to import or unpickle: never on the planner's host
            logger.info("model %.128r is no bundled model: the planner takes no geometry of it (no parallel stage)", model)
            self._geometry[model] = None
            while len(self._geometry) > self.max_models:
                self._geometry.popitem(last=False)
            return None
        try:
            g: PP.Geometry | None = PP.geometry(model)
        except EdgesplitError as e:
            logger.info("model %s has no tileable range for a parallel stage: %s", model, e)
            g = None
        self._geometry[model] = g
        while len(self._geometry) > self.max_models:
            self._geometry.popitem(last=False)
        return g

    def propose(self, device: Profile, candidates: Sequence[Candidate]) -> Proposal | None:
        """DPFP over ``candidates`` for ``device``'s model, or None (too few workers, not tileable)."""
        if len(candidates) < self.min_workers:
            return None
        g = self.geometry(device.model)
        if g is None:
            return None
        rtt = max(c.link.rtt_seconds for c in candidates)
        bw = min(c.link.bandwidth_bytes_per_second for c in candidates)
        prop = PP.propose([c.profile for c in candidates], Link(rtt, bw), workers=[c.address for c in candidates],
                          codec=self.codec, geom=g, tile_factors=self.tile_factors.get(device.model), halo=self.halo,
                          halo_round_seconds=self.halo_round_seconds)
        stage = prop.stage
        if sum(1 for s in stage.blocks[0].shares if s > 0) < 2 and all(
                sum(1 for s in b.shares if s > 0) < 2 for b in stage.blocks):
            return None  # DPFP keeps it on one worker: that is an ordinary offload, the search's business
        end = g.first + len(g.geometries)
        head = device_seconds(device, 0, g.first)
        tail, where = device_seconds(device, end, device.n_blocks), None
        per_element = PP.BYTES_PER_ELEMENT.get(self.codec.split("+")[0], 4)
        for c in candidates:  # the rest on a worker when that is faster than on the device, transfers included
            t = tail_on_worker(device, c, end, per_element)
            if t is not None and t < tail:
                tail, where = t, c
        if where is not None:
            stage = replace(stage, tail_worker=where.address, tail_worker_id=where.worker_id)
        return Proposal(stage, head + stage.predicted_seconds + tail, stage.predicted_seconds, head, tail, where)

    async def consider(self, state: PlannerState, st: AgentState, plan: pb.Plan, executor: Executor) -> bool:
        """The re-planner's hook: the candidate workers of agent ``st`` (on the loop), then DPFP and
        :meth:`attach` in ``executor``. Never raises for an unplannable stage (the plan stays as it is)."""
        cands = candidates(state, st)
        self._remember(st.record.id, cands)
        if len(cands) < self.min_workers:
            return False
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, self.attach, plan, st.device, cands)
        except Exception:  # a bug here must not stop the plan from being issued
            logger.exception("agent %s: parallel stage not considered", plan.agent_id)
            return False

    def attach(self, plan: pb.Plan, device: Profile, candidates: Sequence[Candidate]) -> bool:
        """Fill ``plan.parallel`` (a ``planner_pb2.Plan``) when the parallel stage is predicted faster
        than ``plan.predicted_seconds`` by ``min_gain``; True if it did."""
        try:
            prop = self.propose(device, candidates)
        except EdgesplitError as e:
            logger.warning("agent %s: no parallel stage: %s", plan.agent_id, e)
            return False
        if prop is None:
            return False
        current = plan.predicted_seconds
        if current > 0 and prop.seconds > current * (1 - self.min_gain):
            logger.debug("agent %s: parallel stage %.1f ms vs plan %.1f ms: not attached", plan.agent_id,
                         prop.seconds * 1e3, current * 1e3)
            return False
        prop.stage.to_proto(plan.parallel)
        del plan.parallel.worker_ids[:]
        plan.parallel.worker_ids.extend(c.worker_id for c in candidates)
        rest = f", the rest on {prop.tail_worker.worker_id}" if prop.tail_worker is not None else ""
        plan.reason = (f"{plan.reason}; parallel stage over {len(candidates)} workers{rest} predicted "
                       f"{prop.seconds * 1e3:.1f} ms (was {current * 1e3:.1f} ms)")
        plan.predicted_seconds = prop.seconds
        logger.info("agent %s: parallel stage %s over %s, %.1f ms predicted (plan alone %.1f ms)", plan.agent_id,
                    " | ".join(f"{b.start}..{b.end}" for b in prop.stage.blocks), ", ".join(prop.stage.workers),
                    prop.seconds * 1e3, current * 1e3)
        return True


def candidates(state: PlannerState, st: AgentState) -> list[Candidate]:
    """The workers agent ``st`` may use that hold a profile of its model, with a known link (``state``:
    a ``planner.state.PlannerState``, ``st`` its ``AgentState``)."""
    rec = st.record
    c = rec.constraints
    out = []
    for wid, w in sorted(state.workers.items()):
        allowed = ((not rec.workers or wid in rec.workers) and wid not in c.exclude_workers
                   and (not c.include_workers or wid in c.include_workers))
        prof = w.profiles.get(rec.model)
        lk = state.link(st, wid) if allowed and prof is not None else None
        if lk is None or prof is None or lk.bandwidth_bytes_per_second <= 0:
            continue
        m = state.measured_link(st, wid)
        measured = (Link(m.rtt_seconds, m.bandwidth_bytes_per_second)
                    if m is not None and m.rtt_seconds > 0 and m.bandwidth_bytes_per_second > 0 else None)
        out.append(Candidate(wid, w.record.address, prof, Link(max(lk.rtt_seconds, 0.0), lk.bandwidth_bytes_per_second),
                             measured))
    return out
