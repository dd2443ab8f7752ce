"""Prometheus metrics of the device agent (one registry per agent instance)."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

from runtime.daemon.metrics_http import ERROR_CODES, STAGE_BUCKETS
from runtime.wire.crl import register_metrics as register_crl_metrics

STAGES = ("board_queue", "head", "tl_encode", "encode", "board_return", "transfer_edge", "local_tail", "refine",
          "total")  # label values of stage_seconds
WHERE = ("edge", "local")  # label values of frames
# label values of fallbacks (reason_label): deadline, refused and unavailable are
# failures of the edge; given_up: frames the agent gave up when it left a collapsed link (EdgeStream.give_up);
# local_plan (the plan runs every layer here) and no_worker are planned local runs
FALLBACK_REASONS = ("deadline", "given_up", "refused", "unavailable", "local_plan", "no_worker")


class StageHistogram:
    """One stage's series of ``edgesplit_agent_stage_seconds``: bucket counts and a sum, kept by the event loop
    with no lock (one writer) and read at scrape time by :class:`StageHistograms`. prometheus_client's observe
    took two locked increments and a Python loop over the buckets, five stages a frame (issue 14)."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds  # ascending, +Inf last
        self.counts = [0] * len(bounds)  # per bucket, not cumulative
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # the first bucket with seconds <= its bound, as Histogram
        self.sum += seconds


