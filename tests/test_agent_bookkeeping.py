"""The agent's per-frame bookkeeping, made cheaper for weak boards (issue 14), keeps what it reports:
the link gauges follow the current link when scraped, a result line's "before" figures are the ones
that stood at the time, and the stage histograms count every timed stage."""

from __future__ import annotations

from types import SimpleNamespace

from runtime.agent.metrics import STAGES, AgentMetrics
from runtime.agent.prediction import History
from runtime.agent.telemetry import LinkEstimator


def _frame(seq: int, worker: str = "w:1", nbytes: int = 100_000) -> SimpleNamespace:
    times = {"board_queue": 0.001, "head": 0.002, "encode": 0.003, "transfer_edge": 0.040, "edge_queue": 0.0,
             "edge_decode": 0.001, "edge_tail": 0.010, "edge_held": 0.012, "total": 0.050}
    return SimpleNamespace(seq=seq, times=times, where="edge", split="s1", codec="int8", worker=worker,
                           wire_bytes=nbytes, output=None)


def test_link_gauges_read_the_current_link_at_scrape_time():
    metrics = AgentMetrics()
    link = LinkEstimator(metrics)
    reg = metrics.registry
    assert reg.get_sample_value("edgesplit_agent_link_bandwidth_bytes_per_second") == 0.0  # unknown
    link.use("w:1")
    link.add_rtt_sample(0.004, "w:1")
    link.add_bandwidth_sample(2e6, "w:1")
    link.add_bandwidth_sample(9e6, "w:2")  # another link: not the one the gauges show
    assert reg.get_sample_value("edgesplit_agent_link_bandwidth_bytes_per_second") == 2e6
    assert reg.get_sample_value("edgesplit_agent_link_rtt_seconds") == 0.004
    link.use("w:2")
    assert reg.get_sample_value("edgesplit_agent_link_bandwidth_bytes_per_second") == 9e6
    assert reg.get_sample_value("edgesplit_agent_link_rtt_seconds") == 0.0  # never probed


def test_history_keeps_the_figures_as_they_stood():
    link = LinkEstimator(clock=lambda: 100.0)
    link.use("w:1")
    link.add_rtt_sample(0.004, "w:1")
    for seq in range(8):
        link.observe(_frame(seq))
    est = link.links.get("w:1")
    _, before = link.history.states[-1]
    view = before.link
    assert (view.bandwidth.value, view.bandwidth.samples) == (est.bandwidth.value, est.bandwidth.samples)
    assert (view.overhead.value, view.overhead.samples) == (est.overhead.value, est.overhead.samples)
    assert (view.unheld.value, view.unheld.samples) == (est.unheld.value, est.unheld.samples)
    assert view.tails["s1"].value == est.tails["s1"].value and view.tails["s1"].samples == 5  # past 3 start-up frames
    old = (view.bandwidth.value, view.overhead.samples, view.tails["s1"].samples, before.board.samples)
    link.observe(_frame(8, nbytes=10_000))  # later figures do not reach back into a kept state
    assert (view.bandwidth.value, view.overhead.samples, view.tails["s1"].samples, before.board.samples) == old
    assert est.overhead.samples == 6


def test_history_without_a_link_keeps_the_board():
    h = History()
    link = LinkEstimator()
    h.take(1.0, "", None, link.board)
    assert h.at(1.0).link is None and h.at(1.0).board is not link.board


def test_stage_histograms_are_the_labelled_series():
    metrics = AgentMetrics()
    assert set(metrics.stage_by) == set(STAGES) and set(metrics.frames_by) == {"edge", "local"}
    metrics.stage_by["head"].observe(0.002)
    metrics.frames_by["edge"].inc()
    reg = metrics.registry
    assert reg.get_sample_value("edgesplit_agent_stage_seconds_count", {"stage": "head"}) == 1
    assert reg.get_sample_value("edgesplit_agent_frames_total", {"where": "edge"}) == 1
    assert reg.get_sample_value("edgesplit_agent_stage_seconds_count", {"stage": "encode"}) == 0


