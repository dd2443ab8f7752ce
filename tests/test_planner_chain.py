"""The planner plans chains: device -> edge -> cloud through an edge worker that forwards.

The decision tests use small hand-written profiles whose best configurations are computed by hand
below: 5 blocks, a slow board, a middling edge, a fast cloud, raw transfers only. The board
reaches the edge over a fast LAN and the cloud over a slow WAN; the edge has a fat pipe to the
cloud. A chained configuration cuts after ``a`` blocks on the board and after ``e`` on the edge:

    T(a, e) = D[:a] + RTT_AE + OUT[a-1] / BW_AE + E[a:e] + RTT_EC + OUT[e-1] / BW_EC + C[e:]
              + RESULT / BW_AE + RESULT / BW_EC          (the result travels back over both links)

The end-to-end test runs the real daemons in process on loopback: a planner, a cloud worker, an
edge worker started with ``--next-tier`` the cloud (both register themselves, the edge with its
allowlist), and an agent with its PlannerLink; its frames run the chain the planner pushed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import grpc
import pytest
import torch
from conftest import REPO, TINY_NET
from polling import until

from planner import decide
from planner.config import PlannerConfig
from planner.server import serve as serve_planner
from planner.store import AgentRecord, Store, WorkerRecord
from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
from runtime.agent.sources import open_source
from runtime.contracts.costmodel import Link
from runtime.contracts.profile import Block, Profile
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc
from runtime.wire.codec import get_codec
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve as serve_worker

pytestmark = pytest.mark.timeout(60)

RPC = 10.0
MODEL = "tinynet"
NAMES = ("conv1", "conv2", "conv3", "conv4", "fc")
OUT = (800_000, 200_000, 50_000, 10_000, 4_000)
INPUT = 600_000
DEVICE_S = (0.020, 0.020, 0.020, 0.020, 0.010)
EDGE_S = (0.015, 0.015, 0.015, 0.015, 0.0075)
CLOUD_S = (0.0005,) * 5
AE = Link(0.002, 10_000_000.0)  # board -> edge
AC = Link(0.050, 1_000_000.0)  # board -> cloud
EC = Link(0.005, 100_000_000.0)  # edge -> cloud (the planner's worker-to-worker link)
EDGE, CLOUD = "edge-1", "cloud-1"
EDGE_ADDR, CLOUD_ADDR = "10.0.0.5:50051", "10.0.0.9:50052"


def chain_seconds(a: int, e: int) -> float:
    r = OUT[-1]
    return (sum(DEVICE_S[:a]) + AE.rtt_seconds + OUT[a - 1] / AE.bandwidth_bytes_per_second + sum(EDGE_S[a:e])
            + EC.rtt_seconds + OUT[e - 1] / EC.bandwidth_bytes_per_second + sum(CLOUD_S[e:])
            + r / AE.bandwidth_bytes_per_second + r / EC.bandwidth_bytes_per_second)


def edge_seconds(a: int) -> float:
    return (sum(DEVICE_S[:a]) + AE.rtt_seconds + OUT[a - 1] / AE.bandwidth_bytes_per_second + sum(EDGE_S[a:])
            + OUT[-1] / AE.bandwidth_bytes_per_second)


# By hand: T(2, 3) = 40 + 2 + 20 + 15 + 5 + 0.5 + 1 + 0.44 = 83.94 ms; T(3, 4) = 88.04 ms; the best
# without the cloud is the edge after conv3 (89.9 ms); everything on the board is 90 ms; the cloud
# alone, over the WAN, 144.5 ms at best.
assert abs(chain_seconds(2, 3) - 0.08394) < 1e-9 and abs(edge_seconds(3) - 0.0899) < 1e-9


def profile(machine: str, role: str, seconds, model=MODEL, names=NAMES, out=OUT, input_bytes=INPUT, digest="w1") -> Profile:
    blocks = tuple(Block(index=i, name=n, seconds=s, output_bytes=o) for i, (n, s, o) in enumerate(zip(names, seconds, out, strict=False)))
    return Profile(machine=machine, role=role, model=model, blocks=blocks, input_bytes=input_bytes, model_digest=digest)


DEVICE = profile("board", "device", DEVICE_S)
EDGE_P = profile(EDGE, "edge", EDGE_S)
CLOUD_P = profile(CLOUD, "cloud", CLOUD_S)


def agent_record(constraints: pb.Constraints | None = None) -> AgentRecord:
    return AgentRecord("a1", MODEL, "w1", DEVICE.to_json(), (), (),
                       constraints or pb.Constraints(raw_input_stays=True))


def rank(edge_next_tiers: tuple[str, ...], top_n: int = 3):
    agent = agent_record()
    workers = [(WorkerRecord(EDGE, EDGE_ADDR, "edge", (), {}, next_tiers=edge_next_tiers), {MODEL: EDGE_P}),
               (WorkerRecord(CLOUD, CLOUD_ADDR, "cloud", (), {}), {MODEL: CLOUD_P})]
    links = {EDGE: AE, CLOUD: AC}
    cands = decide.candidates(agent, DEVICE, workers, lambda wid: links[wid])
    chains = decide.chains(cands, EC)
    ranked, _ = decide.rank(agent, DEVICE, cands, [DEVICE] * len(cands), top_n, True,
                            chained=[(c, DEVICE) for c in chains])
    return agent, ranked, chains


# -- decisions (pure) ------------------------------------------------------------------------------


def test_slow_board_and_fast_cloud_give_a_chained_plan_through_the_edge():
    agent, ranked, chains = rank((CLOUD_ADDR,))
    assert [(c.first.worker_id, c.second.worker_id) for c in chains] == [(EDGE, CLOUD)]
    assert [r.config.seconds for r in ranked] == pytest.approx([chain_seconds(2, 3), chain_seconds(3, 4),
                                                               edge_seconds(3)], abs=1e-9)
    plan = decide.to_plan(agent, DEVICE, ranked[0], "test")
    assert (plan.worker_id, plan.worker_address, plan.split_id, plan.split_index, plan.codec) == \
           (EDGE, EDGE_ADDR, "conv2", 2, "raw")
    assert (plan.end_split, plan.end_split_index) == ("conv3", 3)
    assert [(h.worker_id, h.address, h.end_split, h.end_split_index, h.codec, h.tl_id) for h in plan.next_hops] == \
           [(CLOUD, CLOUD_ADDR, "", 5, "raw", "")]
    assert plan.predicted_seconds == pytest.approx(chain_seconds(2, 3), abs=1e-9)
    assert plan.predicted_bytes == OUT[1] + OUT[2]  # both links
    assert plan.breakdown_seconds["transfer:edge->cloud"] == pytest.approx(OUT[2] / EC.bandwidth_bytes_per_second)
    # the plan's key (hysteresis, refusals) is the ranked configuration's, route included
    assert decide.plan_key(plan) == decide.config_key(DEVICE, ranked[0]) == (EDGE, 2, "raw", "", ((3, CLOUD, "raw", ""),))
    # re-costing the running chained plan gives what the search said
    chain = chains[0]
    now = decide.predict(agent, DEVICE, plan, chain.first, decide.limit_device(DEVICE, frozenset(), (2, "raw", "")), True,
                         chain, decide.forwarding_at(EDGE_P, 3, "raw"))
    assert now is not None and now.seconds == pytest.approx(chain_seconds(2, 3), abs=1e-9)
    # ... and None once the edge no longer forwards there
    assert decide.predict(agent, DEVICE, plan, chain.first, DEVICE, True, None, None) is None


def test_no_chain_when_the_edge_does_not_forward_to_the_cloud():
    for allowed in ((), ("10.0.0.9:9999",)):  # no --next-tier, or another address than the cloud's
        agent, ranked, chains = rank(allowed)
        assert chains == []
        assert all(len(r.config.hops) <= 1 for r in ranked)
        plan = decide.to_plan(agent, DEVICE, ranked[0], "test")
        assert (plan.worker_id, plan.split_id, plan.end_split, len(plan.next_hops)) == (EDGE, "conv3", "", 0)
        assert plan.predicted_seconds == pytest.approx(edge_seconds(3), abs=1e-9)


def test_the_worker_to_worker_hop_uses_codecs_only():
    """A forwarding worker drops Transfer Layers: the edge -> cloud hop never picks one, however small."""
    from runtime.contracts.profile import Transfer

    tl = Transfer("tl-x+raw", 10, codec="raw", tl_id="tl-x")
    blocks = tuple(Block(b.index, b.name, b.seconds, b.output_bytes, transfers=(Transfer("raw", b.output_bytes, codec="raw"), tl))
                   for b in EDGE_P.blocks)
    edge = Profile(EDGE, "edge", MODEL, blocks, INPUT, model_digest="w1")
    cache = decide.DecisionCache()  # what the re-planner holds: the same derived profile while it lives
    fwd = decide.forwarding(edge, cache)
    assert all(t.tl_id == "" for b in fwd.blocks for t in b.transfers) and decide.forwarding(edge, cache) is fwd
    assert decide.forwarding(EDGE_P) is EDGE_P  # nothing to drop: the same object (the search caches by it)


# -- the daemon over gRPC ----------------------------------------------------------------------------


async def _start_planner(db, **kw):
    cfg = dict(listen="127.0.0.1:0", db=str(db), default_rtt_seconds=AE.rtt_seconds,
               default_bandwidth_bytes_per_second=AE.bandwidth_bytes_per_second,
               worker_link_rtt_seconds=EC.rtt_seconds, worker_link_bandwidth_bytes_per_second=EC.bandwidth_bytes_per_second,
               hold_seconds=0.2, replan_interval_seconds=0.05, telemetry_max_rate_hz=100.0, metrics_port=-1)
    cfg.update(kw)
    ps = await serve_planner(PlannerConfig(**cfg))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{ps.port}")
    await asyncio.wait_for(channel.channel_ready(), RPC)
    return ps, channel, pb_grpc.PlannerStub(channel)


async def _plan_of(stub, agent="a1") -> pb.Plan:
    reply = await stub.ListAgents(pb.ListAgentsRequest(), timeout=RPC)
    return next(a.plan for a in reply.agents if a.agent_id == agent)


def _cli(*argv: str) -> None:
    from runtime.cli.main import build_parser

    args = build_parser().parse_args(["planner", *argv])  # every call has --timeout's deadline (10 s)
    assert args.func(args) == 0


def test_daemon_switches_to_a_chain_with_hysteresis_and_keeps_it_across_a_restart(tmp_path, capsys):
    db = tmp_path / "planner.sqlite"

    async def scenario():
        ps, channel, stub = await _start_planner(db)
        try:
            err = None
            try:
                await stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id=EDGE, address=EDGE_ADDR, tier="edge",
                                                                   profiles_json=[EDGE_P.to_json()],
                                                                   next_tiers=["not an address"]), timeout=RPC)
            except grpc.aio.AioRpcError as e:
                err = e
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT and "HOST:PORT" in err.details()
            await stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id=CLOUD, address=CLOUD_ADDR, tier="cloud",
                                                               profiles_json=[CLOUD_P.to_json()]), timeout=RPC)
            await stub.RegisterWorker(pb.RegisterWorkerRequest(worker_id=EDGE, address=EDGE_ADDR, tier="edge",
                                                               profiles_json=[EDGE_P.to_json()],
                                                               next_tiers=[CLOUD_ADDR]), timeout=RPC)
            reply = await stub.RegisterAgent(pb.RegisterAgentRequest(
                agent_id="a1", model_id=MODEL, model_digest="w1", profile_json=DEVICE.to_json(),
                constraints=pb.Constraints(raw_input_stays=True)), timeout=RPC)
            v1 = reply.plan
            # until the WAN is measured the cloud looks as close as the edge: the cloud alone wins
            assert (v1.worker_id, v1.split_id, len(v1.next_hops)) == (CLOUD, "conv2", 0), v1

            async def messages():
                yield pb.Telemetry(agent_id="a1", worker=CLOUD, bandwidth_bytes_per_second=AC.bandwidth_bytes_per_second,
                                   rtt_seconds=AC.rtt_seconds, sent_unix=time.time())

            await stub.ReportTelemetry(messages(), timeout=RPC)
            v2 = await until(lambda: _chained(stub), 10, "the chained plan")
            q = await stub.QueryPlan(pb.PlanQuery(agent_id="a1", top_n=2), timeout=RPC)
            await asyncio.to_thread(_cli, "agents", "--planner", f"127.0.0.1:{ps.port}")
            history = ps.service.store.history("a1")
        finally:
            await channel.close()
            await ps.drain_and_stop(1.0)
        # a restarted planner on the same database: workers with their next tiers, the plan with its route
        ps, channel, stub = await _start_planner(db)
        try:
            after = await _plan_of(stub)
            workers = ps.service.store.workers()
            await ps.service.tick()  # the restart's re-check: nothing changed, so no new plan
            again = await stub.RegisterAgent(pb.RegisterAgentRequest(
                agent_id="a1", model_id=MODEL, model_digest="w1", profile_json=DEVICE.to_json(),
                constraints=pb.Constraints(raw_input_stays=True)), timeout=RPC)
            last = ps.service.store.last_version()
        finally:
            await channel.close()
            await ps.drain_and_stop(1.0)
        return v1, v2, q, history, after, workers, again.plan, last

    v1, v2, q, history, after, workers, again, last = asyncio.run(scenario())
    out = capsys.readouterr().out
    assert f"{EDGE} > {CLOUD}" in out and "conv2..conv3" in out, out  # `planner agents` shows the route
    assert v2.version > v1.version and v2.reason.startswith("telemetry"), v2.reason
    assert (v2.worker_id, v2.split_id, v2.end_split) == (EDGE, "conv2", "conv3")
    assert [(h.worker_id, h.address, h.end_split, h.codec) for h in v2.next_hops] == [(CLOUD, CLOUD_ADDR, "", "raw")]
    assert v2.predicted_seconds == pytest.approx(chain_seconds(2, 3), abs=1e-9)
    assert [p.plan.version for p in history] == [v2.version, v1.version]
    assert q.candidates[0].next_hops[0].worker_id == CLOUD and q.candidates[1].end_split == "conv4"
    assert workers[EDGE].next_tiers == (CLOUD_ADDR,) and workers[CLOUD].next_tiers == ()
    assert after == v2 and again == v2 and last == v2.version


async def _chained(stub):
    plan = await _plan_of(stub)
    return plan if plan.next_hops else None


def test_schema_1_database_gains_next_tiers(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
        CREATE TABLE workers (id TEXT PRIMARY KEY, address TEXT NOT NULL, tier TEXT NOT NULL, tl_ids TEXT NOT NULL,
            profiles TEXT NOT NULL, registered REAL NOT NULL, last_seen REAL NOT NULL);
        INSERT INTO workers VALUES ('w1', '10.0.0.5:50051', 'edge', '[]', '{}', 1.0, 2.0);""")
    db.commit()
    db.close()
    s = Store(path)
    try:
        assert s.workers()["w1"].next_tiers == ()
        s.put_worker(WorkerRecord("w1", "10.0.0.5:50051", "edge", (), {}, 1.0, 3.0, ("10.0.0.9:50052",)))
        assert s.workers()["w1"].next_tiers == ("10.0.0.9:50052",)
        assert s.db.execute("SELECT version FROM schema_version").fetchone()[0] == 3  # 3: profiles by content hash
    finally:
        s.close()


