"""Issue 10's first attack, end to end: a real agent takes its plan from a loopback planner and sends
frames to a real worker process; an impostor (a gRPC server on another port that counts every frame
it is sent) re-registers the worker's id with its own address, as a stranger would. The planner
refuses it PERMISSION_DENIED, the agent's plan keeps the real worker, every frame before and after
runs on the real worker with the right answer, and **no frame ever reaches the impostor** (its own
count stays 0)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from conftest import REPO, TINY_NET

from planner.config import PlannerConfig
from planner.server import serve as serve_planner
from runtime.agent.sources import open_source
from runtime.daemon.planner_client import LEASE
from runtime.daemon.server import Daemon, DaemonOptions
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from tests.test_planner_e2e import (
    AGENT,
    PLANNER,
    RPC,
    WORKER,
    Pump,
    make_agent,
    make_link,
    make_profile,
    until,
)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(120)]
STRANGER = (("edgesplit-lease", "s" * 43),)  # another process's lease


class Impostor(pb_grpc.InferenceServicer):
    """Accepts anything and counts what reaches it."""

    def __init__(self):
        self.calls = 0
        self.frames = 0

    async def Prepare(self, request, context):
        self.calls += 1
        return pb.PrepareResult(model_digest="impostor")

    async def InferStream(self, request_iterator, context):
        self.calls += 1
        async for msg in request_iterator:
            self.frames += 1
            yield pb.InferResult(header=msg.frame.header)


def test_a_worker_id_hijack_is_refused_and_no_frame_reaches_the_impostor(start_worker, tmp_path):
    loaded = load_model(str(REPO / TINY_NET))
    frames = [f.tensor for f in open_source(loaded.spec, "synthetic", 4)]
    with torch.inference_mode():
        expected = [int(loaded.full(x).argmax()) for x in frames]
    _, port = start_worker("--model", TINY_NET, "--torch-threads", "1", "--max-queue", "64")
    real = f"127.0.0.1:{port}"

    async def scenario():
        ps = await serve_planner(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), **PLANNER))
        impostor = Impostor()
        fake = Daemon(DaemonOptions(listen="127.0.0.1:0", reflection=False))
        await fake.start(lambda server: pb_grpc.add_InferenceServicer_to_server(impostor, server))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{ps.port}")
        stub = ppb_grpc.PlannerStub(channel)
        agent = make_agent(loaded)
        link = make_link(agent, loaded, f"127.0.0.1:{ps.port}")

        def register(address, metadata):
            return stub.RegisterWorker(ppb.RegisterWorkerRequest(
                worker_id=WORKER, address=address, tier="edge",
                profiles_json=[make_profile(loaded, "edge", WORKER).to_json()]), timeout=RPC, metadata=metadata)

        try:
            await register(real, LEASE)  # the real worker's registration
            await link.start()
            await until(lambda: agent.plan_version > 0 and agent.stream is not None, 20, "the first plan")
            async with Pump(agent, frames, limit=400) as pump:
                await until(lambda: len(pump.results) >= 20, 30, "frames on the real worker")
                refusals = []
                for metadata in (STRANGER, None):  # another process's lease, or none at all
                    try:
                        await register(f"127.0.0.1:{fake.port}", metadata)
                        refusals.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as e:
                        refusals.append((e.code(), e.details()))
                before = len(pump.results)
                await until(lambda: len(pump.results) >= before + 40, 30, "frames after the hijack attempt")
            info = next(a for a in (await stub.ListAgents(ppb.ListAgentsRequest(), timeout=RPC)).agents
                        if a.agent_id == AGENT)
            return refusals, pump.results, info.plan, agent.stream.address, impostor
        finally:
            await link.close()
            await agent.close()
            await channel.close()
            await fake.drain(0.5)
            await ps.drain_and_stop(1.0)

    refusals, results, plan, dialled, impostor = asyncio.run(scenario())
    for refusal in refusals:
        assert refusal != grpc.StatusCode.OK
        code, details = refusal
        assert code == grpc.StatusCode.PERMISSION_DENIED and "registered by another caller" in details
    assert plan.worker_address == real and dialled == real
    assert len(results) >= 60
    assert all(r.where == "edge" for _, _, r in results), {r.fallback_reason for _, _, r in results}
    assert all(r.top1()[0] == expected[k] for k, _, r in results)
    assert impostor.calls == 0 and impostor.frames == 0
