"""Which links an agent should probe (issue 11): the workers it may be placed on, each with what the
planner knows of the link. An unmeasured link is unknown, not fast: no plan offloads to it (see
``PlannerState.link``) until the agent has measured it, with frames or with ``Inference.Probe``."""

from __future__ import annotations

import time

from planner import decide
from planner.state import AgentState, PlannerState
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

MAX_TARGETS = 256  # workers one reply names (the first by worker id)


def probe_targets(state: PlannerState, st: AgentState) -> pb.ProbeTargetsReply:
    """Every worker ``st`` may use (allowed, included, not excluded, able to take its frames), with the
    measured bandwidth and its age (0 and 0 when unknown or older than ``link_ttl_seconds``)."""
    workers = [(w.record, w.profiles) for _, w in sorted(state.workers.items())]
    # bandwidth 1.0 overrides the link only to list workers whose link is unknown too; the figures come below
    cands = decide.candidates(st.record, st.device, workers, lambda _wid: None, 0.0, 1.0)[:MAX_TARGETS]
    reply = pb.ProbeTargetsReply(link_ttl_seconds=state.config.link_ttl_seconds)
    now = time.time()
    for c in cands:
        target = pb.ProbeTarget(worker_id=c.worker_id, address=c.address)
        lk = state.measured_link(st, c.worker_id)
        if lk is not None and lk.bandwidth_bytes_per_second > 0:
            target.bandwidth_bytes_per_second = lk.bandwidth_bytes_per_second
            target.age_seconds = max(0.0, now - lk.updated_unix)
        reply.targets.append(target)
    return reply