def test_board_jobs_hand_back_results_and_errors():
    """Agent._on_board (the board thread's hand-off): a frame's result, and an exception raised on the board, reach
    the frame as run_in_executor delivered them."""
    import asyncio
    import dataclasses

    import pytest
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import InitialPlan
    from runtime.models.loader import load_model
    from runtime.wire.codec import get_codec

    loaded = load_model("digits_cnn")
    x = torch.rand(1, 3, 28, 28)

    class Broken(torch.nn.Module):
        def forward(self, h):
            raise RuntimeError("head broke on the board")

    async def main():
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")))
        try:
            r = await agent.infer(x)
            assert r.where == "local" and torch.equal(r.output, loaded.full(x))
            agent.active = dataclasses.replace(agent.active, head=Broken())
            with pytest.raises(RuntimeError, match="head broke on the board"):
                await agent.infer(x)
            agent.active = dataclasses.replace(agent.active, head=loaded.head("output"))
            assert torch.equal((await agent.infer(x)).output, loaded.full(x))  # the board thread lives on
        finally:
            await agent.close()

    asyncio.run(main())


def test_history_is_kept_only_while_a_reader_wants_it():
    """Only a planner link's result lines read the history; with it off the estimates are the same."""
    on, off = LinkEstimator(clock=lambda: 100.0), LinkEstimator(clock=lambda: 100.0)
    off.keep_history = False
    for link in (on, off):
        link.use("w:1")
        for seq in range(8):
            link.observe(_frame(seq))
    assert not off.history.states and not off.history.timings
    assert len(on.history.states) == 8 and len(on.history.timings) == 8
    a, b = on.links.get("w:1"), off.links.get("w:1")
    assert (a.bandwidth, a.overhead.value, a.unheld.value, a.tails["s1"].value) == (
        b.bandwidth, b.overhead.value, b.unheld.value, b.tails["s1"].value)
    assert on.take_report() == off.take_report()


def test_an_agent_keeps_the_history_once_a_planner_link_reads_it():
    import asyncio

    from conftest import REPO, TINY_NET
    from test_planner_chain import tiny_profile

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
    from runtime.models.loader import load_model
    from runtime.wire.codec import get_codec

    loaded = load_model(str(REPO / TINY_NET))

    async def scenario() -> None:
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")), AgentOptions(agent_id="a1"))
        try:
            assert agent.link.keep_history is False  # no reader: not kept (issue 14)
            PlannerLink(agent, PlannerLinkOptions("127.0.0.1:1", tiny_profile(loaded, "device", "board"), "a1"))
            assert agent.link.keep_history is True
        finally:
            await agent.close()

    asyncio.run(scenario())


def test_an_overheads_median_taken_when_read_is_the_windows_median():
    import random
    import statistics

    from runtime.agent.estimator import OVERHEAD_WINDOW, Overhead

    rng = random.Random(7)
    ov, xs = Overhead(), []
    for i in range(3 * OVERHEAD_WINDOW):
        x = rng.uniform(0.0, 0.05)
        assert ov.add(x, float(i))
        xs.append(x)
        if i % 3 == 0:  # read now and then: never a stale figure
            assert ov.value == statistics.median(xs[-OVERHEAD_WINDOW:])
    assert ov.value == statistics.median(xs[-OVERHEAD_WINDOW:]) and ov.samples == 3 * OVERHEAD_WINDOW
    given = Overhead(0.25, 3, 1.0)  # a value given stands until the next sample
    assert given.value == 0.25 and given == Overhead(0.25, 3, 1.0)
    given.add(0.01, 2.0)
    assert given.value == 0.01
    copy = ov.copy()
    assert copy.value == ov.value and copy == ov


