"""The planner's parallel stages (RFS/DPFP) for the plans it pushes.

When the re-planner issues a plan for an agent, :meth:`ParallelPlanner.attach` considers running
the model's tileable range over several workers instead: the workers the agent may use that hold
a profile of its model (at least ``min_workers``) and whose link from the agent is known
(:meth:`PlannerState.link`: measured, or the configured assumption; a worker without a bandwidth
is left out, as for any offload). DPFP (:mod:`planner.dpfp`) plans the stage on those links (one
link shared by the workers, the slowest of them: the agent's own uplink carries every tile), and
the whole frame is predicted as the device's head up to the stage + the stage + the device's tail
after it (the agent runs both). When that beats the plan's own prediction by ``min_gain``, the
stage goes into ``Plan.parallel`` (with the prediction in its blocks) and the plan's
``predicted_seconds`` becomes the parallel prediction; otherwise the plan is left as it is.

The model's receptive geometry is taken once per model (the model is loaded for it and dropped;
at most ``max_models`` geometries are kept) in the caller's executor: this module does nothing on
the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from planner import parallel_plan as PP
from runtime.contracts.costmodel import Link
from runtime.contracts.errors import EdgesplitError
from runtime.contracts.profile import Profile
from runtime.parallel.plan import ParallelStage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """A worker a parallel stage may use: id, address, its profile of the model, the agent's link to it."""

    worker_id: str
    address: str
    profile: Profile
    link: Link


@dataclass(frozen=True)
class Proposal:
    stage: ParallelStage  # worker addresses; shares per worker
    seconds: float  # the whole frame: device head + stage + device tail
    stage_seconds: float


def device_seconds(device: Profile, first: int, end: int) -> float:
    """The device's compute from split ``first`` to split ``end`` (profile block j runs split j -> j+1)."""
    return sum(b.seconds for b in device.blocks[first:end])


class ParallelPlanner:
    """Owns the geometry cache; proposes and attaches parallel stages."""

    def __init__(self, min_workers: int = 2, min_gain: float = 0.1, max_models: int = 4, codec: str = "raw"):
        self.min_workers = min_workers  # fewer candidate workers: no parallel stage
        self.min_gain = min_gain  # the stage must beat the plan's prediction by this fraction
        self.max_models = max_models  # geometries kept (each is small; taking one loads the model once)
        self.codec = codec  # codec of crops and tiles (raw: exact)
        self._geometry: OrderedDict[str, PP.Geometry | None] = OrderedDict()  # None: the model cannot be tiled

    def geometry(self, model: str) -> PP.Geometry | None:
        if model in self._geometry:
            self._geometry.move_to_end(model)
            return self._geometry[model]
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
                          codec=self.codec, geom=g)
        stage = prop.stage
        if sum(1 for s in stage.blocks[0].shares if s > 0) < 2 and all(
                sum(1 for s in b.shares if s > 0) < 2 for b in stage.blocks):
            return None  # DPFP keeps it on one worker: that is an ordinary offload, the search's business
        end = g.first + len(g.geometries)
        head = device_seconds(device, 0, g.first)
        tail = device_seconds(device, end, device.n_blocks)
        return Proposal(stage, head + stage.predicted_seconds + tail, stage.predicted_seconds)

    async def consider(self, state, st, plan, executor) -> bool:
        """The re-planner's hook: the candidate workers of agent ``st`` (on the loop), then DPFP and
        :meth:`attach` in ``executor``. Never raises for an unplannable stage (the plan stays as it is)."""
        cands = candidates(state, st)
        if len(cands) < self.min_workers:
            return False
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, self.attach, plan, st.device, cands)
        except Exception:  # a bug here must not stop the plan from being issued
            logger.exception("agent %s: parallel stage not considered", plan.agent_id)
            return False

    def attach(self, plan, device: Profile, candidates: Sequence[Candidate]) -> bool:
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
        plan.reason = (f"{plan.reason}; parallel stage over {len(candidates)} workers predicted "
                       f"{prop.seconds * 1e3:.1f} ms (was {current * 1e3:.1f} ms)")
        plan.predicted_seconds = prop.seconds
        logger.info("agent %s: parallel stage %s over %s, %.1f ms predicted (plan alone %.1f ms)", plan.agent_id,
                    " | ".join(f"{b.start}..{b.end}" for b in prop.stage.blocks), ", ".join(prop.stage.workers),
                    prop.seconds * 1e3, current * 1e3)
        return True


def candidates(state, st) -> list[Candidate]:
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
        if lk is None or lk.bandwidth_bytes_per_second <= 0:
            continue
        out.append(Candidate(wid, w.record.address, prof, Link(max(lk.rtt_seconds, 0.0), lk.bandwidth_bytes_per_second)))
    return out
