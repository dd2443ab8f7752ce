"""Issue 10, "Tests (CI)": each profile abuse gets INVALID_ARGUMENT *while health answers*. Parsing and
checking a profile run off the planner's event loop, so health checks sent while a large (4,096-block,
the limit) profile is being registered are answered before that registration ends, and abusive
profiles sent meanwhile are refused INVALID_ARGUMENT. The test counts answers (no timed assertion);
``python -m runtime.tools.abuse_check`` measures their latency (SECURITY.md)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from planner_helpers import RPC, aio, planner  # noqa: F401 (fixtures)

from runtime.contracts.profile import Block, Profile
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

pytestmark = pytest.mark.timeout(120)


def big_profile(role: str, blocks: int) -> str:
    bl = tuple(Block(index=i, name=f"b{i}", seconds=0.001, output_bytes=1000, first_layer=i, last_layer=i)
               for i in range(blocks))
    return Profile(machine="m", role=role, model="bignet", blocks=bl, input_bytes=1000).to_json()


def test_health_answers_while_a_large_profile_is_parsed_and_abuses_are_refused(aio, planner):  # noqa: F811
    good = big_profile("device", 21)
    abuses = {
        "integer 10^400": good.replace('"input_bytes": 1000', '"input_bytes": 1' + "0" * 400),
        "nested 10,000 deep": good.replace('"settings": {}', '"settings": ' + "[" * 10_000 + "]" * 10_000),
        "NaN": good.replace('"seconds": 0.001', '"seconds": NaN', 1),
        "4,097 blocks": big_profile("device", 4097),
    }
    assert all(text != good for text in abuses.values())

    async def go():
        health = health_pb2_grpc.HealthStub(planner.channel)
        big = pb.RegisterWorkerRequest(worker_id="big", address="127.0.0.1:1", tier="edge",
                                       profiles_json=[big_profile("edge", 4096)])
        registration = asyncio.ensure_future(planner.stub.RegisterWorker(big, timeout=60.0))
        answered, statuses = 0, set()
        while not registration.done():
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=RPC)
            statuses.add(reply.status)
            answered += 1 if not registration.done() else 0
        await registration
        codes = {}
        for name, text in abuses.items():
            try:
                await planner.stub.RegisterAgent(pb.RegisterAgentRequest(
                    agent_id=f"bad-{len(codes)}", model_id="bignet", profile_json=text), timeout=RPC)
                codes[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                codes[name] = e.code()
        return answered, statuses, codes, await planner.agents()

    answered, statuses, codes, agents = aio.run(go(), timeout=100)
    print(f"health checks answered during the 4,096-block registration: {answered}")
    assert answered >= 3, f"only {answered} health checks answered while the profile was parsed: the loop was blocked"
    assert statuses == {health_pb2.HealthCheckResponse.SERVING}
    assert codes == dict.fromkeys(abuses, grpc.StatusCode.INVALID_ARGUMENT)
    assert agents == {}
