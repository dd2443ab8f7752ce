"""Certificate revocation lists, and the client-side check of a server's certificate against one.

:func:`load_crl` reads a CRL (``--crl-file``, PEM or DER) and checks that the site CA signed it (a
CRL anyone could write would let anyone un-revoke); servers check client certificates with it
(runtime.daemon.revocation).

Clients: grpc's Python client exposes neither the server's certificate nor a verification hook, so
:class:`ServerCheck` makes its own TLS handshake (Python's ``ssl``, the same CA, the same client
certificate for mTLS, the same expected name) to the address a secure channel dials, takes the
certificate the server presents and refuses the channel when the CRL revokes its serial:
``UNAUTHENTICATED`` "server certificate ... is revoked", counted in :data:`REFUSED` (exported as
``edgesplit_server_certificate_refused_total{reason}`` by :func:`register_metrics`). The check runs
before a channel is first used (``channel_ready()``, which every long-lived stream's owner awaits
first, and a client interceptor on unary and server-streaming calls), again after
:data:`VERIFY_SECONDS`, and at once when a reloaded CRL revokes the serial last seen. It is a
separate connection: a server behind a load balancer may answer it from another backend than the
channel's, and grpc's own reconnects inside a channel are not re-checked until the next
verification; a server that cannot be checked (its handshake fails) is refused ``UNAVAILABLE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
from cryptography import x509

from runtime.contracts.errors import InvalidInput
from runtime.wire.filewatch import RECHECK_SECONDS, FileWatch

logger = logging.getLogger(__name__)

MAX_CRL_BYTES = 8 << 20  # largest CRL file read (about 200,000 revoked serials)
MAX_CA_BYTES = 1 << 20  # largest CA file read
VERIFY_SECONDS = 60.0  # a server's certificate is checked again after this long (on the channel's next call)
HANDSHAKE_SECONDS = 5.0  # bound of the check's own connection and handshake

REFUSED: Counter[str] = Counter()  # reason ("revoked", "unchecked") -> channels refused in this process


def _read(path: str, limit: int, what: str) -> bytes:
    try:
        if os.path.getsize(path) > limit:
            raise InvalidInput(f"{what} {path} is larger than the {limit} bytes allowed")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise InvalidInput(f"{what} {path} cannot be read: {e.strerror or e}") from None


def load_crl(crl_file: str, ca_file: str) -> frozenset[int]:
    """The revoked serial numbers of ``crl_file``, after checking its signature against ``ca_file``'s CA."""
    data = _read(crl_file, MAX_CRL_BYTES, "CRL file")
    try:
        crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl(data)
    except ValueError as e:
        raise InvalidInput(f"CRL file {crl_file} is not a PEM or DER CRL: {e}") from None
    ca = x509.load_pem_x509_certificate(_read(ca_file, MAX_CA_BYTES, "CA file"))
    if crl.issuer != ca.subject or not crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
        raise InvalidInput(f"CRL file {crl_file} is not signed by the CA of {ca_file}; make it with "
                           "'edgesplit certs revoke' (or openssl ca -gencrl) using that CA's key")
    next_update = crl.next_update_utc
    if next_update is not None and next_update < datetime.datetime.now(datetime.timezone.utc):
        logger.warning("CRL file %s is past its next update (%s): publish a fresh one", crl_file, next_update)
    return frozenset(r.serial_number for r in crl)


def crl_watch(crl_file: str, ca_file: str) -> FileWatch[frozenset[int]]:
    """The revoked serials of ``crl_file``, re-read when it changes or on SIGHUP (a bad edit keeps the list)."""
    if not ca_file:
        raise InvalidInput("--crl-file needs --ca-file: the CRL is checked against the site CA that signed it")
    return FileWatch((crl_file,), lambda: load_crl(crl_file, ca_file), "CRL", RECHECK_SECONDS)


_WATCHES: dict[tuple[str, str], FileWatch[frozenset[int]]] = {}  # one per CRL for a process's client channels


def _shared_watch(crl_file: str, ca_file: str) -> FileWatch[frozenset[int]]:
    key = crl_file, ca_file
    if key not in _WATCHES:
        _WATCHES[key] = crl_watch(crl_file, ca_file)
    return _WATCHES[key]


