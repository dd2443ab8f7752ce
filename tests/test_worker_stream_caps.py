"""Open InferStream calls are bounded at the worker (SECURITY.md, --max-streams-per-caller / --max-streams):
each holds a gRPC call, a task and queues, and an authenticated agent could open them without end. The
mechanism is the daemon scaffold's StreamSlots (runtime.daemon.streams), which the planner's ReportTelemetry
and WatchPlan use too; here it is checked alone, then on a real worker over mTLS with raw calls and with a
real agent that reconnects after its stream was ended."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from runtime.contracts.errors import Overloaded
from runtime.daemon.auth import ANONYMOUS, Identity
from runtime.daemon.streams import OLDEST_ENDED, TOTAL_REFUSED, StreamSlots, caller_key
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.wire.security import AGENT, OPERATOR, WORKER, SecurityOptions
from runtime.wire.transport import TransportOptions
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve
from tests.security_site import site  # noqa: F401 - the fixture

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(120)]
RPC = 30.0


def test_a_callers_newer_stream_ends_its_oldest_and_the_total_refuses_at_once():
    shed: list[str] = []
    slots = StreamSlots("S", 2, 4, roles=(AGENT,), on_shed=shed.append)
    ended: list[tuple[str, str]] = []
    held = []

    def open_(key, name):
        cm = slots.hold_key(key, lambda msg, n=name: ended.append((n, msg)))
        cm.__enter__()
        held.append(cm)

    open_("a1", "a1-0")
    open_("a1", "a1-1")
    open_("a2", "a2-0")
    open_("a1", "a1-2")  # a1's third: its oldest ends, a2's is untouched
    assert [n for n, _ in ended] == ["a1-0"] and "at most 2 S streams are kept per caller" in ended[0][1]
    assert (slots.open, slots.ended, slots.held("a1"), slots.held("a2")) == (4, 1, 2, 1)
    held.pop(0).__exit__(None, None, None)  # the ended stream's handler finishes: its count goes back
    assert slots.open == 3 and slots.held("a1") == 2
    open_(None, "anon")  # no key: the total only
    with pytest.raises(Overloaded, match="has 4 S streams open, its limit"):
        slots.hold_key("a1", lambda msg: None).__enter__()  # refused at once; a1's streams stay
    assert len(ended) == 1 and slots.held("a1") == 2 and slots.refused == 1
    assert shed == [OLDEST_ENDED, TOTAL_REFUSED]
    for cm in held:
        cm.__exit__(None, None, None)
    assert slots.open == 0 and slots.held("a1") == slots.held("a2") == 0


def test_the_caller_key_is_the_authenticated_identity_of_a_capped_role():
    roles = (AGENT, WORKER)
    assert caller_key(Identity(AGENT, "a1", "cert"), roles) == "cert:agent/a1"
    assert caller_key(Identity(AGENT, "a1", "token"), roles) == "token:agent/a1"  # another credential: its own count
    assert caller_key(Identity(WORKER, "w1", "cert"), roles) == "cert:worker/w1"
    assert caller_key(Identity(OPERATOR, "alice", "cert"), roles) is None  # operators: the total only
    assert caller_key(ANONYMOUS, roles) is None  # a worker without authentication (loopback): the total only


def _sec(site, stem: str) -> SecurityOptions:  # noqa: F811 - site is the fixture's value
    return SecurityOptions(ca_file=str(site / "ca.pem"), cert_file=str(site / f"{stem}.pem"),
                           key_file=str(site / f"{stem}.key"))


def _config(site, **kw) -> WorkerConfig:  # noqa: F811
    return WorkerConfig(listen="127.0.0.1:0", torch_threads=1, ca_file=str(site / "ca.pem"),
                        cert_file=str(site / "worker-w1.pem"), key_file=str(site / "worker-w1.key"), **kw)


async def _until(check, what: str) -> None:
    for _ in range(1000):  # bounded: 10 s
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def _status(call) -> grpc.aio.AioRpcError:
    try:
        while await asyncio.wait_for(call.read(), RPC) is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError("the stream ended OK")


async def _one_frame(call, agent_id: str, seq: int) -> pb.InferResult:
    """A frame on ``call`` the worker answers (an error result: a model that is not served), showing the stream works."""
    await call.write(pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(agent_id=agent_id, seq=seq,
                                                                                  model_id="none", split_id="x"))))
    return await asyncio.wait_for(call.read(), RPC)


def test_the_workers_streams_per_caller_and_in_all_are_bounded(site):  # noqa: F811
    """An agent's third stream (--max-streams-per-caller 2) ends its oldest RESOURCE_EXHAUSTED; another agent's
    stream is untouched and still answers; once --max-streams are open a new one is refused at once, ending
    nothing; the metric counts both."""

    async def go():
        ws = await serve(_config(site, max_streams_per_caller=2, max_streams=4))
        slots, shed = ws.service.stream_slots, ws.service.metrics.streams_shed
        address = f"127.0.0.1:{ws.port}"
        try:
            async with TransportOptions(security=_sec(site, "agent-a1")).aio_channel(address) as c1, \
                    TransportOptions(security=_sec(site, "agent-a2")).aio_channel(address) as c2:
                other = pb_grpc.InferenceStub(c2).InferStream(timeout=RPC)
                await _until(lambda: slots.open == 1, "a2's stream")
                mine = []
                for i in range(3):
                    mine.append(pb_grpc.InferenceStub(c1).InferStream(timeout=RPC))
                    await _until(lambda i=i: slots.open + slots.ended == i + 2, "a1's stream")
                err = await _status(mine[0])
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "at most 2 InferStream streams are kept per caller" in err.details()
                assert "--max-streams-per-caller" in err.details()
                assert (slots.open, slots.ended, slots.held("cert:agent/a1")) == (3, 1, 2)
                assert (await _one_frame(other, "a2", 1)).header.seq == 1  # untouched, and it answers
                assert (await _one_frame(mine[2], "a1", 2)).header.seq == 2
                mine.append(pb_grpc.InferenceStub(c2).InferStream(timeout=RPC))  # a2's second: 4 open, the total
                await _until(lambda: slots.open == 4, "the fourth stream")
                late = pb_grpc.InferenceStub(c1).InferStream(timeout=RPC)
                err = await _status(late)
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "4 InferStream streams open" in err.details()
                assert (slots.open, slots.ended, slots.refused) == (4, 1, 1)  # nobody's stream was ended for it
                assert shed.labels(OLDEST_ENDED)._value.get() == 1 and shed.labels(TOTAL_REFUSED)._value.get() == 1
                for call in (other, *mine[1:]):
                    call.cancel()
                await _until(lambda: slots.open == 0, "the streams' end")
        finally:
            await ws.drain_and_stop(0.5)

    asyncio.run(go())


def test_anonymous_callers_of_a_loopback_worker_count_in_the_total_only():
    """Without authentication there is no caller to count under (every stream of the host's processes would
    share one key): they count towards --max-streams only, and none ends another."""

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, max_streams_per_caller=1, max_streams=3))
        slots = ws.service.stream_slots
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                calls = [pb_grpc.InferenceStub(ch).InferStream(timeout=RPC) for _ in range(3)]
                await _until(lambda: slots.open == 3, "three streams")
                assert slots.ended == 0
                err = await _status(pb_grpc.InferenceStub(ch).InferStream(timeout=RPC))
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in err.details()
                for i, call in enumerate(calls):
                    assert (await _one_frame(call, "x", i)).header.seq == i
                    call.cancel()
        finally:
            await ws.drain_and_stop(0.5)

    asyncio.run(go())


def test_a_real_agent_gets_its_stream_and_reconnects_after_it_was_ended(site):  # noqa: F811
    """Two half-open streams of agent a1 are held (--max-streams-per-caller 2): the real agent under a1's
    certificate still gets a stream (its frames run on the edge) by ending the oldest. When two more of a1's
    streams end the agent's own, it reopens one after its back-off and its frames run on the edge again."""
    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.models.loader import load_model
    from runtime.wire.codec import get_codec

    loaded = load_model("digits_cnn")
    image = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))

    async def go():
        ws = await serve(_config(site, max_streams_per_caller=2))
        slots = ws.service.stream_slots
        address = f"127.0.0.1:{ws.port}"
        sec = _sec(site, "agent-a1")
        agent = Agent(loaded, InitialPlan(loaded.split("pool1"), get_codec("raw"), worker=address),
                      AgentOptions(transport=TransportOptions(security=sec), deadline_seconds=30.0, connect_timeout=5.0,
                                   reconnect=0.2))
        try:
            async with TransportOptions(security=sec).aio_channel(address) as ch:
                stale = []
                for i in range(2):
                    stale.append(pb_grpc.InferenceStub(ch).InferStream(timeout=RPC))
                    await _until(lambda i=i: slots.open == i + 1, "a stale stream")
                await agent.start()
                assert [(await agent.infer(image)).where for _ in range(3)] == ["edge"] * 3
                assert (await _status(stale[0])).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                epoch = agent.active.stream.epoch
                for _ in range(2):  # two newer a1 streams: the oldest two (the stale one, then the agent's) end
                    stale.append(pb_grpc.InferenceStub(ch).InferStream(timeout=RPC))
                    await _until(lambda: slots.open == 2 and slots.ended == len(stale) - 1, "a newer stream")
                await _until(lambda: not agent.active.stream.is_open, "the agent's stream to end")
                where = []
                for _ in range(100):  # bounded: until a frame runs on the edge again (after the back-off)
                    where.append((await agent.infer(image)).where)
                    if where[-1] == "edge":
                        break
                    await asyncio.sleep(0.05)
                assert where[-1] == "edge" and agent.active.stream.epoch == epoch + 1
                for call in stale:
                    call.cancel()
        finally:
            await agent.close()
            await ws.drain_and_stop(0.5)

    asyncio.run(go())