# -- the agent's side --------------------------------------------------------------------------------


class _Stub:
    """Records report_plan_status (the only RPC ``_on_plan`` makes)."""

    def __init__(self):
        self.statuses: list[pb.PlanStatus] = []

    async def report_plan_status(self, status):
        self.statuses.append(status)
        return pb.PlanStatusAck()


@pytest.fixture(scope="module")
def loaded(one_torch_thread):
    return load_model(str(REPO / TINY_NET))


def test_agent_refuses_a_route_it_cannot_apply_and_keeps_its_plan(loaded):
    device = tiny_profile(loaded, "device", "board")

    async def scenario():
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")), AgentOptions(agent_id="a1"))
        link = PlannerLink(agent, PlannerLinkOptions("127.0.0.1:1", device, "a1"))
        stub = _Stub()
        try:
            await link._on_plan(stub, pb.Plan(agent_id="a1", version=3, model_id=loaded.name, split_id="output"))
            bad_tl = pb.Plan(agent_id="a1", version=4, model_id=loaded.name, split_id="stem", codec="raw",
                             worker_id=EDGE, worker_address="127.0.0.1:1", end_split="down")
            bad_tl.next_hops.add(worker_id=CLOUD, address="127.0.0.1:2", codec="raw", tl_id="tl-x")
            backwards = pb.Plan(agent_id="a1", version=5, model_id=loaded.name, split_id="down", codec="raw",
                                worker_id=EDGE, worker_address="127.0.0.1:1", end_split="stem")
            backwards.next_hops.add(worker_id=CLOUD, address="127.0.0.1:2", codec="raw")
            await link._on_plan(stub, bad_tl)
            await link._on_plan(stub, backwards)
            return agent.plan_version, agent.stream, stub.statuses, link
        finally:
            await agent.close()

    version, stream, statuses, link = asyncio.run(scenario())
    assert version == 3 and stream is None  # the last good plan (local) stays
    assert [(s.version, s.applied) for s in statuses] == [(3, True), (4, False), (5, False)]
    assert "Transfer Layer" in statuses[1].message and "codec only" in statuses[1].message
    assert "is not after split" in statuses[2].message
    assert (link.plans_applied, link.plans_refused) == (1, 2)


