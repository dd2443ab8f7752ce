"""Authentication and role checks for every daemon: one server interceptor, run before any handler.

:class:`AuthInterceptor` finds the caller's :class:`Identity`: from a verified client
certificate (its SAN URI ``spiffe://edgesplit/ROLE/ID``; grpc has checked it against the site CA
during the handshake), else from a bearer token in ``authorization`` metadata (looked up by its
SHA-256 in the server's tokens file, re-read when the file changes or on SIGHUP:
runtime.wire.filewatch). A certificate revoked by the ``--crl-file`` CRL is refused UNAUTHENTICATED
(runtime.daemon.revocation). A server that requires authentication (mTLS or a tokens file,
runtime.wire.security) answers a call without one UNAUTHENTICATED, and a caller whose role the
method does not allow PERMISSION_DENIED, before the handler runs; each refusal is counted
(``edgesplit_auth_rejected_total{reason}`` and :attr:`AuthInterceptor.rejected`). Health checks need no identity (probes).

Handlers read the caller with :func:`current_identity`. On a server without authentication
(loopback) every caller is :data:`ANONYMOUS` and role checks are off.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from runtime.contracts.errors import PermissionDenied
from runtime.daemon.interceptors import end_call, rewrap_handler
from runtime.daemon.revocation import CRL_RECHECK_SECONDS, Revocations
from runtime.wire.filewatch import FileWatch
from runtime.wire.security import AGENT, OPERATOR, SecurityOptions, load_tokens, parse_spiffe, token_digest

logger = logging.getLogger(__name__)

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})  # probes need no identity
TOKENS_RECHECK_SECONDS = 1.0  # how often the tokens file's mtime is looked at
MAX_AUTH_HEADER_CHARS = 4096  # a longer authorization header is refused unread


@dataclass(frozen=True)
class Identity:
    """Who is calling."""

    role: str  # agent, worker or operator; "" when unauthenticated
    id: str  # the certificate's or token's subject (worker_id / agent_id / a person); "" when unauthenticated
    via: str  # "cert", "token" or "none"

    @property
    def authenticated(self) -> bool:
        return self.via != "none"

    def __str__(self) -> str:
        return f"{self.role}/{self.id} ({self.via})" if self.authenticated else "anonymous"


ANONYMOUS = Identity("", "", "none")
_current: contextvars.ContextVar[Identity] = contextvars.ContextVar("edgesplit_identity", default=ANONYMOUS)

# method name (the part after the last '/', e.g. "RegisterWorker") -> roles that may call it; operators
# may call everything; a method not named is open to every authenticated role.
AuthPolicy = Mapping[str, frozenset[str]]


def current_identity() -> Identity:
    """The caller of the RPC being handled (ANONYMOUS outside one, or on a server without authentication)."""
    return _current.get()


def acts_for_agent(agent_id: str) -> bool:
    """Whether the caller may name ``agent_id`` in a frame: an authenticated agent only its own id (its
    certificate's or token's subject, as the planner binds it: planner.owners). Workers (forwarding an
    agent's chained frames, fetching halo parts of its tiles), operators, and every caller of a server
    without authentication may name any. An empty id names no agent (a Prepare before any frame)."""
    ident = current_identity()
    return not (ident.authenticated and ident.role == AGENT and agent_id and agent_id != ident.id)


def check_acts_for_agent(agent_id: str) -> None:
    """PermissionDenied unless :func:`acts_for_agent`."""
    if not acts_for_agent(agent_id):
        ident = current_identity()
        raise PermissionDenied(f"{ident} may send frames only for its own agent_id {ident.id!r}, not {agent_id[:64]!r}; "
                               f"start the agent with --agent-id {ident.id}")


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason = code, reason


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call (but health) before its handler; see the module docstring."""

    def __init__(self, security: SecurityOptions, policy: AuthPolicy | None = None,
                 registry: CollectorRegistry | None = None):
        self.security = security
        self.policy = dict(policy or {})
        self.required = security.requires_auth
        self.rejected: Tally[str] = Tally()  # reason -> calls refused (tests read this)
        self.admitted = 0  # calls that reached their handler
        self._metric = Counter("edgesplit_auth_rejected", "calls refused before any handler work, by reason",
                               ["reason"], registry=registry)
        tokens_file = security.tokens_file  # read at start (a bad file stops the daemon), again when it changes
        self._tokens_watch = (FileWatch((tokens_file,), lambda: load_tokens(tokens_file), "tokens file",
                                        TOKENS_RECHECK_SECONDS) if tokens_file else None)
        # revoked client certificates (--crl-file), checked on every call that presents one
        self.revocations = Revocations(security.crl_file, security.ca_file) if security.crl_file else None
        # streaming calls open, by the credential they were admitted on: a revocation read later ends them
        self._streams: dict[tuple[str, Any], dict[asyncio.Task[Any], Any]] = {}
        self._watcher: asyncio.Task[None] | None = None

    @property
    def _tokens(self) -> dict[str, tuple[str, str]]:
        """Accepted tokens: sha256 hex -> (role, subject)."""
        return self._tokens_watch.value if self._tokens_watch is not None else {}

    def _reload_tokens(self) -> None:
        if self._tokens_watch is not None:
            self._tokens_watch.check()

    def identify(self, context: grpc.aio.ServicerContext, metadata: Any) -> Identity:
        """The caller's identity, or Refused."""
        auth = context.auth_context()
        pem = auth.get("x509_pem_cert")
        if pem and self.revocations is not None:
            serial = self.revocations.revoked(pem[0])
            if serial is not None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "revoked",
                              f"the client certificate (serial {serial:x}) is revoked by {self.revocations.crl_file}; "
                              "ask the site for a new one ('edgesplit certs issue')")
        for uri in auth.get("peer_spiffe_id", []) + auth.get("x509_subject_alternative_name", []):
            parsed = parse_spiffe(uri.decode(errors="replace"))
            if parsed is not None:
                return Identity(parsed[0], parsed[1], "cert")
        if auth.get("x509_common_name"):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no_role",
                          "the client certificate names no role: it needs a SAN URI spiffe://edgesplit/ROLE/ID "
                          "('edgesplit certs issue' writes one)")
        header = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if header is not None:
            text = header if isinstance(header, str) else header.decode(errors="replace")
            if not self.security.tokens_file:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "bad_token", "this server accepts no bearer tokens")
            if len(text) > MAX_AUTH_HEADER_CHARS or not text.startswith("Bearer "):
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "bad_token", "authorization must be 'Bearer TOKEN'")
            self._reload_tokens()
            entry = self._tokens.get(token_digest(text[len("Bearer "):]))
            if entry is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "bad_token", "unknown bearer token")
            return Identity(entry[0], entry[1], "token")
        if self.required:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing",
                          "authentication required: present a client certificate of the site CA or a bearer token")
        return ANONYMOUS

    def authorize(self, method: str, identity: Identity) -> None:
        if not identity.authenticated or identity.role == OPERATOR:
            return
        allowed = self.policy.get(method.rsplit("/", 1)[-1])
        if allowed is not None and identity.role not in allowed:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "role",
                          f"{method} may be called by {', '.join(sorted(allowed | {OPERATOR}))}, not by {identity}")

    async def _admit(self, method: str, context: grpc.aio.ServicerContext, metadata: Any) -> Identity:
        try:
            identity = self.identify(context, metadata)
            self.authorize(method, identity)
        except Refused as r:
            self.rejected[r.reason] += 1
            self._metric.labels(r.reason).inc()
            logger.info("%s refused from %s: %s", method, context.peer(), r)
            await context.abort(r.code, str(r))
        self.admitted += 1
        _current.set(identity)
        return identity

    # -- revocation of open streams --------------------------------------------------------------------

    def _credential(self, identity: Identity, context: grpc.aio.ServicerContext, metadata: Any) -> tuple[str, Any] | None:
        """What a call was admitted on, if it can be revoked: ("cert", serial) with a CRL, ("token", digest)."""
        if identity.via == "cert" and self.revocations is not None:
            pem = context.auth_context().get("x509_pem_cert")
            return ("cert", self.revocations.serial(pem[0])) if pem else None
        if identity.via == "token":
            header = next((v for k, v in (metadata or ()) if k == "authorization"), "")
            text = header if isinstance(header, str) else header.decode(errors="replace")
            return "token", token_digest(text[len("Bearer "):])
        return None

    def _revoked(self, credential: tuple[str, Any]) -> bool:
        kind, key = credential
        if kind == "cert":
            return self.revocations is not None and key in self.revocations.serials
        return key not in self._tokens  # its line was removed from the tokens file

    def _track(self, identity: Identity, context: grpc.aio.ServicerContext, metadata: Any) -> Callable[[], None] | None:
        """Note a streaming call, so that a revocation read while it runs (its certificate in the CRL, its
        token's line removed) ends it UNAUTHENTICATED; returns what forgets it at its end."""
        credential = self._credential(identity, context, metadata)
        task = asyncio.current_task()
        if credential is None or task is None:
            return None
        self._streams.setdefault(credential, {})[task] = context
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch_revocations())

        def forget() -> None:
            calls = self._streams.get(credential)
            if calls is not None:
                calls.pop(task, None)
                if not calls:
                    del self._streams[credential]

        return forget

    async def _watch_revocations(self) -> None:
        """While revocable streams are open: re-read the CRL and tokens each second, end the revoked ones."""
        while self._streams:
            await asyncio.sleep(CRL_RECHECK_SECONDS)
            if self.revocations is not None:
                self.revocations.refresh()
            if self.security.tokens_file:
                self._reload_tokens()
            for credential in [c for c in self._streams if self._revoked(c)]:
                what = "certificate" if credential[0] == "cert" else "bearer token"
                for task, context in self._streams.pop(credential).items():
                    self.rejected["revoked_open"] += 1
                    self._metric.labels("revoked_open").inc()
                    logger.warning("ending a stream from %s: its %s was revoked", context.peer(), what)
                    end_call(context, task, grpc.StatusCode.UNAUTHENTICATED,
                             f"the client {what} was revoked while this stream was open")

    def close(self) -> None:
        """Stop watching open streams (the daemon stops)."""
        if self._watcher is not None:
            self._watcher.cancel()

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in OPEN_METHODS:
            return handler
        metadata = handler_call_details.invocation_metadata
        return rewrap_handler(handler, lambda behaviour: self._guard(behaviour, method, metadata))

    def _guard(self, behaviour: Callable[..., Any], method: str, metadata: Any) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                identity = await self._admit(method, context, metadata)
                forget = self._track(identity, context, metadata)
                try:
                    async for item in behaviour(request, context):
                        yield item
                finally:
                    if forget is not None:
                        forget()

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._admit(method, context, metadata)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result

        return call
