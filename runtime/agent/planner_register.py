"""The agent's registration with its planner, at the start of each session (runtime.agent.planner_link).

A link's first registration sends the device profile document (``profile_json``, ~85 KB for an
EfficientNet). Every later one, a new session after the last one ended (the planner restarted, or
its replica died and the Service gave the new connection to another replica), names the profile
by its SHA-256 only (``profile_sha256``): a planner that parsed and checked that content accepts
it; one that did not answers FAILED_PRECONDITION ("profile unknown ... send it in profile_json"),
an older planner INVALID_ARGUMENT, and the document goes after all, on the same connection.

Why the last session ended makes no difference to where the next one goes: whatever failed in it
(UNAVAILABLE when its replica died, INTERNAL "Internal error from Core" on a telemetry stream whose
connection died under a write, FAILED_PRECONDITION when another replica took the agent, NOT_FOUND
when the planner forgot it) ends the whole session and closes its channel; the next session opens a
new channel to the planner's address and registers there first. No stream is ever reopened on the
old channel, so an agent never retries a dead replica by itself (tests/test_planner_replicas.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from runtime.contracts.errors import EdgesplitError
from runtime.daemon.planner_client import PlannerClient
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb

# what a planner answers a registration by hash when it does not take one: send the document then
RESEND_CODES = frozenset({"FAILED_PRECONDITION", "INVALID_ARGUMENT"})


def register_request(agent: Any, agent_id: str, profile_json: str, profile_sha256: str, workers: tuple[str, ...],
                     tl_ids: list[str], constraints: ppb.Constraints, light: bool = False) -> ppb.RegisterAgentRequest:
    """A RegisterAgentRequest: with the profile document, or (``light``) naming it by its SHA-256 only."""
    return ppb.RegisterAgentRequest(
        agent_id=agent_id, model_id=agent.loaded.name, model_digest=agent.loaded.digest,
        profile_json="" if light else profile_json, profile_sha256=profile_sha256 if light else "",
        workers=list(workers), tl_ids=tl_ids, constraints=constraints)


def held_tls(agent: Any, only: tuple[str, ...] | None) -> list[str]:
    """The Transfer Layers the agent holds: ``only`` when given, else the loaded one and those of its tl_dir
    made for its model."""
    if only is not None:
        return list(only)
    ids = {agent.tl.tl_id} if agent.tl is not None else set()
    if agent.tl_dir:
        from runtime.transfer.artifact import list_tls

        ids |= {m["tl_id"] for m in list_tls(agent.tl_dir) if "error" not in m and m.get("model") == agent.loaded.name}
    return sorted(ids)


async def register(planner: PlannerClient, request: Callable[[bool], ppb.RegisterAgentRequest],
                   registered_before: bool) -> ppb.RegisterAgentReply:
    """Register on this session's connection: by hash when ``registered_before`` (then with the document
    if the planner asks for it), else with the document. Raises EdgesplitError (the session fails)."""
    try:
        return await planner.register_agent(request(registered_before))
    except EdgesplitError as e:
        if not registered_before or e.code.name not in RESEND_CODES:
            raise
    return await planner.register_agent(request(False))