# -- end to end: planner + edge (--next-tier cloud) + cloud + agent ----------------------------------

TINY = f"{REPO / TINY_NET.split(':')[0]}:build"
# seconds per block (named by the split point after it). The board is slow past its stem; the edge
# is quick up to `down` and slow after it (no accelerator for the classifier); the cloud is quick.
TINY_DEVICE = {"stem": 0.005, "act": 0.05, "add": 0.05, "act_2": 0.05, "down": 0.05, "act_3": 0.05, "pool": 0.05,
               "flatten": 0.05, "output": 0.05}
TINY_EDGE = {"stem": 0.0001, "act": 0.0001, "add": 0.0001, "act_2": 0.0001, "down": 0.0001, "act_3": 0.2,
             "pool": 0.2, "flatten": 0.2, "output": 0.2}
TINY_CLOUD = 0.0001


def tiny_profile(loaded, role: str, machine: str) -> Profile:
    points = loaded.sliced.split_points[1:]  # block i ends at split point i + 1
    assert [sp.name for sp in points] == list(TINY_DEVICE), "the tiny model's split points changed"
    table = {"device": TINY_DEVICE, "edge": TINY_EDGE}.get(role)
    blocks = tuple(Block(i, sp.name, table[sp.name] if table else TINY_CLOUD, sp.fp32_bytes) for i, sp in enumerate(points))
    return Profile(machine=machine, role=role, model=loaded.name, model_digest=loaded.digest, blocks=blocks,
                   input_bytes=loaded.sliced.split_points[0].fp32_bytes)


