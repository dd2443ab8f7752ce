"""Every RPC a daemon serves has an entry in its role policy: a method left out would be open to
any authenticated role (runtime.daemon.auth allows what the policy does not name)."""

from __future__ import annotations

import pytest

from planner.server import AUTH_POLICY as PLANNER_POLICY
from runtime.proto.edgesplit.v1 import inference_pb2, planner_pb2, tiles_pb2
from runtime.worker.server import AUTH_POLICY as WORKER_POLICY

pytestmark = pytest.mark.timeout(30)


def _methods(module, service: str) -> set[str]:
    return {m.name for m in module.DESCRIPTOR.services_by_name[service].methods}


def test_every_planner_rpc_has_a_role_policy():
    assert _methods(planner_pb2, "Planner") == set(PLANNER_POLICY)


def test_every_worker_rpc_has_a_role_policy():
    served = _methods(inference_pb2, "Inference") | _methods(tiles_pb2, "Tiles")
    assert served == set(WORKER_POLICY)
