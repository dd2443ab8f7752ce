"""Prometheus metrics of the planner (one registry per server instance; no agent ids as labels)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from runtime.daemon.metrics_http import ERROR_CODES
from runtime.daemon.streams import SHED_REASONS as STREAM_SHED_REASONS

# A decision on a small profile takes tens of microseconds; a 600-block one, tens of milliseconds.
DECISION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Telemetry delay (planner clock - agent's sent_unix) and age: sub-second to minutes.
AGE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# From telemetry needing a decision to that decision made (queueing included); the fleet target is 100 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
SHED_REASONS = ("full", "stale")  # refused: the decision queue is full; dropped: sent too long ago
CACHE_RESULTS = ("hit", "miss")

PLAN_REASONS = ("registration", "telemetry", "compute", "infeasible", "worker", "refusal", "restart")
STREAMS = ("telemetry", "WatchPlan")  # the planner's long-lived streams under runtime.daemon.streams limits
COMPUTE_OUTCOMES = ("used", "ignored")  # a device compute sample from telemetry was smoothed in, or implausible


class PlannerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.agents = Gauge("edgesplit_planner_agents", "Registered agents", registry=r)
        self.workers = Gauge("edgesplit_planner_workers", "Registered workers", registry=r)
        self.watchers = Gauge("edgesplit_planner_watchers", "Open WatchPlan streams", registry=r)
        self.streams_shed = Counter("edgesplit_planner_streams_shed", "Long-lived streams ended or refused by the stream "
                                    "limits (runtime.daemon.streams), by stream (telemetry, WatchPlan) and reason "
                                    "(oldest_ended: a caller's newer stream took its place; total_refused: the "
                                    "planner held its total)", ["stream", "reason"], registry=r)
        self.plan_changes = Counter("edgesplit_planner_plan_changes", "Plans issued, by what caused them",
                                    ["reason"], registry=r)
        self.decision_seconds = Histogram("edgesplit_planner_decision_seconds",
                                          "Time to rank the configurations for one agent", buckets=DECISION_BUCKETS,
                                          registry=r)
        self.telemetry = Counter("edgesplit_planner_telemetry_messages", "Telemetry messages received", registry=r)
        self.telemetry_unknown_worker = Counter("edgesplit_planner_telemetry_unknown_worker",
                                                "Telemetry whose worker is not registered (its link is ignored)",
                                                registry=r)
        self.telemetry_delay_seconds = Histogram("edgesplit_planner_telemetry_delay_seconds",
                                                 "Planner receive time minus the agent's send time",
                                                 buckets=AGE_BUCKETS, registry=r)
        self.telemetry_age_seconds = Gauge("edgesplit_planner_telemetry_max_age_seconds",
                                           "Age of the stalest link estimate among connected agents (an open "
                                           "WatchPlan stream) that sent telemetry",
                                           registry=r)
        # Per-agent slowdown factors would need agent ids as labels; the largest one is what an alert needs
        # (a plan it causes gives the agent's factor in its reason).
        self.device_slowdown_max = Gauge("edgesplit_planner_device_slowdown_max_ratio",
                                         "Largest smoothed device slowdown factor among agents (measured / profiled "
                                         "device compute; 1 = as profiled)", registry=r)
        self.worker_slowdown_max = Gauge("edgesplit_planner_worker_slowdown_max_ratio",
                                         "Largest worker tail slowdown factor decisions use, among agents and their "
                                         "workers (measured / profiled worker compute; 1 = as profiled)", registry=r)
        self.compute_samples = Counter("edgesplit_planner_compute_samples",
                                       "Device compute samples from telemetry, by outcome (ignored: implausible ratio)",
                                       ["outcome"], registry=r)
        # a fleet (issue 15): the decision queue, what it coalesced and shed, and the shared caches
        self.telemetry_coalesced = Counter("edgesplit_planner_telemetry_coalesced",
                                           "Telemetry reports merged into a decision already queued or running for "
                                           "their agent (the latest estimate wins)", registry=r)
        self.telemetry_shed = Counter("edgesplit_planner_telemetry_shed",
                                      "Telemetry reports not acted on, by reason (full: refused RESOURCE_EXHAUSTED "
                                      "with retry-after-ms; stale: sent longer than telemetry_max_age_seconds ago)",
                                      ["reason"], registry=r)
        self.telemetry_in_band = Counter("edgesplit_planner_telemetry_in_band",
                                         "Telemetry reports recorded without a decision: the link stayed in the running "
                                         "plan's band", registry=r)
        self.telemetry_pending = Gauge("edgesplit_planner_telemetry_pending",
                                       "Agents whose telemetry waits for (or is in) a decision", registry=r)
        self.decision_latency_seconds = Histogram("edgesplit_planner_decision_latency_seconds",
                                                  "From a telemetry report that needs a decision to the decision "
                                                  "made (queueing included)", buckets=LATENCY_BUCKETS, registry=r)
        self.rank_cache = Counter("edgesplit_planner_rank_cache_lookups",
                                  "Rankings looked up in the shared cache, by result (hit, miss)", ["result"], registry=r)
        self.profile_cache = Counter("edgesplit_planner_profile_cache_lookups",
                                     "Profile documents looked up by content hash, by result (miss: parsed and checked)",
                                     ["result"], registry=r)
        self.refusals = Counter("edgesplit_planner_refusals", "Plans an agent refused", registry=r)
        self.errors = Counter("edgesplit_planner_errors", "Calls refused, by gRPC status code", ["code"], registry=r)
        for reason in PLAN_REASONS:
            self.plan_changes.labels(reason)
        for outcome in COMPUTE_OUTCOMES:
            self.compute_samples.labels(outcome)
        for reason in SHED_REASONS:
            self.telemetry_shed.labels(reason)
        for result in CACHE_RESULTS:
            self.rank_cache.labels(result)
            self.profile_cache.labels(result)
        for code in ERROR_CODES:
            self.errors.labels(code)
        for stream in STREAMS:
            for why in STREAM_SHED_REASONS:
                self.streams_shed.labels(stream, why)
        self.device_slowdown_max.set(1.0)
        self.worker_slowdown_max.set(1.0)

    def on_stream_shed(self, stream: str) -> Callable[[str], None]:
        """A :class:`runtime.daemon.streams.StreamSlots` ``on_shed`` that counts ``stream``'s ends and refusals."""
        return lambda reason: self.streams_shed.labels(stream, reason).inc()
