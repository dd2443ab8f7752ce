"""Every authenticated endpoint, every way in without the right credentials (issue 10, "Tests (CI)"):
the real worker and planner daemons (in-process, on loopback), each under mTLS (with a CRL) and under
TLS + bearer tokens, called with no certificate, another CA's, an expired one, a revoked one, over
plain TCP, with a missing, unknown or wrong-role token, and with a certificate of the wrong role.
Each is refused at the handshake (UNAVAILABLE at the client) or with UNAUTHENTICATED /
PERMISSION_DENIED, and the daemon's own counter of calls that reached a handler stays at 0; one
valid call at the end shows the counter moves (the test can fail)."""

from __future__ import annotations

import asyncio
import datetime

import grpc
import pytest

from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.tools import pki
from runtime.wire.security import SecurityOptions, token_digest
from runtime.wire.transport import TransportOptions

pytestmark = pytest.mark.timeout(180)
RPC = 5.0
UNAVAILABLE, UNAUTHENTICATED, DENIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                                        grpc.StatusCode.PERMISSION_DENIED)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("site")
    ca = pki.make_ca()
    pki.write(ca, d, "ca")
    pki.write(pki.issue(ca, "worker", "server", ("127.0.0.1",)), d, "server")
    for role, ident in (("agent", "a1"), ("operator", "op"), ("planner", "p1"), ("agent", "revoked")):
        pki.write(pki.issue(ca, role, ident), d, f"{role}-{ident}")
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    pki.write(pki.issue(ca, "operator", "old", days=1, not_before=old), d, "expired")
    pki.write(pki.issue(pki.make_ca("another CA"), "operator", "op"), d, "stranger")
    pki.revoke(ca, d / "crl.pem", [(d / "agent-revoked.pem").read_bytes()])
    lines = []
    for role, ident in (("agent", "a1"), ("operator", "op"), ("planner", "p1")):
        token = f"{role}-{ident}-" + "x" * 30
        (d / f"{role}-{ident}.token").write_text(token)
        lines.append(f"{role} {ident} {token_digest(token)}")
    (d / "unknown.token").write_text("y" * 40)
    (d / "tokens").write_text("\n".join(lines) + "\n")
    return d


def server_settings(d, mode: str) -> dict:
    tls = dict(cert_file=str(d / "server.pem"), key_file=str(d / "server.key"))
    if mode == "mtls":
        return dict(ca_file=str(d / "ca.pem"), crl_file=str(d / "crl.pem"), **tls)
    return dict(tokens_file=str(d / "tokens"), **tls)


def client(d, cert: str = "", token: str = "", ca: str = "ca") -> SecurityOptions:
    kw = dict(cert_file=str(d / f"{cert}.pem"), key_file=str(d / f"{cert}.key")) if cert else {}
    return SecurityOptions(ca_file=str(d / f"{ca}.pem") if ca else "", token_file=str(d / f"{token}.token") if token else "",
                           **kw)


# endpoint -> (the caller that may call the checked method, one whose role may not)
ENDPOINTS = {"worker": ("agent-a1", "planner-p1"), "planner": ("operator-op", "agent-a1")}


def cases(d, mode: str, endpoint: str) -> list[tuple[str, SecurityOptions, grpc.StatusCode]]:
    wrong_role = ENDPOINTS[endpoint][1]
    if mode == "mtls":
        return [("no certificate", client(d), UNAVAILABLE),
                ("another CA", client(d, "stranger"), UNAVAILABLE),
                ("expired", client(d, "expired"), UNAVAILABLE),
                ("plain TCP", SecurityOptions(), UNAVAILABLE),
                ("revoked", client(d, "agent-revoked"), UNAUTHENTICATED),
                ("wrong role", client(d, wrong_role), DENIED)]
    return [("missing token", client(d), UNAUTHENTICATED),
            ("unknown token", client(d, token="unknown"), UNAUTHENTICATED),
            ("plain TCP", SecurityOptions(), UNAVAILABLE),
            ("wrong-role token", client(d, token=wrong_role), DENIED)]


async def start(endpoint: str, settings: dict, tmp_path):
    if endpoint == "worker":
        from runtime.worker.config import WorkerConfig
        from runtime.worker.server import serve

        handle = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, **settings))
    else:
        from planner.config import PlannerConfig
        from planner.server import serve

        handle = await serve(PlannerConfig(listen="127.0.0.1:0", db=str(tmp_path / "p.sqlite"), **settings))
    return handle


async def call(endpoint: str, port: int, security: SecurityOptions) -> None:
    async with TransportOptions(security=security).aio_channel(f"127.0.0.1:{port}") as ch:
        if endpoint == "worker":
            await pb_grpc.InferenceStub(ch).Prepare(
                pb.PrepareRequest(header=pb.FrameHeader(model_id="digits_cnn", split_id="pool1")), timeout=RPC)
        else:
            await ppb_grpc.PlannerStub(ch).ListAgents(ppb.ListAgentsRequest(), timeout=RPC)


