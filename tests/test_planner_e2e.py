"""Planner + worker + agent on loopback, with the link between agent and worker emulated.

The worker is a real process serving the tiny user model; the agent dials it through a
:class:`runtime.tools.netem.DelayProxy`, whose rate the test changes; the planner and the agent (with
its :class:`PlannerLink`) run in the test's event loop. Nothing is scripted between them: the
agent measures the link from its own frames, the planner decides from that telemetry, and the
plan reaches the agent over ``WatchPlan``.

The profiles are hand-written with the real split names of the tiny model, so the plans do not
depend on how fast this machine happens to be. They describe a slow board (its classifier alone
takes a second, so running everything locally never wins) and a fast edge:

* ``stem`` (cut 1, 32 KiB on the wire) wins while the link carries more than ~680 KB/s;
* ``pool`` (cut 7, 64 bytes) wins below it: 48 ms more on the board instead of 32 KiB to send.

The fast link is paced at 40 Mbit/s (5 MB/s, 7x above the break-even), the slow one at 0.5 Mbit/s
(62.5 KB/s, 10x below), so noise in the agent's bandwidth estimate on a loaded 2-core machine
does not move the decision; the premise itself is checked with ``QueryPlan``.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import time

import grpc
import pytest
import torch
from conftest import REPO, TINY_NET, cli, wait_for, wait_serving
from polling import until as poll_until

from planner.config import PlannerConfig
from planner.server import serve as serve_planner
from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.agent.planner_link import PlannerLink, PlannerLinkOptions
from runtime.agent.sources import open_source
from runtime.contracts.profile import Block, Profile
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.tools.netem import DelayProxy, LinkShape
from runtime.wire.codec import get_codec

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(90)]

until = functools.partial(poll_until, interval=0.05)  # every 50 ms: some conditions are RPCs (agent_info)

AGENT = "board-1"
WORKER = "edge-1"
RPC = 10.0
FAST = LinkShape.from_ms_mbps(2.0, 40.0)
SLOW = LinkShape.from_ms_mbps(2.0, 0.5)
FAST_SPLIT, SLOW_SPLIT = "stem", "pool"
# seconds per block (named by the split point after it) on the board; the edge runs each in 0.1 ms
DEVICE_SECONDS = {"stem": 0.005, "act": 0.008, "add": 0.008, "act_2": 0.008, "down": 0.008, "act_3": 0.008,
                  "pool": 0.008, "flatten": 0.001, "output": 1.0}
EDGE_SECONDS = 0.0001
# compute_telemetry off: the hand-written board is far slower than this machine, and the planner would
# otherwise (rightly) rescale it from the agent's measured head times (test_planner_compute covers that).
PLANNER = dict(hold_seconds=0.6, replan_interval_seconds=0.1, telemetry_max_rate_hz=20.0, default_rtt_seconds=0.004,
               default_bandwidth_bytes_per_second=FAST.rate_bytes_per_second, metrics_port=-1, compute_telemetry=False)
TELEMETRY_INTERVAL = 0.1


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(REPO / TINY_NET))


@pytest.fixture(scope="module")
def frames(loaded):
    return [f.tensor for f in open_source(loaded.spec, "synthetic", 8)]


@pytest.fixture(scope="module")
def expected(loaded, frames):
    with torch.inference_mode():
        return [loaded.full(x) for x in frames]


@pytest.fixture(scope="module")
def worker_address(start_worker):
    _, port = start_worker("--model", TINY_NET, "--torch-threads", "1", "--max-queue", "64")
    return f"127.0.0.1:{port}"


def make_profile(loaded, role: str, machine: str) -> Profile:
    points = loaded.sliced.split_points[1:]  # block i ends at split point i + 1
    assert [sp.name for sp in points] == list(DEVICE_SECONDS), "the tiny model's split points changed"
    blocks = tuple(Block(i, sp.name, DEVICE_SECONDS[sp.name] if role == "device" else EDGE_SECONDS, sp.fp32_bytes)
                   for i, sp in enumerate(points))
    return Profile(machine=machine, role=role, model=loaded.name, model_digest=loaded.digest, blocks=blocks,
                   input_bytes=loaded.sliced.split_points[0].fp32_bytes)


def make_agent(loaded) -> Agent:
    # Starts local with no worker: the worker's address comes from the planner's plan.
    return Agent(loaded, InitialPlan(loaded.split("output"), get_codec("raw")),
                 AgentOptions(agent_id=AGENT, deadline_seconds=30.0, connect_timeout=2.0))


def make_link(agent, loaded, planner: str, heartbeat: float | None = None) -> PlannerLink:
    """``heartbeat`` None: the library's default cadence (a report on a band move or per heartbeat)."""
    extra = {} if heartbeat is None else {"telemetry_heartbeat_seconds": heartbeat}
    return PlannerLink(agent, PlannerLinkOptions(
        planner, make_profile(loaded, "device", "board"), AGENT, workers=(WORKER,),
        constraints={"raw_input_stays": True}, telemetry_interval_seconds=TELEMETRY_INTERVAL,
        rpc_timeout=5.0, connect_timeout=1.0, backoff_initial=0.1, backoff_max=0.5, **extra))


