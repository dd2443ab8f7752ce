"""Open client streams per caller at the planner (ReportTelemetry): a gRPC call and a handler task each.

The mechanism is the daemon scaffold's (:class:`runtime.daemon.streams.StreamSlots`, shared with the
worker's InferStream and the planner's WatchPlan). A stream is opened before it says which agent it
reports for (its first message may come much later: an agent sends telemetry when its link moves, or at
its heartbeat), so it is counted by the caller that opened it: an authenticated agent (certificate or
token) is one agent, and holds at most TELEMETRY_STREAMS_PER_AGENT streams: a newer one ends its oldest
RESOURCE_EXHAUSTED (a reconnecting agent's half-open stream is the usual oldest, so the agent is never
locked out). Other callers (operators, anonymous callers of a loopback planner: a fleet simulator holds
thousands of agents under one lease) count only towards the total; beyond it a new stream is refused at once.
"""

from __future__ import annotations

from collections.abc import Callable

from runtime.daemon.streams import StreamSlots
from runtime.wire.security import AGENT

TELEMETRY_STREAMS_PER_AGENT = 4  # an authenticated agent's open ReportTelemetry streams
TELEMETRY_STREAMS_PER_AGENT_SLOT = 2  # ... and beyond those of every agent: total = max_agents x this + this many
TELEMETRY_STREAMS_SPARE = 1024  # ... (operators, tools, a loopback fleet)

__all__ = ["StreamSlots", "telemetry_slots"]


def telemetry_slots(max_agents: int, on_shed: Callable[[str], None] | None = None) -> StreamSlots:
    """The planner's ReportTelemetry streams: TELEMETRY_STREAMS_PER_AGENT per authenticated agent, and in all
    ``max_agents`` x TELEMETRY_STREAMS_PER_AGENT_SLOT + TELEMETRY_STREAMS_SPARE; ``on_shed`` is told each end
    or refusal (a metric)."""
    return StreamSlots("telemetry", TELEMETRY_STREAMS_PER_AGENT,
                       max_agents * TELEMETRY_STREAMS_PER_AGENT_SLOT + TELEMETRY_STREAMS_SPARE, roles=(AGENT,),
                       where="the planner", per_caller_hint="; run one agent process per identity", on_shed=on_shed)
