"""The authentication part of ``python -m runtime.tools.abuse_check``: real workers under mTLS with a
CRL, called every way in without the right credentials, and a client refusing a revoked server
(runtime.wire.crl). Prints the status each got and the calls that reached a handler."""

from __future__ import annotations

import asyncio
import datetime
import statistics
import time
from pathlib import Path

import grpc

from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.tools import pki
from runtime.wire.crl import REFUSED, ServerCheck
from runtime.wire.security import SecurityOptions
from runtime.wire.transport import TransportOptions

RPC = 10.0


def _site(d: Path) -> None:
    ca = pki.make_ca()
    pki.write(ca, d, "ca")
    for stem, role, ident in (("server", "worker", "w1"), ("server-revoked", "worker", "w2")):
        pki.write(pki.issue(ca, role, ident, ("127.0.0.1",)), d, stem)
    for role, ident in (("agent", "a1"), ("agent", "revoked"), ("planner", "p1")):
        pki.write(pki.issue(ca, role, ident), d, f"{role}-{ident}")
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    pki.write(pki.issue(ca, "agent", "old", days=1, not_before=old), d, "expired")
    pki.write(pki.issue(pki.make_ca("another CA"), "agent", "a1"), d, "stranger")
    pki.revoke(ca, d / "crl.pem", [(d / f"{s}.pem").read_bytes() for s in ("agent-revoked", "server-revoked")])


def _client(d: Path, stem: str = "", crl: bool = False) -> SecurityOptions:
    return SecurityOptions(ca_file=str(d / "ca.pem"), crl_file=str(d / "crl.pem") if crl else "",
                           cert_file=str(d / f"{stem}.pem") if stem else "", key_file=str(d / f"{stem}.key") if stem else "")


async def _prepare(port: int, security: SecurityOptions) -> str:
    try:
        async with TransportOptions(security=security).aio_channel(f"127.0.0.1:{port}") as ch:
            await pb_grpc.InferenceStub(ch).Prepare(  # type: ignore[no-untyped-call]  # generated, unannotated
                pb.PrepareRequest(header=pb.FrameHeader(model_id="digits_cnn", split_id="pool1")), timeout=RPC)
        return "OK"
    except grpc.aio.AioRpcError as e:
        return str(e.code().name)  # grpc is untyped


async def tls(d: Path) -> None:
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    _site(d)

    def config(stem: str) -> WorkerConfig:
        return WorkerConfig(listen="127.0.0.1:0", torch_threads=1, ca_file=str(d / "ca.pem"),
                            cert_file=str(d / f"{stem}.pem"), key_file=str(d / f"{stem}.key"),
                            crl_file=str(d / "crl.pem"), preload=("digits_cnn",))

    ws = await serve(config("server"))
    try:
        cases = {"no certificate": _client(d), "another CA's": _client(d, "stranger"),
                 "expired": _client(d, "expired"), "plain TCP": SecurityOptions(),
                 "revoked": _client(d, "agent-revoked"), "wrong role (planner)": _client(d, "planner-p1")}
        codes = {name: await _prepare(ws.port, sec) for name, sec in cases.items()}
        refused_admitted = ws.daemon.auth.admitted
        valid = await _prepare(ws.port, _client(d, "agent-a1"))
        print(f"auth: worker under mTLS + CRL: {codes}; calls that reached a handler: {refused_admitted}; "
              f"then a site agent -> {valid} (admitted {ws.daemon.auth.admitted})")
        lat = []
        for _ in range(20):  # what the client-side check costs: one handshake of its own per fresh channel
            check = ServerCheck(f"127.0.0.1:{ws.port}", str(d / "crl.pem"), str(d / "ca.pem"),
                                str(d / "agent-a1.pem"), str(d / "agent-a1.key"))
            t0 = time.perf_counter()
            await check.ensure()
            lat.append(time.perf_counter() - t0)
    finally:
        await ws.drain_and_stop(0.5)
    revoked = await serve(config("server-revoked"))
    try:
        before = REFUSED["revoked"]
        code = await _prepare(revoked.port, _client(d, "agent-a1", crl=True))
        print(f"auth: a worker whose certificate is revoked, called by an agent with --crl-file -> {code}; calls "
              f"that reached it: {revoked.daemon.auth.admitted}; edgesplit_server_certificate_refused_total"
              f"{{reason=revoked}} +{REFUSED['revoked'] - before}; the check's own handshake (20 fresh channels): "
              f"p50 {statistics.median(lat) * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms")
    finally:
        await revoked.drain_and_stop(0.5)


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(tls(Path(tmp)))


if __name__ == "__main__":
    main()