async def register_worker(stub, loaded, address: str) -> None:
    await stub.RegisterWorker(ppb.RegisterWorkerRequest(
        worker_id=WORKER, address=address, tier="edge",
        profiles_json=[make_profile(loaded, "edge", WORKER).to_json()]), timeout=RPC)


async def agent_info(stub) -> ppb.AgentInfo | None:
    reply = await stub.ListAgents(ppb.ListAgentsRequest(), timeout=RPC)
    return next((a for a in reply.agents if a.agent_id == AGENT), None)


class Pump:
    """Frames with ``window`` in flight, one started at most every ``interval`` seconds, at most
    ``limit`` of them; keeps (frame index, version at start, result). Stopped by the test or by the
    limit (which the test's waits stay well inside), so it is bounded either way."""

    def __init__(self, agent: Agent, frames, window: int = 2, interval: float = 0.01, limit: int = 6000):
        self.agent, self.frames, self.window, self.interval, self.limit = agent, frames, window, interval, limit
        self.results: list = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    def count(self, version: int) -> int:
        return sum(1 for _, v, _ in self.results if v == version)

    async def __aenter__(self):
        self.task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc):
        self.stop.set()
        await asyncio.wait_for(self.task, 60)

    async def _run(self):
        sem = asyncio.Semaphore(self.window)
        tasks: set[asyncio.Task] = set()

        async def one(k):
            try:
                v = self.agent.plan_version  # infer takes its plan in this same step (no await between)
                self.results.append((k, v, await self.agent.infer(self.frames[k])))
            finally:
                sem.release()

        for i in range(self.limit):
            await sem.acquire()
            if self.stop.is_set():
                sem.release()
                break
            t = asyncio.create_task(one(i % len(self.frames)))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            await asyncio.sleep(self.interval)
        await asyncio.gather(*tasks)


def check_results(pump: Pump, expected, splits: dict[int, str]) -> list[int]:
    """Every seq once; each frame ran on the edge under the plan it started with, with that plan's
    split, and gave the unsplit model's answer. Returns the plan versions in seq order."""
    results = sorted(pump.results, key=lambda t: t[2].seq)
    seqs = [r.seq for _, _, r in results]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a frame was lost or duplicated"
    for k, v, r in results:
        assert r.plan_version == v, (r.seq, r.plan_version, v)
        assert r.where == "edge", (r.seq, r.fallback_reason)
        assert r.split == splits[v] and r.codec == "raw", (r.seq, v, r.split)
        assert torch.allclose(r.output, expected[k], atol=1e-5, rtol=1e-5), (r.seq, v)
        assert r.top1()[0] == int(expected[k].argmax()), r.seq
    return [v for _, v, _ in results]


