"""Transport security: mTLS with a site CA made here, bearer tokens, role checks, secure-by-default binds.

Every daemon goes through runtime.daemon.server.Daemon, so the scaffold is tested with a small
counting Inference servicer under the worker's and the planner's policies; one end-to-end test
runs a real worker and agent (digits_cnn) over mTLS. Each refusal is checked with the handler's
own call count (0) and the interceptor's rejection counter.
"""

from __future__ import annotations

import asyncio
import datetime
import os

import grpc
import pytest

from planner.server import AUTH_POLICY as PLANNER_POLICY
from runtime.contracts.errors import InvalidInput
from runtime.daemon.auth import current_identity
from runtime.daemon.server import Daemon, DaemonOptions
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.tools import pki
from runtime.wire.security import SecurityOptions, check_bind, is_loopback, token_digest
from runtime.wire.transport import TransportOptions
from runtime.worker.server import AUTH_POLICY as WORKER_POLICY

pytestmark = pytest.mark.timeout(120)
RPC = 5.0  # deadline of each call


class Counting(pb_grpc.InferenceServicer):
    """Prepare answers with the caller's identity as the model digest; counts the calls that got here."""

    def __init__(self):
        self.calls = 0

    async def Prepare(self, request, context):
        self.calls += 1
        ident = current_identity()
        return pb.PrepareResult(model_digest=f"{ident.role}/{ident.id}/{ident.via}")


class CountingPlanner(ppb_grpc.PlannerServicer):
    def __init__(self):
        self.calls = 0

    async def RegisterWorker(self, request, context):
        self.calls += 1
        return ppb.RegisterWorkerReply()


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = pki.make_ca()
    pki.write(ca, d, "ca")
    pki.write(pki.issue(ca, "worker", "w1", ("127.0.0.1", "localhost")), d, "worker-w1")
    pki.write(pki.issue(ca, "agent", "a1"), d, "agent-a1")
    pki.write(pki.issue(ca, "operator", "alice"), d, "operator-alice")
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    pki.write(pki.issue(ca, "agent", "old", days=1, not_before=old), d, "agent-expired")
    other = pki.make_ca("another CA")
    pki.write(other, d, "other-ca")
    pki.write(pki.issue(other, "agent", "a1"), d, "stranger")
    return d


def creds(d, stem: str = "", ca: str = "ca", **kw) -> SecurityOptions:
    cert = dict(cert_file=str(d / f"{stem}.pem"), key_file=str(d / f"{stem}.key")) if stem else {}
    return SecurityOptions(ca_file=str(d / f"{ca}.pem") if ca else "", **cert, **kw)


async def start(security: SecurityOptions, servicer=None, policy=WORKER_POLICY, listen="127.0.0.1:0"):
    servicer = servicer or Counting()
    adder = (pb_grpc.add_InferenceServicer_to_server if isinstance(servicer, Counting)
             else ppb_grpc.add_PlannerServicer_to_server)
    daemon = Daemon(DaemonOptions(listen=listen, transport=TransportOptions(security=security), reflection=False,
                                  auth_policy=policy))
    await daemon.start(lambda server: adder(servicer, server))
    return daemon, servicer


async def prepare(daemon: Daemon, security: SecurityOptions) -> str:
    async with TransportOptions(security=security).aio_channel(f"127.0.0.1:{daemon.port}") as ch:
        reply = await pb_grpc.InferenceStub(ch).Prepare(pb.PrepareRequest(), timeout=RPC)
        return reply.model_digest


async def code_of(coro) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro
    return info.value.code()


def test_mtls_admits_site_certificates_and_exposes_the_identity(pki_dir):
    async def go():
        daemon, servicer = await start(creds(pki_dir, "worker-w1"))
        try:
            assert await prepare(daemon, creds(pki_dir, "agent-a1")) == "agent/a1/cert"
            assert await prepare(daemon, creds(pki_dir, "operator-alice")) == "operator/alice/cert"
            assert servicer.calls == 2 and daemon.auth.admitted == 2
        finally:
            await daemon.drain(0.5)

    asyncio.run(go())


