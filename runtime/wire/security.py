"""Transport security in one place: TLS, mutual TLS with a site CA, and bearer tokens.

:class:`SecurityOptions` is part of :class:`runtime.wire.transport.TransportOptions`, so every
channel (agent -> worker stream, worker -> next tier, planner client, CLI) and every daemon
(runtime.daemon.server) takes its credentials from the same object:

* server side: ``cert_file`` + ``key_file`` turn TLS on; ``ca_file`` with them requires client
  certificates signed by that CA (mTLS); ``tokens_file`` accepts bearer tokens (one
  ``ROLE SUBJECT SHA256HEX`` line each). Certificates are re-read on the next handshake after
  their files change (no restart).
* client side: ``ca_file`` verifies the server; ``cert_file`` + ``key_file`` present this side's
  certificate; ``token_file`` sends its token as ``authorization: Bearer ...`` (over TLS, or
  over a local channel on loopback/unix, never in clear over a network).

An identity is ``(role, id)``: from the SAN URI ``spiffe://edgesplit/ROLE/ID`` of a certificate,
or from a token's line. Binding a non-loopback address without TLS is refused unless
``insecure`` (:func:`check_bind`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from runtime.contracts.config import field as config_field
from runtime.contracts.errors import InvalidInput
from runtime.wire.crl import ServerCheck, server_check
from runtime.wire.filewatch import FileWatch
from runtime.wire.reloading import ReloadingChannel

logger = logging.getLogger(__name__)

AGENT, WORKER, OPERATOR, PLANNER = "agent", "worker", "operator", "planner"
ROLES = (AGENT, WORKER, OPERATOR, PLANNER)  # a planner only serves: its role is allowed no call
SPIFFE_PREFIX = "spiffe://edgesplit/"
MAX_PEM_BYTES = 1 << 20  # largest CA/cert/key file read (a chain of a few certificates is a few KB)
MAX_TOKENS_FILE_BYTES = 1 << 20  # largest server tokens file read (about 10,000 lines)
MAX_TOKEN_BYTES = 4096  # largest token a client file may hold
MIN_TOKEN_CHARS = 16  # shorter tokens are refused when loaded (guessable)


def spiffe_uri(role: str, ident: str) -> str:
    return f"{SPIFFE_PREFIX}{role}/{ident}"


def parse_spiffe(uri: str) -> tuple[str, str] | None:
    """``(role, id)`` from ``spiffe://edgesplit/ROLE/ID``; None for anything else."""
    if not uri.startswith(SPIFFE_PREFIX):
        return None
    role, _, ident = uri[len(SPIFFE_PREFIX):].partition("/")
    if role not in ROLES or not ident or "/" in ident:
        return None
    return role, ident


def certificate_identity(cert_file: str) -> tuple[str, str] | None:
    """``(role, id)`` named by the SPIFFE URI of this process's own certificate; None without a
    certificate or such a URI (a client defaults its id to it: a server binds the caller to it)."""
    if not cert_file:
        return None
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(_read(cert_file, MAX_PEM_BYTES, "cert_file"))
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except ValueError as e:
        raise InvalidInput(f"cert_file {cert_file} cannot be read: {e}") from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        found = parse_spiffe(uri)
        if found is not None:
            return found
    return None