@pytest.mark.parametrize("mode", ["mtls", "tls+tokens"])
@pytest.mark.parametrize("endpoint", ["worker", "planner"])
def test_every_way_in_without_the_right_credentials_is_refused_before_any_handler(site, tmp_path, endpoint, mode):
    async def go():
        handle = await start(endpoint, server_settings(site, mode), tmp_path)
        auth = handle.daemon.auth
        try:
            seen = {}
            for name, security, _ in cases(site, mode, endpoint):
                try:
                    await call(endpoint, handle.port, security)
                    seen[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    seen[name] = e.code()
            refused_admitted, rejected = auth.admitted, dict(auth.rejected)
            good = ENDPOINTS[endpoint][0]
            await call(endpoint, handle.port, client(site, good) if mode == "mtls" else client(site, token=good))
            return seen, refused_admitted, rejected, auth.admitted
        finally:
            await handle.drain_and_stop(0.5)

    seen, refused_admitted, rejected, admitted = asyncio.run(go())
    assert seen == {name: code for name, _, code in cases(site, mode, endpoint)}
    assert refused_admitted == 0  # no refused call reached a handler
    expected = {"mtls": {"revoked": 1, "role": 1}, "tls+tokens": {"missing": 1, "bad_token": 1, "role": 1}}[mode]
    assert rejected == expected
    assert admitted == 1


def test_the_agents_local_api_on_a_network_address_refuses_every_way_in_without_a_site_certificate(site):
    """On a network address the local API serves TLS with the agent's own certificate and requires
    client certificates of the site CA (on loopback and unix: it is plain by design)."""
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.agent.local_api import serve_local_api
    from runtime.models.loader import load_model
    from runtime.proto.edgesplit.v1 import agent_pb2, agent_pb2_grpc
    from runtime.wire.codec import get_codec

    loaded = load_model("digits_cnn")
    own = SecurityOptions(ca_file=str(site / "ca.pem"), cert_file=str(site / "server.pem"),
                          key_file=str(site / "server.key"), crl_file=str(site / "crl.pem"))
    refused = [("no certificate", client(site), UNAVAILABLE), ("another CA", client(site, "stranger"), UNAVAILABLE),
               ("expired", client(site, "expired"), UNAVAILABLE), ("plain TCP", SecurityOptions(), UNAVAILABLE),
               ("revoked", client(site, "agent-revoked"), UNAUTHENTICATED)]

    async def submit(port: int, security: SecurityOptions):
        async with TransportOptions(security=security).aio_channel(f"127.0.0.1:{port}") as ch:
            x = get_codec("raw").encode(torch.zeros(1, 3, 28, 28))
            return await agent_pb2_grpc.AgentStub(ch).Submit(agent_pb2.SubmitRequest(tensor=x), timeout=30.0)

    async def go():
        agent = Agent(loaded, InitialPlan(loaded.split("pool1"), get_codec("raw")),
                      AgentOptions(transport=TransportOptions(security=own)))
        await agent.start()
        api = await serve_local_api(agent, "0.0.0.0:0")  # a network bind: TLS, or it would be refused
        port = int(api.address.rsplit(":", 1)[1])
        try:
            seen = {}
            for name, security, _ in refused:
                try:
                    await submit(port, security)
                    seen[name] = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    seen[name] = e.code()
            before = api.daemon.auth.admitted
            reply = await submit(port, client(site, "agent-a1"))
            return seen, before, api.daemon.auth.admitted, reply.where
        finally:
            await api.stop(0.5)
            await agent.close()

    seen, before, after, where = asyncio.run(go())
    assert seen == {name: code for name, _, code in refused}
    assert before == 0 and after == 1 and where == "local"


@pytest.mark.parametrize("mode", ["mtls", "tls+tokens"])
def test_an_agent_names_only_its_own_agent_id_at_the_worker(site, tmp_path, mode):
    """SECURITY.md: an agent sends frames for its own agent_id only. On an authenticated worker, agent a1's
    header naming a2 is refused PERMISSION_DENIED with the flag to fix it (its frames, its cancels and its
    halo tiles are keyed by that id); its own id, no id, and an operator naming any id are served."""

    async def prepare(security: SecurityOptions, agent_id: str) -> None:
        async with TransportOptions(security=security).aio_channel(f"127.0.0.1:{handle.port}") as ch:
            await pb_grpc.InferenceStub(ch).Prepare(pb.PrepareRequest(header=pb.FrameHeader(
                agent_id=agent_id, model_id="digits_cnn", split_id="pool1")), timeout=RPC)

    async def main():
        nonlocal handle
        handle = await start("worker", server_settings(site, mode), tmp_path)
        try:
            a1 = client(site, "agent-a1") if mode == "mtls" else client(site, token="agent-a1")
            op = client(site, "operator-op") if mode == "mtls" else client(site, token="operator-op")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await prepare(a1, "a2")
            assert e.value.code() == DENIED and "--agent-id a1" in e.value.details()
            for security, agent_id in ((a1, "a1"), (a1, ""), (op, "a2")):
                await prepare(security, agent_id)
        finally:
            await handle.drain_and_stop(0.5)

    handle = None
    asyncio.run(asyncio.wait_for(main(), 120))
