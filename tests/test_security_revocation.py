"""Revoked client certificates (issue 10): a CRL (``--crl-file``) signed by the site CA, made in the
test with ``edgesplit certs revoke``; a revoked certificate is refused UNAUTHENTICATED before any
handler work (the handler's call count stays 0), the CRL is re-read when it changes, and a CRL not
signed by the site CA is refused at start."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from runtime.cli.main import main as cli
from runtime.contracts.errors import InvalidInput
from runtime.tools import pki
from tests.security_site import site  # noqa: F401 (fixture)
from tests.test_security import code_of, creds, prepare, start

pytestmark = pytest.mark.timeout(120)


def test_a_revoked_certificate_is_refused_before_any_handler_and_the_crl_reloads(site, capsys):  # noqa: F811
    crl = site / "crl.pem"
    assert cli(["certs", "revoke", "--ca-dir", str(site), str(site / "agent-a1.pem")]) == 0
    assert "1 revoked" in capsys.readouterr().out

    async def go():
        daemon, servicer = await start(creds(site, "worker-w1", crl_file=str(crl)))
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await prepare(daemon, creds(site, "agent-a1"))
            first = (info.value.code(), info.value.details(), servicer.calls, dict(daemon.auth.rejected))
            assert await prepare(daemon, creds(site, "agent-a2")) == "agent/a2/cert"  # not revoked
            calls_before = servicer.calls
            # revoke a2 as well while the daemon runs: refused within the CRL's re-check period
            pki.revoke(pki.read(site, "ca"), crl, [(site / "agent-a2.pem").read_bytes()])
            deadline = time.monotonic() + 10
            code = grpc.StatusCode.OK
            while time.monotonic() < deadline:
                try:
                    await prepare(daemon, creds(site, "agent-a2"))
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                    break
                await asyncio.sleep(0.2)
            return first, code, servicer.calls - calls_before, daemon.auth.rejected["revoked"]
        finally:
            await daemon.drain(0.5)

    (code, details, calls, rejected), later, admitted_meanwhile, revoked = asyncio.run(go())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details and "edgesplit certs issue" in details
    assert calls == 0 and rejected == {"revoked": 1}
    assert later == grpc.StatusCode.UNAUTHENTICATED
    assert revoked == 2
    assert admitted_meanwhile <= 10  # the handler ran only for a2 before its revocation was read


def test_a_crl_of_another_ca_or_without_a_ca_is_refused_at_start(site, tmp_path_factory):  # noqa: F811
    other_dir = tmp_path_factory.mktemp("other")
    other = pki.make_ca("another CA")
    crl = other_dir / "crl.pem"
    pki.revoke(other, crl, [])

    async def go(security):
        daemon, _ = await start(security)
        await daemon.drain(0.1)

    with pytest.raises(InvalidInput, match="not signed by the CA"):
        asyncio.run(go(creds(site, "worker-w1", crl_file=str(crl))))
    with pytest.raises(InvalidInput, match="needs --ca-file"):
        asyncio.run(go(creds(site, "worker-w1", ca="", crl_file=str(crl))))


def test_a_bad_crl_edit_keeps_the_previous_list(site):  # noqa: F811
    crl = site / "crl.pem"
    pki.revoke(pki.read(site, "ca"), crl, [(site / "agent-a1.pem").read_bytes()])

    async def go():
        daemon, servicer = await start(creds(site, "worker-w1", crl_file=str(crl)))
        try:
            crl.write_text("not a CRL")
            await asyncio.sleep(1.2)  # past the re-check period: the reload fails and is logged
            return await code_of(prepare(daemon, creds(site, "agent-a1"))), servicer.calls
        finally:
            await daemon.drain(0.5)

    assert asyncio.run(go()) == (grpc.StatusCode.UNAUTHENTICATED, 0)


def test_a_stream_open_under_a_certificate_revoked_later_is_ended(site):  # noqa: F811
    """Authentication happens when a call starts; a long-lived stream (an agent's frames) would outlive a
    revocation, so the daemon re-reads the CRL while such streams are open and ends the revoked ones."""
    from runtime.proto.edgesplit.v1 import inference_pb2 as pb
    from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
    from runtime.wire.transport import TransportOptions
    from tests.test_security import Counting

    class Streaming(Counting):
        async def InferStream(self, request_iterator, context):
            async for msg in request_iterator:
                yield pb.InferResult(header=msg.frame.header)

    crl = site / "crl.pem"
    pki.revoke(pki.read(site, "ca"), crl, [])  # an empty CRL to begin with

    async def go():
        daemon, _ = await start(creds(site, "worker-w1", crl_file=str(crl)), Streaming())
        try:
            async def open_stream(stem):
                ch = TransportOptions(security=creds(site, stem)).aio_channel(f"127.0.0.1:{daemon.port}")
                call = pb_grpc.InferenceStub(ch).InferStream(timeout=60)
                await call.write(pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(seq=1))))
                assert (await call.read()).header.seq == 1
                return ch, call

            (ch1, revoked), (ch2, kept) = await open_stream("agent-a1"), await open_stream("agent-a2")
            pki.revoke(pki.read(site, "ca"), crl, [(site / "agent-a1.pem").read_bytes()])
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 10:  # frames go on until the stream is ended
                    await revoked.write(pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(seq=2))))
                    await asyncio.wait_for(revoked.read(), 10)
                    await asyncio.sleep(0.1)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
            ended = time.monotonic() - t0
            code, details = await revoked.code(), await revoked.details()
            await kept.write(pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(seq=3))))
            still = (await kept.read()).header.seq
            for ch in (ch1, ch2):
                await ch.close()
            return (code, details), ended, still, daemon.auth.rejected["revoked_open"]
        finally:
            await daemon.drain(0.5)

    (code, details), ended, still, counted = asyncio.run(go())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked while this stream was open" in details
    assert ended < 5 and still == 3 and counted == 1


def test_a_stream_open_under_a_token_removed_later_is_ended(site):  # noqa: F811
    """Removing a token's line from the server's tokens file revokes it for open streams too."""
    from runtime.proto.edgesplit.v1 import inference_pb2 as pb
    from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
    from runtime.wire.security import SecurityOptions, token_digest
    from runtime.wire.transport import TransportOptions
    from tests.test_security import Counting

    class Streaming(Counting):
        async def InferStream(self, request_iterator, context):
            async for msg in request_iterator:
                yield pb.InferResult(header=msg.frame.header)

    tokens = {ident: f"{ident}-" + "t" * 30 for ident in ("a1", "a2")}
    for ident, token in tokens.items():
        (site / f"{ident}.token").write_text(token)
    lines = {ident: f"agent {ident} {token_digest(token)}\n" for ident, token in tokens.items()}
    (site / "tokens").write_text(lines["a1"] + lines["a2"])
    server = SecurityOptions(cert_file=str(site / "worker-w1.pem"), key_file=str(site / "worker-w1.key"),
                             tokens_file=str(site / "tokens"))

    async def go():
        daemon, _ = await start(server, Streaming())
        try:
            async def open_stream(ident):
                sec = SecurityOptions(ca_file=str(site / "ca.pem"), token_file=str(site / f"{ident}.token"))
                ch = TransportOptions(security=sec).aio_channel(f"127.0.0.1:{daemon.port}")
                call = pb_grpc.InferenceStub(ch).InferStream(timeout=60)
                await call.write(pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(seq=1))))
                assert (await call.read()).header.seq == 1
                return ch, call

            (ch1, removed), (ch2, kept) = await open_stream("a1"), await open_stream("a2")
            (site / "tokens").write_text(lines["a2"])  # a1's line removed
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 10:
                    await removed.write(pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(seq=2))))
                    await asyncio.wait_for(removed.read(), 10)
                    await asyncio.sleep(0.1)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass
            ended = time.monotonic() - t0
            code, details = await removed.code(), await removed.details()
            await kept.write(pb.StreamRequest(frame=pb.InferRequest(header=pb.FrameHeader(seq=3))))
            still = (await kept.read()).header.seq
            for ch in (ch1, ch2):
                await ch.close()
            return code, details, ended, still
        finally:
            await daemon.drain(0.5)

    code, details, ended, still = asyncio.run(go())
    assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token was revoked" in details
    assert ended < 5 and still == 3
