"""Profile input limits (runtime.contracts.profile.parse_strict): every abuse from issue 10 is
INVALID_ARGUMENT with a message naming the limit, at the planner's RPCs too, and nothing is stored."""

from __future__ import annotations

import json

import grpc
import pytest
from planner_helpers import DEVICE_PROFILE, EDGE_PROFILE, MODEL, RPC, check_status, rpc_error

from runtime.contracts import profile as profiles
from runtime.contracts.errors import InvalidInput
from runtime.proto.edgesplit.v1 import planner_pb2 as pb

pytestmark = pytest.mark.timeout(120)


def edited(text: str, edit) -> str:
    d = json.loads(text)
    edit(d)
    return json.dumps(d)


def set_in(path, value_text: str):
    """A document whose field at ``path`` holds ``value_text`` verbatim (JSON that json.dumps cannot write)."""
    def build(text: str) -> str:
        d = json.loads(text)
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = "__HOLE__"
        return json.dumps(d).replace('"__HOLE__"', value_text)
    return build


ABUSES = {
    "integer 10^400 in a block": (set_in(("blocks", 0, "output_bytes"), "1" + "0" * 400), "outside"),
    "integer 10^400 as input_bytes": (set_in(("input_bytes",), "1" + "0" * 400), "outside"),
    "1e400 seconds": (set_in(("blocks", 1, "seconds"), "1e400"), "outside"),
    "NaN p95_seconds": (set_in(("blocks", 0, "p95_seconds"), "NaN"), "NaN"),
    "Infinity in settings": (set_in(("settings",), '{"runs": Infinity}'), "Infinity"),
    "NaN fidelity": (set_in(("input_transfers",), '[{"name": "raw", "bytes": 1, "fidelity": NaN}]'), "NaN"),
    "nested 10,000 deep": (set_in(("settings",), "[" * 10_000 + "]" * 10_000), "nested deeper"),
    "nested 20 deep": (set_in(("settings",), '{"a":' * 20 + "1" + "}" * 20), "nested deeper"),
    "99,000 blocks": (lambda text: edited(text, lambda d: d.update(blocks=d["blocks"] * 19_800)), "blocks is above"),
    "5,000 blocks": (lambda text: edited(text, lambda d: d.update(blocks=d["blocks"] * 1_000)), "blocks is above"),
}


@pytest.mark.parametrize("abuse", list(ABUSES))
def test_each_abuse_is_invalid_input_naming_the_limit(abuse):
    make, phrase = ABUSES[abuse]
    with pytest.raises(InvalidInput, match=phrase):
        profiles.loads(make(DEVICE_PROFILE))


def test_a_good_profile_still_loads():
    assert profiles.loads(DEVICE_PROFILE).model == MODEL


# 99,000 blocks of these profiles exceed the planner's 16 MiB message limit (RESOURCE_EXHAUSTED from gRPC)
@pytest.mark.parametrize("abuse", ["integer 10^400 as input_bytes", "nested 10,000 deep", "NaN p95_seconds",
                                   "5,000 blocks"])
def test_planner_answers_invalid_argument_and_stores_nothing(aio, planner, abuse):
    make, phrase = ABUSES[abuse]

    async def go():
        s = planner.stub
        err = await rpc_error(s.RegisterAgent(pb.RegisterAgentRequest(
            agent_id="bad", model_id=MODEL, model_digest="w1", profile_json=make(DEVICE_PROFILE)), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, phrase)
        err = await rpc_error(s.RegisterWorker(pb.RegisterWorkerRequest(
            worker_id="badw", address="127.0.0.1:1", tier="edge", profiles_json=[make(EDGE_PROFILE)]), timeout=RPC))
        check_status(err, grpc.StatusCode.INVALID_ARGUMENT, phrase)
        store = planner.ps.service.store
        assert "bad" not in store.agents() and "badw" not in store.workers()
        err = await rpc_error(s.QueryPlan(pb.PlanQuery(agent_id="bad"), timeout=RPC))
        assert err.code() == grpc.StatusCode.NOT_FOUND

    aio.run(go())