def token_digest(token: str) -> str:
    """What a server's tokens file stores instead of the token itself."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def _read(path: str, limit: int, what: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise InvalidInput(f"{what} {path} is {size} bytes, more than the {limit} allowed")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise InvalidInput(f"{what} {path} cannot be read: {e.strerror or e}") from None


def load_tokens(path: str) -> dict[str, tuple[str, str]]:
    """A server's accepted tokens: ``sha256 hex -> (role, subject)`` from ``ROLE SUBJECT SHA256HEX`` lines."""
    table: dict[str, tuple[str, str]] = {}
    try:
        text = _read(path, MAX_TOKENS_FILE_BYTES, "tokens file").decode()
    except UnicodeDecodeError as e:
        raise InvalidInput(f"tokens file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ROLES or len(parts[2]) != 64:
            raise InvalidInput(f"tokens file {path} line {n}: expected 'ROLE SUBJECT SHA256HEX' with ROLE one of "
                               f"{', '.join(ROLES)} ('edgesplit certs token' writes such lines)")
        table[parts[2].lower()] = (parts[0], parts[1])
    return table


def read_token(path: str) -> str:
    token = _read(path, MAX_TOKEN_BYTES, "token file").decode(errors="replace").strip()
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise InvalidInput(f"token file {path}: a token is one word of at least {MIN_TOKEN_CHARS} characters")
    return token


def is_loopback(address: str) -> bool:
    """True for ``unix:`` paths and 127.0.0.0/8, ::1 and ``localhost`` binds."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class SecurityOptions:
    """Certificates and tokens of one process, for its server side and its client side."""

    ca_file: str = ""  # site CA (PEM): clients verify servers with it; a TLS server with it requires client certs (mTLS)
    cert_file: str = ""  # this process's certificate chain (PEM); with key_file: TLS server / mTLS client
    key_file: str = ""  # the private key of cert_file (PEM)
    token_file: str = ""  # client: file holding the bearer token this process sends
    tokens_file: str = ""  # server: accepted tokens, 'ROLE SUBJECT SHA256HEX' per line
    server_name: str = ""  # client: name expected in the server's certificate when it differs from the dialled host
    crl_file: str = ""  # revoked certificates (CRL signed by the CA of ca_file): a server refuses such clients
    # (runtime.daemon.revocation), a client such servers (runtime.wire.crl.ServerCheck)
    insecure: bool = False  # allow serving a non-loopback address without TLS (warned, counted)

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise InvalidInput("cert_file and key_file go together: give both or neither")

    @property
    def tls(self) -> bool:
        """This side has a certificate: a server speaks TLS, a client presents it."""
        return bool(self.cert_file)

    @property
    def client_tls(self) -> bool:
        return bool(self.ca_file or self.cert_file)

    @property
    def mtls(self) -> bool:
        """A server that requires client certificates."""
        return self.tls and bool(self.ca_file)

    @property
    def requires_auth(self) -> bool:
        """A server that refuses calls without a verified certificate or token."""
        return self.mtls or bool(self.tokens_file)


def check_bind(listen: str, security: SecurityOptions) -> bool:
    """Refuse (InvalidInput) a non-loopback ``listen`` without TLS unless ``insecure``; True when
    serving insecurely on a network address (warned here)."""
    if is_loopback(listen) or security.tls:
        return False
    if not security.insecure:
        raise InvalidInput(f"refusing to serve {listen} without TLS: anyone on that network could call it. Give "
                           "--cert-file/--key-file (and --ca-file for mTLS; 'edgesplit certs' makes them), bind "
                           "127.0.0.1 or a unix: socket, or pass --insecure to accept the risk")
    logger.warning("serving %s WITHOUT TLS or authentication (--insecure): any host that reaches it can call it",
                   listen)
    return True


def check_pair(cert_pem: bytes, key_pem: bytes, where: str) -> None:
    """InvalidInput unless the key belongs to the (first) certificate: a renewal caught between writing
    the certificate and the key is kept out instead of failing every handshake."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert_pub = x509.load_pem_x509_certificate(cert_pem).public_key()
        key_pub = serialization.load_pem_private_key(key_pem, None).public_key()
    except (ValueError, TypeError) as e:
        raise InvalidInput(f"{where}: the certificate or its key cannot be read: {e}") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert_pub.public_bytes(*raw) != key_pub.public_bytes(*raw):
        raise InvalidInput(f"{where}: the key file does not belong to this certificate (a renewal half done?)")


# -- server side --------------------------------------------------------------------------------------


class _CertReloader:
    """grpc's certificate-config fetcher, called at each handshake: the files read again when they
    changed or SIGHUP asked (runtime.wire.filewatch, looked at on every handshake)."""

    def __init__(self, security: SecurityOptions):
        self.security = security
        s = security
        self.watch = FileWatch((s.cert_file, s.key_file, s.ca_file), self.config, "server certificates", interval=0.0)

    def config(self) -> Any:
        s = self.security
        key = _read(s.key_file, MAX_PEM_BYTES, "key file")
        cert = _read(s.cert_file, MAX_PEM_BYTES, "certificate file")
        check_pair(cert, key, s.cert_file)
        ca = _read(s.ca_file, MAX_PEM_BYTES, "CA file") if s.ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> Any:
        return self.watch.value if self.watch.check() else None  # None: grpc keeps the current configuration


def server_credentials(security: SecurityOptions) -> grpc.ServerCredentials | None:
    """TLS (mTLS with ``ca_file``) server credentials reloaded on file change; None without a certificate."""
    if not security.tls:
        return None
    reloader = _CertReloader(security)
    return grpc.dynamic_ssl_server_credentials(reloader.watch.value, reloader,
                                               require_client_authentication=security.mtls)


# -- client side --------------------------------------------------------------------------------------


def channel_credentials(address: str, security: SecurityOptions) -> grpc.ChannelCredentials | None:
    """Credentials for a channel to ``address``; None for a plain channel (loopback, nothing configured)."""
    creds: grpc.ChannelCredentials | None = None
    if security.client_tls:
        s = security
        key = _read(s.key_file, MAX_PEM_BYTES, "key file") if s.key_file else None
        cert = _read(s.cert_file, MAX_PEM_BYTES, "certificate file") if s.cert_file else None
        if cert is not None and key is not None:
            check_pair(cert, key, s.cert_file)
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(s.ca_file, MAX_PEM_BYTES, "CA file") if s.ca_file else None,
            private_key=key, certificate_chain=cert)
    if not security.token_file:
        return creds
    if creds is None:
        if not is_loopback(address):
            raise InvalidInput(f"a bearer token to {address} would travel in clear: give --ca-file to use TLS")
        kind = grpc.LocalConnectionType.UDS if address.startswith("unix:") else grpc.LocalConnectionType.LOCAL_TCP
        creds = grpc.local_channel_credentials(kind)
    token = grpc.access_token_call_credentials(read_token(security.token_file))
    return grpc.composite_channel_credentials(creds, token)