@pytest.mark.parametrize("client", ["no certificate", "wrong CA", "expired", "plain channel"])
def test_mtls_refuses_at_the_handshake_with_no_handler_call(pki_dir, client):
    security = {"no certificate": creds(pki_dir), "wrong CA": creds(pki_dir, "stranger"),
                "expired": creds(pki_dir, "agent-expired"), "plain channel": SecurityOptions()}[client]

    async def go():
        daemon, servicer = await start(creds(pki_dir, "worker-w1"))
        try:
            assert await code_of(prepare(daemon, security)) == grpc.StatusCode.UNAVAILABLE
            assert servicer.calls == 0 and daemon.auth.admitted == 0
        finally:
            await daemon.drain(0.5)

    asyncio.run(go())


def test_client_refuses_a_server_of_another_ca(pki_dir):
    async def go():
        daemon, servicer = await start(creds(pki_dir, "worker-w1"))
        try:
            wrong_trust = creds(pki_dir, "agent-a1", ca="other-ca")
            assert await code_of(prepare(daemon, wrong_trust)) == grpc.StatusCode.UNAVAILABLE
            assert servicer.calls == 0
        finally:
            await daemon.drain(0.5)

    asyncio.run(go())


def test_wrong_role_is_refused_before_the_handler(pki_dir):
    async def go():
        daemon, servicer = await start(creds(pki_dir, "worker-w1"), CountingPlanner(), PLANNER_POLICY)
        try:
            async def register(security):
                async with TransportOptions(security=security).aio_channel(f"127.0.0.1:{daemon.port}") as ch:
                    return await ppb_grpc.PlannerStub(ch).RegisterWorker(ppb.RegisterWorkerRequest(), timeout=RPC)

            assert await code_of(register(creds(pki_dir, "agent-a1"))) == grpc.StatusCode.PERMISSION_DENIED
            assert servicer.calls == 0 and daemon.auth.rejected["role"] == 1
            await register(creds(pki_dir, "worker-w1"))
            assert servicer.calls == 1
        finally:
            await daemon.drain(0.5)

    asyncio.run(go())


@pytest.fixture()
def tokens(tmp_path):
    good = "g" * 32
    table = tmp_path / "tokens"
    table.write_text(f"# role subject sha256\nagent a7 {token_digest(good)}\n")
    files = {}
    for name, value in (("good", good), ("bad", "b" * 32)):
        files[name] = tmp_path / f"{name}.token"
        files[name].write_text(value + "\n")
    return table, files


@pytest.mark.parametrize("server_tls", [True, False], ids=["tls", "loopback"])
def test_tokens_missing_or_bad_are_unauthenticated(pki_dir, tokens, server_tls):
    table, files = tokens
    server = (SecurityOptions(cert_file=str(pki_dir / "worker-w1.pem"), key_file=str(pki_dir / "worker-w1.key"),
                              tokens_file=str(table)) if server_tls else SecurityOptions(tokens_file=str(table)))
    ca = str(pki_dir / "ca.pem") if server_tls else ""

    async def go():
        daemon, servicer = await start(server)
        try:
            assert await prepare(daemon, SecurityOptions(ca_file=ca, token_file=str(files["good"]))) == "agent/a7/token"
            bad = SecurityOptions(ca_file=ca, token_file=str(files["bad"]))
            assert await code_of(prepare(daemon, bad)) == grpc.StatusCode.UNAUTHENTICATED
            assert await code_of(prepare(daemon, SecurityOptions(ca_file=ca))) == grpc.StatusCode.UNAUTHENTICATED
            assert servicer.calls == 1
            assert daemon.auth.rejected == {"bad_token": 1, "missing": 1}
        finally:
            await daemon.drain(0.5)

    asyncio.run(go())


def test_a_token_never_travels_in_clear_to_a_network_address(tokens):
    _, files = tokens
    with pytest.raises(InvalidInput, match="in clear"):
        TransportOptions(security=SecurityOptions(token_file=str(files["good"]))).aio_channel("10.1.2.3:50051")