def test_agent_runs_the_chain_the_planner_pushes(loaded, tmp_path):
    """The block after the stem is pinned to the edge (features leave the board only to the trusted
    edge), so the cloud alone cannot serve; the edge alone would run the slow classifier. The best is
    the chain board [input, stem) -> edge [stem, down) -> cloud [down, output): by hand, 5 ms + the
    board's link + 0.4 ms edge + 16 KiB over the worker link + 0.4 ms cloud, against > 0.8 s for the
    edge alone, whatever the measured board link (above ~100 KB/s)."""
    frames = [f.tensor for f in open_source(loaded.spec, "synthetic", 4)]
    with torch.inference_mode():
        expected = [loaded.full(x) for x in frames]
    paths = {}
    for role, wid in (("edge", EDGE), ("cloud", CLOUD)):
        paths[role] = tmp_path / f"{role}.json"
        tiny_profile(loaded, role, wid).save(paths[role])
    constraints = pb.Constraints(raw_input_stays=True, pin_blocks=[pb.BlockTier(name="act", tier="edge")])

    async def scenario():
        ps = await serve_planner(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), metrics_port=-1,
                                               replan_interval_seconds=0.05, worker_link_rtt_seconds=0.001,
                                               worker_link_bandwidth_bytes_per_second=100e6))
        planner = f"127.0.0.1:{ps.port}"
        common = dict(listen="127.0.0.1:0", models=(TINY,), torch_threads=1, planner=planner,
                      planner_refresh_seconds=30.0, forward_deadline_seconds=30.0)
        cloud = await serve_worker(WorkerConfig(worker_id=CLOUD, tier="cloud", profiles=(str(paths["cloud"]),), **common))
        cloud_addr = f"127.0.0.1:{cloud.port}"
        edge = await serve_worker(WorkerConfig(worker_id=EDGE, tier="edge", profiles=(str(paths["edge"]),),
                                               next_tiers=(cloud_addr,), **common))
        agent = Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")),
                      AgentOptions(agent_id="board-1", deadline_seconds=30.0, connect_timeout=2.0))
        link = PlannerLink(agent, PlannerLinkOptions(
            planner, tiny_profile(loaded, "device", "board"), "board-1", constraints=constraints,
            telemetry_interval_seconds=0.2, rpc_timeout=5.0, connect_timeout=2.0, backoff_initial=0.1, backoff_max=0.5))
        try:
            await asyncio.wait_for(asyncio.gather(edge.registration.registered.wait(),
                                                  cloud.registration.registered.wait()), 20)
            assert ps.service.workers[EDGE].record.next_tiers == (cloud_addr,)
            await link.start()
            await until(lambda: agent.plan_version > 0, 30, "the first plan")
            active = agent.active
            results = [await agent.infer(x) for x in frames]
            async with grpc.aio.insecure_channel(planner) as channel:
                plan = await _plan_of(pb_grpc.PlannerStub(channel), "board-1")
            history = ps.service.store.history("board-1")
            forwarded = edge.service.metrics.registry.get_sample_value(
                "edgesplit_worker_forwarded_frames_total", {"next_tier": cloud_addr, "code": "OK"}) or 0.0
            return active, results, plan, history, forwarded, cloud_addr, link
        finally:
            await link.close()
            await agent.close()
            await edge.drain_and_stop(1.0)
            await cloud.drain_and_stop(1.0)
            await ps.drain_and_stop(1.0)

    active, results, plan, history, forwarded, cloud_addr, link = asyncio.run(scenario())
    assert (plan.worker_id, plan.split_id, plan.end_split) == (EDGE, "stem", "down"), plan
    assert [(h.worker_id, h.address, h.end_split) for h in plan.next_hops] == [(CLOUD, cloud_addr, "")]
    assert (active.version, active.split.name, active.end_split, [h.address for h in active.next_hops]) == \
           (plan.version, "stem", "down", [cloud_addr])
    for r, want in zip(results, expected, strict=False):
        assert r.where == "edge", r.fallback_reason
        assert r.plan_version == plan.version and r.split == "stem"
        assert r.times["next1_tail"] > 0  # the cloud ran the last slice
        assert torch.allclose(r.output, want, atol=1e-5, rtol=1e-5)
        assert r.top1()[0] == int(want.argmax())
    assert forwarded == len(frames)
    assert history[0].plan.version == plan.version and history[0].status == "applied"
    assert link.plans_refused == 0