def _endpoint(address: str) -> tuple[str, int]:
    """(host, port) of a channel target such as ``host:port``, ``[::1]:port``, ``dns:///host:port``."""
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if address.startswith(prefix):
            address = address[len(prefix):]
            break
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInput(f"cannot check the server certificate of {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


class ServerCertificateRevoked(grpc.aio.AioRpcError):  # type: ignore[misc]  # grpc ships no type information
    """UNAUTHENTICATED: the server's certificate is in the CRL (its name shows in callers' logs and reasons)."""

    def __init__(self, details: str):
        super().__init__(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class ServerCertificateUnchecked(grpc.aio.AioRpcError):  # type: ignore[misc]
    """UNAVAILABLE: the check's own handshake failed, so the server's certificate is not known."""

    def __init__(self, details: str):
        super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class ServerCheck:
    """The server certificate of one channel's address, checked against the CRL (see the module doc)."""

    def __init__(self, address: str, crl_file: str, ca_file: str, cert_file: str = "", key_file: str = "",
                 server_name: str = ""):
        self.address = address
        self.host, self.port = _endpoint(address)
        self.server_name = server_name or self.host  # the name grpc checks (ssl_target_name_override)
        self.crl_file = crl_file
        self.crls = _shared_watch(crl_file, ca_file)
        self._files = ca_file, cert_file, key_file
        self.serial: int | None = None  # of the certificate last checked
        self.checks = 0  # handshakes made (tests, logs)
        self._at = 0.0  # when it was checked
        self._lock: asyncio.Lock | None = None

    def _context(self) -> ssl.SSLContext:
        """What the channel presents and trusts, read from the files at each check (they may be renewed)."""
        ca_file, cert_file, key_file = self._files
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        if cert_file:
            context.load_cert_chain(cert_file, key_file)  # a server requiring mTLS asks for it
        context.set_alpn_protocols(["h2"])
        return context

    def _current(self) -> bool:
        """The last check still holds: recent, and the (possibly reloaded) CRL does not list it."""
        self.crls.check()
        return (self.serial is not None and self.serial not in self.crls.value
                and time.monotonic() - self._at < VERIFY_SECONDS)

    def _judge(self, der: bytes | None) -> None:
        self.checks += 1
        if der is None:
            raise ssl.SSLError("the server presented no certificate")
        serial = x509.load_der_x509_certificate(der).serial_number
        if serial in self.crls.value:
            self.serial = None
            REFUSED["revoked"] += 1
            logger.error("refusing %s: its certificate (serial %x) is revoked by %s", self.address, serial,
                         self.crl_file)
            raise ServerCertificateRevoked(
                f"the server certificate of {self.address} (serial {serial:x}) is revoked by {self.crl_file}: not "
                "calling it (a server whose key was lost, or an impostor holding it; the site must issue that server "
                "a new certificate)")
        self.serial, self._at = serial, time.monotonic()

    def _unchecked(self, e: BaseException) -> grpc.aio.AioRpcError:
        REFUSED["unchecked"] += 1
        return ServerCertificateUnchecked(f"cannot check the server certificate of {self.address} against "
                                          f"{self.crl_file}: {type(e).__name__}: {e}")

    async def ensure(self) -> None:
        """Return when the server's certificate is checked and not revoked; else AioRpcError
        UNAUTHENTICATED (revoked) or UNAVAILABLE (no handshake)."""
        if self._current():
            return
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one handshake for the calls that wait together
            if self._current():
                return
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(
                    self.host, self.port, ssl=self._context(), server_hostname=self.server_name), HANDSHAKE_SECONDS)
            except (OSError, asyncio.TimeoutError) as e:
                raise self._unchecked(e) from None
            try:
                ssl_object = writer.get_extra_info("ssl_object")
                der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            finally:
                writer.transport.abort()  # the check's connection carries nothing
            try:
                self._judge(der)
            except (ValueError, ssl.SSLError) as e:
                raise self._unchecked(e) from None

    def ensure_sync(self) -> None:
        """ensure() for a blocking channel (the CLI)."""
        if self._current():
            return
        try:
            with socket.create_connection((self.host, self.port), HANDSHAKE_SECONDS) as raw, \
                    self._context().wrap_socket(raw, server_hostname=self.server_name) as tls:
                der = tls.getpeercert(binary_form=True)
        except OSError as e:
            raise self._unchecked(e) from None
        try:
            self._judge(der)
        except (ValueError, ssl.SSLError) as e:
            raise self._unchecked(e) from None

    def interceptors(self) -> list[Any]:
        """Client interceptors that run ensure() before unary, server-streaming and client-streaming calls
        (bidirectional streams are checked by channel_ready: an interceptor would change their writes)."""
        return [_UnaryUnary(self), _UnaryStream(self), _StreamUnary(self)]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # grpc ships no type information
    def __init__(self, check: ServerCheck):
        self._check = check

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        await self._check.ensure()
        return await continuation(details, request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, check: ServerCheck):
        self._check = check

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        await self._check.ensure()
        return await continuation(details, request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, check: ServerCheck):
        self._check = check

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        await self._check.ensure()
        return await continuation(details, request_iterator)


class RefusedServers:
    """Prometheus collector of :data:`REFUSED` (a process-wide tally, so any registry can export it)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily("edgesplit_server_certificate_refused",
                                     "secure channels refused before any call because the server's certificate is "
                                     "revoked by --crl-file (revoked) or could not be checked (unchecked)",
                                     labels=["reason"])
        for reason in ("revoked", "unchecked"):
            family.add_metric([reason], REFUSED[reason])
        yield family


def server_check(address: str, ca_file: str, cert_file: str, key_file: str, crl_file: str,
                 server_name: str) -> ServerCheck | None:
    """The check for a TLS channel to ``address`` when a CRL is configured; None otherwise."""
    if not crl_file or address.startswith("unix:"):
        return None
    return ServerCheck(address, crl_file, ca_file, cert_file, key_file, server_name)


def register_metrics(registry: Any) -> None:
    """Export the refusals on ``registry`` (a prometheus_client CollectorRegistry; once per registry)."""
    with contextlib.suppress(ValueError):  # already there (two components sharing one registry)
        registry.register(RefusedServers())
