"""Worker chaining: agent -> edge worker (middle slice) -> cloud worker (the rest), on loopback.

The device runs resnet18 up to SPLIT, the edge worker [SPLIT, END) and forwards to the cloud
worker, which runs the rest; the edge returns the cloud's result to the agent. All daemons are
in-process aio servers on 127.0.0.1 port 0, on one event loop in a background thread (as in
test_worker); each test hands it a coroutine with a bound.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import grpc
import pytest
import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.contracts.errors import InvalidInput, NotFound, PermissionDenied
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.wire.chain import Hop
from runtime.wire.codec import get_codec
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(240)]

MODEL = "resnet18"
SPLIT = "add_2"  # device: input .. add_2 ([1, 128, 28, 28])
END = "add_6"  # edge: add_2 .. add_6 ([1, 512, 7, 7]); cloud: add_6 .. output
TIMEOUT = 120.0  # bound of one scenario
RPC_TIMEOUT = 30.0


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="chain-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = TIMEOUT):
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop).result(timeout + 5)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def addr(ws) -> str:
    return f"127.0.0.1:{ws.port}"


@pytest.fixture(scope="module")
def aio(one_torch_thread):
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def loaded(one_torch_thread):
    return load_model(MODEL)


@pytest.fixture(scope="module")
def images():
    return [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(3)]


@pytest.fixture(scope="module")
def expected(loaded, images):
    with torch.inference_mode():
        return [loaded.full(x).clone() for x in images]


@pytest.fixture(scope="module")
def refusing_address():
    """An address that refuses connections: a bound socket that never listens (held for the module)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture(scope="module")
def tiers(aio, refusing_address):
    """cloud (runs tails), edge (forwards to cloud), orphan (its only next tier is unreachable)."""

    async def start():
        cloud = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, preload=(f"{MODEL}@{END}",)))
        edge = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, max_concurrency=2,
                                        next_tiers=(addr(cloud),), forward_deadline_seconds=30.0))
        orphan = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, next_tiers=(refusing_address,),
                                          forward_connect_timeout_seconds=0.3, forward_reconnect_seconds=0.2))
        return {"cloud": cloud, "edge": edge, "orphan": orphan}

    ws = aio.run(start())
    yield ws
    for w in ws.values():
        aio.run(w.drain_and_stop(1.0))


async def run_agent(loaded, worker: str, images, codec="raw", **kw):
    agent = Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec(codec), worker=worker, **kw),
                  AgentOptions(deadline_seconds=60.0))
    try:
        await agent.start()
        return await asyncio.gather(*(agent.infer(x) for x in images))
    finally:
        await agent.close()


def sample(ws, name: str, labels: dict | None = None) -> float:
    return ws.service.metrics.registry.get_sample_value(name, labels or {}) or 0.0


def chained_header(**kw) -> pb.FrameHeader:
    fields = {"agent_id": "test", "model_id": MODEL, "split_id": SPLIT, "end_split": END}
    fields.update(kw)
    return pb.FrameHeader(**fields)


async def rpc_error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value


# -- results -----------------------------------------------------------------------------------


def test_raw_chain_equals_the_full_model_exactly(aio, tiers, loaded, images, expected):
    edge, cloud = tiers["edge"], tiers["cloud"]
    before = sample(edge, "edgesplit_worker_forwarded_frames_total", {"next_tier": addr(cloud), "code": "OK"})
    results = aio.run(run_agent(loaded, addr(edge), images, "raw", end_split=END,
                                next_hops=[Hop(addr(cloud), codec="raw")]))
    for r, want in zip(results, expected, strict=True):
        assert r.where == "edge", r.fallback_reason
        assert torch.equal(r.output, want)
        # per-hop timings: the edge's slice, its wait on the cloud, and the cloud's own stages
        assert r.times["edge_tail"] > 0 and r.times["next1_tail"] > 0
        assert r.times["edge_forward"] >= r.times["next1_round_trip"] > r.times["next1_tail"]
    after = sample(edge, "edgesplit_worker_forwarded_frames_total", {"next_tier": addr(cloud), "code": "OK"})
    assert after - before == len(images)  # forwarded frames counted on the middle worker
    assert sample(edge, "edgesplit_worker_forwarded_bytes_total", {"next_tier": addr(cloud)}) >= 4 * 512 * 7 * 7
    assert sample(cloud, "edgesplit_worker_frames_total", {"model": MODEL, "split": END, "tl": "none"}) >= len(images)