def channel_args(security: SecurityOptions) -> list[tuple[str, Any]]:
    return [("grpc.ssl_target_name_override", security.server_name)] if security.server_name else []


# aio client interceptors of every channel this process opens from now on; runtime.daemon.tracing puts its
# own here when tracing is on (W3C trace context in the metadata). Empty: channels have no interceptor.
CLIENT_INTERCEPTORS: list[Any] = []


def aio_channel(address: str, options: list[tuple[str, Any]], security: SecurityOptions) -> grpc.aio.Channel:
    """A channel to ``address``; a secure one re-reads its certificate, key, CA and token files when they
    change (or on SIGHUP) before its next call (runtime.wire.reloading)."""
    creds = channel_credentials(address, security)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=list(CLIENT_INTERCEPTORS) or None)
    check = _server_check(address, security)  # the server's certificate against --crl-file (runtime.wire.crl)
    interceptors = [*(check.interceptors() if check else []), *CLIENT_INTERCEPTORS] or None

    first = [creds]  # the first channel uses the credentials just read; later ones read the files again

    def make() -> grpc.aio.Channel:
        fresh = first.pop() if first else channel_credentials(address, security)
        return grpc.aio.secure_channel(address, fresh, options=options + channel_args(security),
                                       interceptors=interceptors)

    s = security
    return ReloadingChannel(make, tuple(p for p in (s.ca_file, s.cert_file, s.key_file, s.token_file) if p),
                            check.ensure if check else None)


def _server_check(address: str, security: SecurityOptions) -> ServerCheck | None:
    s = security
    if not s.client_tls:
        return None
    return server_check(address, s.ca_file, s.cert_file, s.key_file, s.crl_file, s.server_name)


def sync_channel(address: str, options: list[tuple[str, Any]], security: SecurityOptions) -> grpc.Channel:
    creds = channel_credentials(address, security)
    if creds is None:
        return grpc.insecure_channel(address, options=options)
    check = _server_check(address, security)
    if check is not None:
        check.ensure_sync()  # AioRpcError UNAUTHENTICATED / UNAVAILABLE: a revoked or uncheckable server
    return grpc.secure_channel(address, creds, options=options + channel_args(security))


def options_from(values: Mapping[str, Any]) -> SecurityOptions:
    """SecurityOptions from a settings object's fields of the same names (see SecuritySettings)."""
    return SecurityOptions(**{n: values[n] for n in SECURITY_FIELDS if n in values})


@dataclass(frozen=True)
class SecuritySettings:
    """The security fields every daemon's configuration inherits (TOML, EDGESPLIT_<SECTION>_*, flags)."""

    ca_file: str = config_field("", "site CA certificate (PEM): verify servers with it; a TLS server with it requires client certificates (mTLS)")
    cert_file: str = config_field("", "this process's certificate (PEM, 'edgesplit certs issue'): serve TLS / present it as a client")
    key_file: str = config_field("", "private key of --cert-file (PEM)")
    token_file: str = config_field("", "client: file holding the bearer token to send (over TLS, or over loopback)")
    tokens_file: str = config_field("", "server: accepted bearer tokens, one 'ROLE SUBJECT SHA256HEX' line each ('edgesplit certs token')")
    server_name: str = config_field("", "client: name expected in the server certificate when it differs from the dialled host")
    crl_file: str = config_field("", "CRL of revoked certificates (PEM/DER, signed by --ca-file's CA; 'edgesplit certs revoke'), re-read on change: a server refuses revoked clients, a client revoked servers")
    insecure: bool = config_field(False, "allow serving a non-loopback address without TLS (logged as a warning, metric edgesplit_insecure_bind)")

    def security(self) -> SecurityOptions:
        return options_from({f: getattr(self, f) for f in SECURITY_FIELDS})


SECURITY_FIELDS = ("ca_file", "cert_file", "key_file", "token_file", "tokens_file", "server_name", "crl_file", "insecure")