class StageHistograms:
    """``edgesplit_agent_stage_seconds{stage}``, a histogram per stage with the buckets ``buckets`` (+Inf added):
    the samples prometheus_client's Histogram writes (``_bucket``, ``_count``, ``_sum``, ``_created``)."""

    name = "edgesplit_agent_stage_seconds"
    documentation = "Per-frame time by stage"

    def __init__(self, stages: tuple[str, ...], buckets: tuple[float, ...], registry: CollectorRegistry):
        bounds = (*sorted(buckets), float("inf"))
        self.les = [floatToGoString(b) for b in bounds]  # the ``le`` labels, as prometheus_client writes them
        self.by_stage = {stage: StageHistogram(bounds) for stage in stages}
        registry.register(self)

    def describe(self) -> list[Any]:
        return []  # collected at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily

        fam = HistogramMetricFamily(self.name, self.documentation, labels=["stage"])
        for stage, h in self.by_stage.items():
            counts, total = list(h.counts), h.sum  # one reading (the loop may add a frame meanwhile)
            cumulative, buckets = 0, []
            for le, n in zip(self.les, counts, strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            fam.add_metric([stage], buckets, total)
            fam.add_sample(f"{self.name}_created", {"stage": stage}, h.created)
        yield fam


class LoopCounter:
    """An unlabelled counter the event loop adds to with no lock (one writer), written at scrape time as
    prometheus_client's Counter writes it (``NAME_total``, ``NAME_created``): two of them a frame took a
    locked increment and three Python calls each (issue 14)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.value = 0.0
        self.created = time.time()
        registry.register(self)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def describe(self) -> list[Any]:
        return []  # collected at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily(self.name, self.documentation, value=self.value, created=self.created)


class LabelledLoopCounter:
    """A counter with one label whose series the event loop adds to with no lock (one writer), written at scrape
    time as prometheus_client's labelled Counter writes them (``NAME_total{LABEL}``, ``NAME_created{LABEL}``):
    ``labels(value)`` gives a series' :class:`LoopCounter`-like handle, as prometheus_client's does. Series exist
    from the start for ``values``; others are added when first named (issue 14: a frame's ``frames`` increment
    took a locked update)."""

    def __init__(self, name: str, documentation: str, label: str, values: tuple[str, ...], registry: CollectorRegistry):
        self.name, self.documentation, self.label = name, documentation, label
        self.series: dict[str, _Series] = {value: _Series() for value in values}
        registry.register(self)

    def labels(self, value: str) -> _Series:
        series = self.series.get(value)
        if series is None:
            series = self.series[value] = _Series()
        return series

    def describe(self) -> list[Any]:
        return []  # collected at scrape time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, series in list(self.series.items()):
            fam.add_metric([value], series.value, created=series.created)
        yield fam


class _Series:
    """One series of a :class:`LabelledLoopCounter`."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


def reason_label(reason: str) -> str:
    """Bounded label values for the fallback counter (moved here from runtime.agent.client, next to its values)."""
    for prefix, label in (("deadline", "deadline"), ("given up", "given_up"), ("worker refused", "refused"),
                          ("worker unavailable", "unavailable"), ("plan runs", "local_plan")):
        if reason.startswith(prefix):
            return label
    return "no_worker"


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        register_crl_metrics(r)  # edgesplit_server_certificate_refused_total (runtime.wire.crl)
        self.frames = LabelledLoopCounter("edgesplit_agent_frames", "Frames with a result, by where they ran", "where",
                                          WHERE, r)
        self.fallbacks = Counter("edgesplit_agent_fallbacks", "Frames run locally instead of on the edge", ["reason"], registry=r)
        self.refined = Counter("edgesplit_agent_refined_frames", "Edge results too close to call (top-1 margin below "
                               "refine_margin) whose tail was re-run on the board", registry=r)
        self.stage_seconds = StageHistograms(STAGES, STAGE_BUCKETS, r)  # per stage: stage_by
        self.sent_bytes = LoopCounter("edgesplit_agent_sent_bytes", "Payload bytes sent to the worker", r)
        self.raw_bytes = LoopCounter("edgesplit_agent_raw_bytes", "Bytes of the split's output as the head computed it "
                                     "(before a Transfer Layer and the codec), of the same frames as sent_bytes: "
                                     "raw / sent is the compression ratio", r)
        self.inflight = Gauge("edgesplit_agent_inflight_frames", "Frames sent and not yet answered", registry=r)
        self.inflight_frames = 0  # kept by the event loop (runtime.agent.edge), read by the gauge at scrape time
        self.inflight.set_function(lambda: self.inflight_frames)
        self.stream_up = Gauge("edgesplit_agent_stream_up", "1 while a stream to the worker is open", registry=r)
        self.reconnects = Counter("edgesplit_agent_stream_opens", "Streams opened to the worker", registry=r)
        # the idle stream probes' echoes (runtime.wire.stream EdgeStream.on_rtt): about one a second while idle
        self.stream_rtt = Histogram("edgesplit_agent_stream_rtt_seconds", "Round trips of the liveness probes on the "
                                    "frame stream to the worker, timed only while no frame was outstanding (nothing "
                                    "queued ahead of them): the link's idle RTT plus both gRPC stacks and the "
                                    "worker's stream reader", buckets=STAGE_BUCKETS, registry=r)
        self.stream_deaths = Counter("edgesplit_agent_stream_deaths", "Streams and connections that died, by endpoint "
                                     "(worker: a frame stream; planner: the planner session) and reason (no_progress: "
                                     "frames outstanding and nothing back for max(1.5 s, 1.5 x their bytes / bandwidth + "
                                     "RTT); probe_unanswered: idle and a probe unanswered for 1.5 s; keepalive, "
                                     "unavailable, error, write_failed, closed_by_peer: gRPC's own endings; "
                                     "runtime.wire.liveness)", ["endpoint", "reason"], registry=r)
        # link estimates (runtime.agent.telemetry.LinkEstimator) and the plan in effect
        self.link_bandwidth = Gauge("edgesplit_agent_link_bandwidth_bytes_per_second",
                                    "Smoothed bandwidth to the worker, from real frame transfers (0: unknown)", registry=r)
        self.link_rtt = Gauge("edgesplit_agent_link_rtt_seconds",
                              "Base round trip: the smallest of the recent probes, on a connection of their own (0: unknown)", registry=r)
        self.band_switches = Counter("edgesplit_agent_band_switches", "Plans the agent took by itself from its plan's "
                                     "fallback table (runtime.agent.fallbacks), by direction (down: a slower band)",
                                     ["direction"], registry=r)
        self.dropped_frames = Counter("edgesplit_agent_dropped_frames", "Frames of a paced source (--fps) that arrived "
                                      "while --window frames were in flight, dropped unprocessed", registry=r)
        self.probe_bytes = Counter("edgesplit_agent_probe_bytes", "Bandwidth probe payload bytes sent (runtime.agent.prober)",
                                   registry=r)
        self.plan_version = Gauge("edgesplit_agent_plan_version", "Version of the plan the agent runs now", registry=r)
        self.plan_split_index = Gauge("edgesplit_agent_plan_split_index", "Split point index of the plan in effect "
                                      "(0: the input goes to the worker; the model's last index, 'output': all on the "
                                      "board; 'edgesplit models MODEL' lists them)", registry=r)
        self.plan_switches = Counter("edgesplit_agent_plan_switches", "Plans applied (switched to)", registry=r)
        self.plan_refusals = Counter("edgesplit_agent_plan_refusals", "Plans refused, by status code of the reason",
                                     ["code"], registry=r)
        # every known series exists from the start (at 0), so rate() alerts can fire on the first event; the
        # per-frame series are kept by label value: labels() per frame took a lock and a lookup each (issue 14)
        self.frames_by = self.frames.series  # by WHERE (kept by the loop: LabelledLoopCounter)
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)
        self.stage_by = self.stage_seconds.by_stage  # every STAGE's series from the start, as the others
        for code in ERROR_CODES:
            self.plan_refusals.labels(code)
        for reason in ("no_progress", "probe_unanswered", "keepalive"):
            self.stream_deaths.labels("worker", reason)
        self.stream_deaths.labels("planner", "keepalive")

    def stream_died(self, reason: str, endpoint: str = "worker") -> None:
        """A stream or connection ended for ``reason`` (runtime.wire.stream.StreamMetrics)."""
        self.stream_deaths.labels(endpoint, reason).inc()