def test_int8_chain_is_close_and_default_next_tier_is_used(aio, tiers, loaded, images, expected):
    # no hop named: the edge sends to its first --next-tier, with the codec the agent asks for
    results = aio.run(run_agent(loaded, addr(tiers["edge"]), images, "int8", end_split=END,
                                next_hops=[Hop(codec="int8+lz4")]))
    for r, want in zip(results, expected, strict=True):
        assert r.where == "edge", r.fallback_reason
        assert r.output.argmax() == want.argmax()
        assert torch.allclose(r.output, want, atol=0.05 * float(want.abs().max()))
        assert not torch.equal(r.output, want)  # the lossy codecs did run


def test_two_forwards_along_a_longer_route(aio, tiers, loaded, images, expected):
    """agent -> edge [add_2, add_4) -> mid [add_4, add_6) -> cloud: hops pass the rest of the route on."""
    cloud = tiers["cloud"]

    async def scenario():
        mid = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, next_tiers=(addr(cloud),),
                                       forward_deadline_seconds=30.0))
        edge = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, next_tiers=(addr(mid),),
                                        forward_deadline_seconds=30.0))
        try:
            return await run_agent(loaded, addr(edge), images[:1], "raw", end_split="add_4",
                                   next_hops=[f"{addr(mid)}@{END}", Hop(addr(cloud), codec="raw")])
        finally:
            await edge.drain_and_stop(1.0)
            await mid.drain_and_stop(1.0)

    (r,) = aio.run(scenario())
    assert r.where == "edge", r.fallback_reason
    assert torch.equal(r.output, expected[0])  # edge -> mid in raw+lz4 (the default), mid -> cloud raw
    assert r.times["next1_tail"] > 0 and r.times["next2_tail"] > 0


# -- failures ----------------------------------------------------------------------------------


def test_next_tier_down_falls_back_with_a_reason(aio, tiers, loaded, images, expected, refusing_address):
    orphan = tiers["orphan"]
    results = aio.run(run_agent(loaded, addr(orphan), images, "raw", end_split=END))
    assert [r.seq for r in results] == list(range(len(images)))  # exactly one result per frame
    for r, want in zip(results, expected, strict=True):
        assert r.where == "local"
        assert "UNAVAILABLE" in r.fallback_reason and f"next tier {refusing_address}" in r.fallback_reason
        assert torch.equal(r.output, want)
    assert sample(orphan, "edgesplit_worker_forwarded_frames_total",
                  {"next_tier": refusing_address, "code": "UNAVAILABLE"}) >= 1


def test_forward_to_an_address_not_allowed_is_refused(aio, tiers, loaded, images, expected):
    edge, cloud = tiers["edge"], tiers["cloud"]
    intruder = "10.255.255.1:50051"

    async def scenario():
        async with grpc.aio.insecure_channel(addr(edge)) as ch:
            stub = pb_grpc.InferenceStub(ch)
            h = chained_header(next_hops=[pb.Hop(address=intruder)])
            err = await rpc_error(stub.Prepare(pb.PrepareRequest(header=h), timeout=RPC_TIMEOUT))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert intruder in err.details() and "--next-tier" in err.details() and addr(cloud) in err.details()
            with torch.inference_mode():
                feat = loaded.head(SPLIT)(images[0])
            err = await rpc_error(stub.Infer(pb.InferRequest(header=h, tensor=get_codec("raw").encode(feat)),
                                             timeout=RPC_TIMEOUT))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            # the allowed next tier is prepared along the route and named in the answer
            ok = await stub.Prepare(pb.PrepareRequest(header=chained_header()), timeout=RPC_TIMEOUT)
            assert ok.next_tier == addr(cloud) and list(ok.input_shape) == [1, 128, 28, 28]
        # a worker with no next tier at all: FAILED_PRECONDITION, naming the flag
        async with grpc.aio.insecure_channel(addr(cloud)) as ch:
            err = await rpc_error(pb_grpc.InferenceStub(ch).Prepare(pb.PrepareRequest(header=chained_header()),
                                                                    timeout=RPC_TIMEOUT))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "--next-tier" in err.details()
        # on the agent: a plan naming that hop is refused; frames sent that way run locally
        agent = Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec("raw"), worker=addr(edge)), AgentOptions(deadline_seconds=60.0))
        try:
            await agent.start()
            with pytest.raises(PermissionDenied, match="plan v1 refused"):
                await agent.apply_plan(SPLIT, "raw", None, 1, end_split=END, next_hops=[intruder])
            assert agent.active.end_split == ""
        finally:
            await agent.close()
        return await run_agent(loaded, addr(edge), images[:1], "raw", end_split=END, next_hops=[intruder])

    (r,) = aio.run(scenario())
    assert r.where == "local" and "PERMISSION_DENIED" in r.fallback_reason
    assert torch.equal(r.output, expected[0])