def test_server_certificates_reload_without_restart(pki_dir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    for stem in ("ca", "worker-w1"):
        for ext in ("pem", "key"):
            (live / f"{stem}.{ext}").write_bytes((pki_dir / f"{stem}.{ext}").read_bytes())

    async def go():
        daemon, _ = await start(creds(live, "worker-w1"))
        try:
            assert await prepare(daemon, creds(pki_dir, "agent-a1")) == "agent/a1/cert"
            new_ca = pki.make_ca("rotated CA")
            pki.write(new_ca, live, "ca")
            pki.write(pki.issue(new_ca, "worker", "w1", ("127.0.0.1",)), live, "worker-w1")
            pki.write(pki.issue(new_ca, "agent", "a2"), tmp_path, "agent-a2")
            later = os.path.getmtime(live / "ca.pem") + 5
            for name in ("ca.pem", "worker-w1.pem", "worker-w1.key"):
                os.utime(live / name, (later, later))
            assert await prepare(daemon, creds(tmp_path, "agent-a2", ca=str(live / "ca"))) == "agent/a2/cert"
            assert await code_of(prepare(daemon, creds(pki_dir, "agent-a1"))) == grpc.StatusCode.UNAVAILABLE
        finally:
            await daemon.drain(0.5)

    asyncio.run(go())


def test_loopback_binds_need_nothing_network_binds_need_tls_or_insecure(pki_dir):
    assert is_loopback("127.0.0.1:1") and is_loopback("[::1]:1") and is_loopback("unix:/tmp/x.sock")
    assert is_loopback("localhost:5") and not is_loopback("0.0.0.0:1") and not is_loopback("10.0.0.1:1")
    assert check_bind("127.0.0.1:0", SecurityOptions()) is False
    with pytest.raises(InvalidInput, match="--insecure"):
        check_bind("0.0.0.0:0", SecurityOptions())
    assert check_bind("0.0.0.0:0", SecurityOptions(insecure=True)) is True
    assert check_bind("0.0.0.0:0", creds(pki_dir, "worker-w1")) is False

    async def go():
        with pytest.raises(InvalidInput, match="without TLS"):
            await start(SecurityOptions(), listen="0.0.0.0:0")
        daemon, _ = await start(SecurityOptions(insecure=True), listen="0.0.0.0:0")
        try:
            assert daemon.insecure_bind._value.get() == 1
        finally:
            await daemon.drain(0.5)

    asyncio.run(go())


def test_certs_cli_writes_a_working_pki(tmp_path):
    from runtime.cli.main import main

    assert main(["certs", "ca", "--out", str(tmp_path)]) == 0
    assert main(["certs", "issue", "--ca-dir", str(tmp_path), "--role", "worker", "--id", "w9",
                 "--host", "127.0.0.1"]) == 0
    assert main(["certs", "issue", "--ca-dir", str(tmp_path), "--role", "agent", "--id", "a9"]) == 0
    assert main(["certs", "token", "--role", "operator", "--id", "bob", "--out", str(tmp_path / "bob.token"),
                 "--tokens-file", str(tmp_path / "tokens")]) == 0
    assert oct(os.stat(tmp_path / "worker-w9.key").st_mode & 0o777) == "0o600"

    async def go():
        daemon, _ = await start(creds(tmp_path, "worker-w9", tokens_file=str(tmp_path / "tokens")))
        try:
            assert await prepare(daemon, creds(tmp_path, "agent-a9")) == "agent/a9/cert"
        finally:
            await daemon.drain(0.5)

    asyncio.run(go())


def test_agent_and_worker_over_mtls_end_to_end(pki_dir):
    """A real worker with mTLS: the site agent's frames run on the edge; a stranger's run locally, unseen."""
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.models.loader import load_model
    from runtime.wire.codec import get_codec
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    torch.set_num_threads(1)
    loaded = load_model("digits_cnn")
    images = [torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    w = pki_dir
    config = WorkerConfig(listen="127.0.0.1:0", torch_threads=1, ca_file=str(w / "ca.pem"),
                          cert_file=str(w / "worker-w1.pem"), key_file=str(w / "worker-w1.key"))

    async def run(ws, security):
        plan = InitialPlan(loaded.split("pool1"), get_codec("raw"), worker=f"127.0.0.1:{ws.port}")
        agent = Agent(loaded, plan, AgentOptions(transport=TransportOptions(security=security), deadline_seconds=30.0,
                                                 connect_timeout=2.0))
        try:
            await agent.start()
            return await asyncio.gather(*(agent.infer(x) for x in images))
        finally:
            await agent.close()

    async def go():
        ws = await serve(config)
        try:
            site = await run(ws, creds(w, "agent-a1"))
            assert [r.where for r in site] == ["edge"] * 3
            admitted = ws.daemon.auth.admitted
            stranger = await run(ws, creds(w, "stranger"))
            assert [r.where for r in stranger] == ["local"] * 3
            assert ws.daemon.auth.admitted == admitted  # the stranger's stream never reached a handler
            for a, b in zip(site, stranger, strict=True):
                assert a.top1()[0] == b.top1()[0]
        finally:
            await ws.drain_and_stop(0.5)

    asyncio.run(go())


def test_health_check_cli_reaches_an_mtls_daemon_with_the_client_flags(pki_dir, capsys):
    from runtime.cli.main import main

    async def go():
        daemon, _ = await start(creds(pki_dir, "worker-w1"))
        try:
            address = f"127.0.0.1:{daemon.port}"
            plain = await asyncio.to_thread(main, ["health-check", address, "--timeout", "2"])
            flags = ["--ca-file", str(pki_dir / "ca.pem"), "--cert-file", str(pki_dir / "operator-alice.pem"),
                     "--key-file", str(pki_dir / "operator-alice.key")]
            secured = await asyncio.to_thread(main, ["health-check", address, "--timeout", "5", *flags])
            return plain, secured
        finally:
            await daemon.drain(0.5)

    plain, secured = asyncio.run(go())
    assert plain == 2 and secured == 0
    assert "SERVING" in capsys.readouterr().out


def test_the_local_api_on_loopback_stays_plain_for_an_agent_with_certificates(pki_dir):
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.agent.local_api import serve_local_api
    from runtime.models.loader import load_model
    from runtime.proto.edgesplit.v1 import agent_pb2, agent_pb2_grpc
    from runtime.wire.codec import get_codec

    loaded = load_model("digits_cnn")

    async def go():
        agent = Agent(loaded, InitialPlan(loaded.split("pool1"), get_codec("raw")),
                      AgentOptions(transport=TransportOptions(security=creds(pki_dir, "agent-a1"))))
        await agent.start()
        api = await serve_local_api(agent, "127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(api.address) as ch:
                x = get_codec("raw").encode(torch.zeros(1, 3, 28, 28))
                return await agent_pb2_grpc.AgentStub(ch).Submit(agent_pb2.SubmitRequest(tensor=x), timeout=30.0)
        finally:
            await api.stop(0.5)
            await agent.close()

    assert asyncio.run(go()).where == "local"


def test_an_agent_without_an_id_takes_its_certificates(pki_dir):
    """An authenticated worker accepts frames only for the caller's own agent_id, so an agent started
    without --agent-id names the id of its agent certificate; a certificate of another role, or none,
    leaves hostname-pid."""
    import os
    import socket

    from runtime.agent.config import default_agent_id
    from runtime.wire.security import certificate_identity

    assert certificate_identity(str(pki_dir / "agent-a1.pem")) == ("agent", "a1")
    assert certificate_identity(str(pki_dir / "worker-w1.pem")) == ("worker", "w1")
    assert certificate_identity("") is None
    assert default_agent_id(str(pki_dir / "agent-a1.pem")) == "a1"
    fallback = f"{socket.gethostname()}-{os.getpid()}"
    assert default_agent_id(str(pki_dir / "worker-w1.pem")) == default_agent_id() == fallback
    with pytest.raises(InvalidInput, match="cert_file"):
        certificate_identity(str(pki_dir / "missing.pem"))