# -- the link changes, the plan follows --------------------------------------------------------------


def test_slower_link_brings_a_new_plan_that_the_agent_switches_to(loaded, frames, expected, worker_address, tmp_path):
    async def scenario():
        ps = await serve_planner(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "planner.sqlite"), **PLANNER))
        proxy = await DelayProxy(worker_address, FAST).start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ps.port}")
        stub = ppb_grpc.PlannerStub(channel)
        agent = make_agent(loaded)
        link = make_link(agent, loaded, f"127.0.0.1:{ps.port}")
        try:
            await register_worker(stub, loaded, proxy.address)  # agents dial the worker through the link
            await link.start()
            await until(lambda: agent.plan_version > 0, 20, "the first plan")
            v1 = agent.plan_version
            assert (agent.split.name, agent.stream.address) == (FAST_SPLIT, proxy.address)
            # the premise, under the planner's own cost model: fast -> stem, slow -> pool
            for shape, split in ((FAST, FAST_SPLIT), (SLOW, SLOW_SPLIT)):
                q = await stub.QueryPlan(ppb.PlanQuery(agent_id=AGENT, top_n=1, rtt_seconds=0.004,
                                                       bandwidth_bytes_per_second=shape.rate_bytes_per_second),
                                         timeout=RPC)
                assert q.candidates[0].split_id == split, q.candidates[0]
            async with Pump(agent, frames) as pump:
                # the fast phase: telemetry reaches the planner and the plan stays (the link reports on a
                # move out of its band or per 10 s heartbeat, so the count of reports is not fixed here)
                async def measured():
                    return pump.count(v1) >= 20 and (await agent_info(stub)).bandwidth_bytes_per_second > 0
                await until(measured, 20, "frames and telemetry on the fast link")
                info = await agent_info(stub)
                assert info.plan.version == v1 and info.bandwidth_bytes_per_second > 0, info
                fast_bw = info.bandwidth_bytes_per_second
                proxy.set_shape(rate_bytes_per_second=SLOW.rate_bytes_per_second)
                t_drop = time.monotonic()
                await until(lambda: agent.plan_version > v1, 40, "a new plan after the link slowed down")
                switched_after = time.monotonic() - t_drop
                v2 = agent.plan_version
                await until(lambda: pump.count(v2) >= 10, 20, "frames under the new plan")
            info = await agent_info(stub)
            history = ps.service.store.history(AGENT)
            return v1, v2, pump, info, history, fast_bw, switched_after, link
        finally:
            await link.close()
            await agent.close()
            await channel.close()
            await proxy.close()
            await ps.drain_and_stop(1.0)

    v1, v2, pump, info, history, fast_bw, switched_after, link = asyncio.run(scenario())
    print(f"fast {fast_bw / 1e6:.2f} MB/s, slow {info.bandwidth_bytes_per_second / 1e6:.3f} MB/s; switched "
          f"{switched_after:.1f}s after the drop; {len(pump.results)} frames")
    versions = check_results(pump, expected, {v1: FAST_SPLIT, v2: SLOW_SPLIT})
    assert set(versions) == {v1, v2} and versions == sorted(versions), "the plan went back and forth"
    assert versions.count(v1) >= 20 and versions.count(v2) >= 10
    for _, v, r in pump.results:  # bytes on the wire follow the plan
        payload = loaded.split(FAST_SPLIT if v == v1 else SLOW_SPLIT).fp32_bytes  # plus shape and dtype fields
        assert payload < r.wire_bytes <= payload + 64
    # the planner sees what the agent runs, and why it changed
    assert (info.plan.version, info.plan.split_id, info.plan.worker_id) == (v2, SLOW_SPLIT, WORKER)
    assert info.plan.reason.startswith("telemetry"), info.plan.reason
    assert info.bandwidth_bytes_per_second < 680_000 < fast_bw
    assert [(h.plan.version, h.status) for h in history] == [(v2, "applied"), (v1, "applied")]
    assert link.plans_applied == 2 and link.plans_refused == 0