@pytest.mark.parametrize("end_split, code, phrase", [
    ("conv1", grpc.StatusCode.INVALID_ARGUMENT, "is not after split"),  # before the split
    (SPLIT, grpc.StatusCode.INVALID_ARGUMENT, "is not after split"),  # an empty slice
    ("no_such_layer", grpc.StatusCode.NOT_FOUND, "has no split point"),
])
def test_mismatched_end_split_is_refused(aio, tiers, loaded, images, end_split, code, phrase):
    with torch.inference_mode():
        feat = loaded.head(SPLIT)(images[0])

    async def scenario():
        async with grpc.aio.insecure_channel(addr(tiers["edge"])) as ch:
            stub = pb_grpc.InferenceStub(ch)
            h = chained_header(end_split=end_split)
            err = await rpc_error(stub.Prepare(pb.PrepareRequest(header=h), timeout=RPC_TIMEOUT))
            assert err.code() == code and phrase in err.details(), err.details()
            # on the stream: an error result for that frame, and the stream lives on
            call = stub.InferStream(timeout=RPC_TIMEOUT)
            await call.write(pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(
                agent_id="test", seq=1, model_id=MODEL, split_id=SPLIT, end_split=end_split),
                tensor=get_codec("raw").encode(feat))))
            await call.write(pb.StreamRequest(frame=pb.InferRequest(header=chained_header(seq=2),
                                                                    tensor=get_codec("raw").encode(feat))))
            await call.done_writing()
            return {r.header.seq: r async for r in call}

    results = aio.run(scenario())
    assert results[1].code == code.value[0] and phrase in results[1].message
    assert results[2].code == 0 and len(results[2].hops) == 1 and results[2].hops[0].split_id == END
    # the agent refuses such a route before sending anything
    with pytest.raises(InvalidInput if code == grpc.StatusCode.INVALID_ARGUMENT else NotFound, match=phrase):
        Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec("raw"), worker=addr(tiers["edge"]), end_split=end_split))


def test_hops_without_an_end_split_are_invalid(aio, tiers, loaded):
    async def scenario():
        async with grpc.aio.insecure_channel(addr(tiers["edge"])) as ch:
            h = chained_header(end_split="", next_hops=[pb.Hop(address=addr(tiers["cloud"]))])
            return await rpc_error(pb_grpc.InferenceStub(ch).Prepare(pb.PrepareRequest(header=h), timeout=RPC_TIMEOUT))

    err = aio.run(scenario())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "end_split" in err.details()


def test_route_flags_and_config_are_checked():
    from runtime.agent.config import AgentConfig
    from runtime.agent.run import next_hops

    assert Hop.parse("cloud:50052@add_6", "int8") == Hop("cloud:50052", "add_6", "int8")
    assert Hop.parse("cloud:50052") == Hop("cloud:50052")
    cfg = AgentConfig(end_split=END, forward_codec="int8+lz4")
    assert next_hops(cfg) == (Hop(codec="int8+lz4"),)  # the worker's first --next-tier, with that codec
    with pytest.raises(InvalidInput, match="end-split"):
        AgentConfig(next_hops=("cloud:50052",))
    with pytest.raises(InvalidInput, match="unknown codec"):
        WorkerConfig(forward_codec="zip")
    with pytest.raises(InvalidInput, match="Transfer Layer"):
        WorkerConfig(forward_codec="ans")  # entropy coding needs a TL's model: not between workers