def test_the_stage_histograms_write_what_prometheus_clients_histogram_writes():
    """runtime.agent.metrics.StageHistograms replaced prometheus_client's Histogram on the frame path (issue 14):
    the same samples in both expositions, bucket edges included, creation times aside."""
    import random
    import re

    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    from runtime.daemon.metrics_http import STAGE_BUCKETS

    reg = CollectorRegistry()
    hist = Histogram("edgesplit_agent_stage_seconds", "Per-frame time by stage", ["stage"], buckets=STAGE_BUCKETS,
                     registry=reg)
    metrics = AgentMetrics()
    for stage in STAGES:
        hist.labels(stage)
    rng = random.Random(1)
    for v in [0.0, 0.0001, 0.00025, 5.0, 7.0] + [rng.expovariate(30) for _ in range(500)]:  # edges, beyond, between
        stage = rng.choice(STAGES)
        hist.labels(stage).observe(v)
        metrics.stage_by[stage].observe(v)

    def ours(text: str) -> list[str]:
        lines = [line for line in text.splitlines() if "stage_seconds" in line]
        return [re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", line) for line in lines]

    for write in (generate_latest, openmetrics):
        assert ours(write(metrics.registry).decode()) == ours(write(reg).decode())


def test_the_loop_kept_counters_and_gauge_write_what_prometheus_client_writes():
    """sent and raw bytes and the frames in flight, kept by the event loop without a lock (issue 14)."""
    import re

    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    reg = CollectorRegistry()
    metrics = AgentMetrics()
    theirs = {name: Counter(name, getattr(metrics, attr).documentation, registry=reg)
              for name, attr in (("edgesplit_agent_sent_bytes", "sent_bytes"), ("edgesplit_agent_raw_bytes", "raw_bytes"))}
    inflight = Gauge("edgesplit_agent_inflight_frames", "Frames sent and not yet answered", registry=reg)
    for sent, raw in ((49_027, 602_112), (14_286, 602_112), (3, 7)):
        theirs["edgesplit_agent_sent_bytes"].inc(sent)
        theirs["edgesplit_agent_raw_bytes"].inc(raw)
        metrics.sent_bytes.inc(sent)
        metrics.raw_bytes.inc(raw)
    inflight.inc()
    inflight.inc()
    metrics.inflight_frames += 2
    names = re.compile(r"^(# (HELP|TYPE) )?edgesplit_agent_(sent_bytes|raw_bytes|inflight_frames)[_ {]")

    def ours(text: str) -> list[str]:
        return [re.sub(r"^(\S+_created) \S+$", r"\1 T", line) for line in text.splitlines() if names.match(line)]

    for write in (generate_latest, openmetrics):
        assert ours(write(metrics.registry).decode()) == ours(write(reg).decode())
    assert metrics.registry.get_sample_value("edgesplit_agent_sent_bytes_total") == 49_027 + 14_286 + 3


def test_the_loop_kept_frames_counter_writes_what_prometheus_client_writes():
    """edgesplit_agent_frames_total{where}, kept by the event loop without a lock (issue 14): the same samples as
    prometheus_client's labelled Counter in both expositions (creation times aside), a label named later too."""
    import re

    from prometheus_client import CollectorRegistry, Counter, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

    reg = CollectorRegistry()
    theirs = Counter("edgesplit_agent_frames", "Frames with a result, by where they ran", ["where"], registry=reg)
    metrics = AgentMetrics()
    for where in ("edge", "local"):
        theirs.labels(where)
    for where in ["edge"] * 5 + ["local"] * 2:
        theirs.labels(where).inc()
        metrics.frames_by[where].inc()
    theirs.labels("other").inc(3)
    metrics.frames.labels("other").inc(3)

    def ours(text: str) -> list[str]:
        return [re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", line) for line in text.splitlines() if "agent_frames" in line]

    for write in (generate_latest, openmetrics):
        assert ours(write(metrics.registry).decode()) == ours(write(reg).decode())
    assert metrics.registry.get_sample_value("edgesplit_agent_frames_total", {"where": "edge"}) == 5
