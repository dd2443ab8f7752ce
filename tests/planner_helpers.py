"""Shared pieces of the planner service tests: hand-written profiles, an event loop thread,
a planner on 127.0.0.1:0 with its stub, and status checks (see test_planner_service.py)."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import grpc
import pytest

from planner.config import PlannerConfig
from planner.server import serve
from runtime.contracts.profile import Block, Profile
from runtime.daemon.planner_client import LEASE
from runtime.proto.edgesplit.v1 import planner_pb2 as pb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as pb_grpc

RPC = 10.0  # deadline of every call
MODEL = "tinynet"
NAMES = ("conv1", "conv2", "conv3", "conv4", "fc")
DEVICE_S = (0.020, 0.020, 0.020, 0.020, 0.010)
EDGE_S = (0.002, 0.002, 0.002, 0.002, 0.001)
OUT = (800_000, 200_000, 50_000, 10_000, 4_000)
INPUT = 600_000
RTT = 0.005
FAST = 10_000_000.0  # B/s: best is a cut after 2 blocks ("conv2")
SLOW = 1_000_000.0  # B/s: best is local ("output")


def expected_seconds(cut: int, bw: float) -> float:
    """Hand formula; cut == 5 means local."""
    if cut == len(NAMES):
        return sum(DEVICE_S)
    sent = INPUT if cut == 0 else OUT[cut - 1]
    return sum(DEVICE_S[:cut]) + RTT + sent / bw + sum(EDGE_S[cut:]) + OUT[-1] / bw


PARAMS = 1_000_000  # weight bytes of each block; block i holds layers 10 i .. 10 i + 9


def profile(machine: str, role: str, seconds=DEVICE_S, names=NAMES, model=MODEL, digest="w1") -> str:
    blocks = tuple(Block(index=i, name=n, seconds=s, output_bytes=o, first_layer=10 * i, last_layer=10 * i + 9,
                         param_bytes=PARAMS) for i, (n, s, o) in enumerate(zip(names, seconds, OUT, strict=False)))
    return Profile(machine=machine, role=role, model=model, blocks=blocks, input_bytes=INPUT, model_digest=digest).to_json()


DEVICE_PROFILE = profile("board", "device")
EDGE_PROFILE = profile("xeon", "edge", EDGE_S)

OWNER = LEASE  # the lease metadata PlannerClient sends: the legitimate processes'
STRANGER = (("edgesplit-lease", "s" * 43),)  # another process's lease


def worker_request(worker_id="w1", address="127.0.0.1:50051") -> pb.RegisterWorkerRequest:
    """Worker ``worker_id`` at ``address`` registering with EDGE_PROFILE."""
    return pb.RegisterWorkerRequest(worker_id=worker_id, address=address, tier="edge", profiles_json=[EDGE_PROFILE])


def agent_request(agent_id="a1") -> pb.RegisterAgentRequest:
    """Agent ``agent_id`` registering MODEL (weights "w1") with DEVICE_PROFILE."""
    return pb.RegisterAgentRequest(agent_id=agent_id, model_id=MODEL, model_digest="w1", profile_json=DEVICE_PROFILE)


# -- plumbing --------------------------------------------------------------------------------------


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 50.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def aio():
    lt = LoopThread()
    yield lt
    lt.close()


class Planner:
    def __init__(self, ps, channel):
        self.ps, self.channel = ps, channel
        self.stub = pb_grpc.PlannerStub(channel)
        self.address = f"127.0.0.1:{ps.port}"

    @classmethod
    async def start(cls, db, **kw) -> Planner:
        kw = {"default_rtt_seconds": RTT, "default_bandwidth_bytes_per_second": FAST, "hold_seconds": 0.3,
              "replan_interval_seconds": 0.05, "telemetry_max_rate_hz": 100.0, **kw}
        ps = await serve(PlannerConfig(listen="127.0.0.1:0", db=str(db), **kw))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ps.port}")
        await asyncio.wait_for(channel.channel_ready(), RPC)
        return cls(ps, channel)

    async def stop(self):
        await self.channel.close()
        await self.ps.drain_and_stop(1.0)

    async def register(self, agent="a1", workers=(), constraints=None, worker_profiles=(EDGE_PROFILE,)):
        if worker_profiles:
            await self.stub.RegisterWorker(pb.RegisterWorkerRequest(
                worker_id="w1", address="127.0.0.1:50051", tier="edge", profiles_json=list(worker_profiles)), timeout=RPC)
        reply = await self.stub.RegisterAgent(pb.RegisterAgentRequest(
            agent_id=agent, model_id=MODEL, model_digest="w1", profile_json=DEVICE_PROFILE, workers=list(workers),
            constraints=constraints), timeout=RPC)
        return reply.plan

    async def telemetry(self, bw: float, agent="a1", worker="w1", rtt=RTT) -> int:
        async def messages():
            yield pb.Telemetry(agent_id=agent, worker=worker, bandwidth_bytes_per_second=bw, rtt_seconds=rtt,
                               sent_unix=time.time())

        return (await self.stub.ReportTelemetry(messages(), timeout=RPC)).received

    async def agents(self) -> dict[str, pb.AgentInfo]:
        reply = await self.stub.ListAgents(pb.ListAgentsRequest(), timeout=RPC)
        return {a.agent_id: a for a in reply.agents}


@pytest.fixture
def planner(aio, tmp_path):
    p = aio.run(Planner.start(tmp_path / "planner.sqlite"))
    yield p
    aio.run(p.stop())


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await awaitable
    return ei.value


def check_status(err: grpc.aio.AioRpcError, code: grpc.StatusCode, phrase: str) -> None:
    assert err.code() == code, (err.code(), err.details())
    assert re.search(phrase, err.details() or ""), err.details()


async def next_plan(call, timeout: float = 5.0) -> pb.Plan:
    return await asyncio.wait_for(call.read(), timeout)