# -- the planner restarts, the agent carries on ------------------------------------------------------


def test_agent_keeps_serving_through_a_planner_restart(loaded, frames, expected, worker_address, reaper, tmp_path):
    """`edgesplit planner serve` is killed (no drain) and started again on the same database and port:
    the agent keeps its plan and its frames flowing meanwhile, registers again, and the restarted
    planner knows the agent, its plan and the worker (which did not register again) from the database."""
    db = tmp_path / "planner.sqlite"
    flags = [f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')}={v}"
             for k, v in PLANNER.items()]

    def start_planner(port: int, n: int):
        port_file = tmp_path / f"port{n}"
        proc = reaper.spawn(cli("planner", "serve", "--listen", f"127.0.0.1:{port}", "--port-file", str(port_file),
                                "--db", str(db), "--grace-seconds", "1", *flags), log=tmp_path / f"planner{n}.log")
        text = wait_for(lambda: port_file.exists() and port_file.read_text().endswith("\n") and port_file.read_text(),
                        30, "the planner's port file", proc)
        wait_serving(f"127.0.0.1:{int(text)}", proc, timeout=30)
        return proc, int(text)

    async def planner_view(address: str) -> ppb.AgentInfo | None:
        async with grpc.aio.insecure_channel(address) as channel:
            return await agent_info(ppb_grpc.PlannerStub(channel))

    async def scenario():
        proc, port = await asyncio.to_thread(start_planner, 0, 1)
        address = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(address) as channel:
            await register_worker(ppb_grpc.PlannerStub(channel), loaded, worker_address)
        agent = make_agent(loaded)
        link = make_link(agent, loaded, address, heartbeat=0.0)  # a report every interval: counted below
        try:
            await link.start()
            await until(lambda: agent.plan_version > 0, 20, "the first plan")
            async with Pump(agent, frames) as pump:
                sent = link.telemetry_sent
                await until(lambda: len(pump.results) >= 10 and link.telemetry_sent >= sent + 2, 20, "frames and telemetry")
                before = await planner_view(address)
                assert before.plan.version == agent.plan_version and before.telemetry_age_seconds >= 0, before
                proc.kill()  # a crash: no drain, nothing flushed on the way out
                await asyncio.to_thread(proc.wait, 10)
                await until(lambda: not link.connected, 10, "the link to notice the planner is gone")
                n = len(pump.results)
                await until(lambda: len(pump.results) >= n + 20, 20, "frames while the planner is down")
                assert agent.plan_version == before.plan.version and link.registrations == 1
                proc, _ = await asyncio.to_thread(start_planner, port, 2)
                await until(lambda: link.registrations == 2 and link.connected, 20, "the agent to register again")
                sent = link.telemetry_sent
                await until(lambda: link.telemetry_sent >= sent + 2, 10, "telemetry to the restarted planner")
                after = await planner_view(address)
                n = len(pump.results)
                await until(lambda: len(pump.results) >= n + 5, 20, "frames after the restart")
            return before, after, pump, agent.plan_version, link
        finally:
            await link.close()
            await agent.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 15)

    before, after, pump, version, link = asyncio.run(scenario())
    assert version >= before.plan.version and after.plan.version == version, (before.plan, after.plan)
    assert (after.plan.split_id, after.plan.worker_id, after.plan.worker_address) == \
           (before.plan.split_id, WORKER, worker_address)  # the worker came back from the database
    assert after.telemetry_age_seconds >= 0 and after.bandwidth_bytes_per_second > 0
    assert link.plans_refused == 0
    versions = check_results(pump, expected, dict.fromkeys(range(1, version + 1), FAST_SPLIT))
    assert versions == sorted(versions)
