"""What one telemetry report measured beside the link, taken into the agent's cost model (issue 11).

* the board's compute: the ``head`` (and ``local_tail``) stage medians against the device profile
  (:class:`planner.compute.DeviceSpeed`);
* the plan worker's compute: its ``edge_tail`` against its profile (:class:`planner.compute.WorkerSpeeds`);
* the board runtime's own time per frame, local and offloaded (:class:`planner.compute.Overhead`);
* the bytes per frame and the board's encode time per (split, codec) (:mod:`planner.wirebytes`).

Each returns True when the figures decisions use moved (the re-planner then marks the agent "compute").
Moved out of :mod:`planner.replanner`, which reads the link figures and decides.
"""

from __future__ import annotations

import logging
import time

from planner import compute
from planner.metrics import PlannerMetrics
from planner.state import AgentState, PlannerState
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

logger = logging.getLogger(__name__)


def report_plan(state: PlannerState, st: AgentState, t: pb.Telemetry, previous: pb.Plan | None) -> pb.Plan | None:
    """The plan a report was measured under: the current one, the one before it (``previous``: reports
    under it until the agent switches; no store read), or a stored one; None for version 0 (the agent's
    own split) or a version this planner never issued to the agent."""
    plan = st.plan if st.plan is not None and st.plan.version == t.plan_version else None
    if plan is None and previous is not None and previous.version == t.plan_version:
        plan = previous
    if plan is None and t.plan_version:
        stored = state.stored_plan(st.record.id, t.plan_version)
        plan = stored.plan if stored is not None else None
    return plan


def observe_compute(state: PlannerState, metrics: PlannerMetrics, st: AgentState, t: pb.Telemetry,
                    previous: pb.Plan | None) -> bool:
    """Take one report's device stage times into the agent's slowdown factor (and the plan worker's tail
    time into its factor); True when a factor decisions use moved. A report under no plan of this
    agent gives no sample."""
    plan = report_plan(state, st, t, previous)
    expired = st.tails.expire(time.time())  # a worker factor with no sample for its TTL: the profile stands again
    stages = dict(t.stage_seconds)
    stages.pop("overhead_queue", None)  # the planner's own figure (queue_sample), never the agent's word
    linked = link_overhead(state, st, t, plan)
    extra = compute.hold_extra(stages, plan.breakdown_seconds) if plan is not None and plan.worker_id else None
    if linked is not None:  # the link's measured overhead holds the worker's hold: no second term for it
        st.overhead.forget("hold")
    elif extra is not None and plan is not None and not plan.next_hops and not plan.parallel.worker_addresses:
        stages["overhead_hold"] = extra
    queue = queue_sample(stages, plan)
    if queue is not None:
        stages["overhead_queue"] = queue
    expired |= st.apply_overhead(stages)  # the runtime's own time (board: any plan; worker: the plan's one hop)
    if plan is None or plan.model_id != st.record.model:
        return expired
    tail = observe_tail(state, st, plan, t) or expired
    if linked is not None and plan.worker_id:
        tail |= st.tails.overhead(plan.worker_id, *linked)
        logger.debug("agent %s: link overhead to %s %.1f ms, %.1f ms beyond its decode and board wait", st.record.id,
                     plan.worker_id, linked[0] * 1e3, linked[3] * 1e3)
    assert st.benchmark is not None
    outcome = st.speed.observe(t.stage_seconds, st.benchmark, plan.split_index)
    if outcome is not None:
        metrics.compute_samples.labels(outcome).inc()
    if outcome != "used" or not st.apply_speed():
        return tail
    logger.debug("agent %s: device compute now %.2fx its profile", st.record.id, st.speed.factor)
    return True


def link_overhead(state: PlannerState, st: AgentState, t: pb.Telemetry,
                  plan: pb.Plan | None) -> tuple[float, int, float, float] | None:
    """The agent's measured overhead on its link to the plan's worker, as the report states it (stages
    ``link_overhead``, ``link_overhead_samples``, ``link_overhead_age``: runtime.agent.telemetry.link_overhead):
    (seconds, samples, wall-clock time of its last sample, extra), ``extra`` being what it holds beyond the parts
    the plan priced for it: the decode of the plan's transfer on that worker as profiled, and the plan's
    ``queue:board`` (planner.compute.LinkOverhead). None when the report holds none or none that is a
    measurement, the report is about another link, or the plan is not one hop to one worker with a profile."""
    s = t.stage_seconds
    if plan is None or not plan.worker_id or plan.next_hops or plan.parallel.worker_addresses or "link_overhead" not in s:
        return None
    if t.worker not in (plan.worker_id, plan.worker_address):
        return None
    seconds, samples, age = s["link_overhead"], s.get("link_overhead_samples", 0.0), s.get("link_overhead_age", 0.0)
    if not compute.plausible_overhead(seconds, samples, age):
        return None
    w = state.workers.get(plan.worker_id)
    profile = w.profiles.get(plan.model_id) if w is not None else None
    if profile is None or not 0 <= plan.split_index <= profile.n_blocks:
        return None
    decode = [x.decode_seconds for x in profile.transfers_after(plan.split_index)
              if x.codec == plan.codec and x.tl_id == plan.tl_id]
    if not decode:
        return None
    extra = seconds - decode[0] - plan.breakdown_seconds.get("queue:board", 0.0)
    return seconds, int(samples), time.time() - age, extra


def queue_sample(stages: dict[str, float], plan: pb.Plan | None) -> float | None:
    """A report's ``board_queue`` median when it was measured under a local plan (no worker): the wait of a
    local frame for the board (planner.compute.Overhead ``queue``); None under any other plan or none."""
    if plan is None or plan.worker_id or plan.parallel.worker_addresses:
        return None
    return stages.get("board_queue")


def observe_tail(state: PlannerState, st: AgentState, plan: pb.Plan, t: pb.Telemetry) -> bool:
    """Take one report's worker tail time (``edge_tail``) into the agent's factor for the plan's worker
    (planner.compute.WorkerSpeeds); True when the factor decisions use moved. Plans over several
    workers (a parallel stage) give no sample."""
    w = state.workers.get(plan.worker_id) if plan.worker_id else None
    profile = w.profiles.get(plan.model_id) if w is not None else None
    if profile is None or plan.parallel.worker_addresses:
        return False
    outcome = st.tails.observe(plan.worker_id, t.stage_seconds, profile, plan.split_index, plan.end_split_index)
    if outcome != "used" or not st.tails.apply(plan.worker_id):
        return False
    logger.debug("agent %s: worker %s tail compute now %.2fx its profile", st.record.id, plan.worker_id,
                 st.tails.applied(plan.worker_id))
    return True


def observe_wire(st: AgentState, t: pb.Telemetry, now: float) -> bool:
    """Take one report's bytes per frame and encode times (Telemetry.wire, checked) and forget figures past
    their TTL; True when the transfers decisions price moved (planner.wirebytes)."""
    st.wire.take(t, st.plan, now)
    st.wire.expire(now)
    if not st.apply_wire():
        return False
    logger.debug("agent %s: transfers priced with measured bytes: %s", st.record.id,
                 ", ".join(f"{s}:{c}{'+' + tl if tl else ''} {b:.0f} B" for (s, c, tl), (b, _) in st.wire.applied.items()))
    return True
