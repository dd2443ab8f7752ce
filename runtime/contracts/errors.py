"""One exception hierarchy for edgesplit, with the gRPC status each maps to.

Servers raise these; the daemon scaffold's error interceptor (runtime.daemon.server) turns them
into a status at the RPC boundary with :func:`to_status`; clients map every
``grpc.RpcError`` back into them with :func:`from_rpc_error`, so callers catch one family.
"""

from __future__ import annotations

import grpc


class EdgesplitError(Exception):
    """Base class. ``code`` is the gRPC status the error is reported with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidInput(EdgesplitError):
    """Malformed request: bad shape, dtype, size or encoding."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TooLarge(EdgesplitError):
    """A tensor or payload above a configured cap."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(EdgesplitError):
    """The server's queue is full; retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(EdgesplitError):
    """Unknown model or split point."""

    code = grpc.StatusCode.NOT_FOUND


class PreconditionFailed(EdgesplitError):
    """The request names something this server cannot serve as asked (weights differ, TL missing)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(EdgesplitError):
    """The request asks for something this server was not configured to allow (a next tier not in --next-tier)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(EdgesplitError):
    """The peer cannot be reached or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(EdgesplitError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[EdgesplitError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}

# google.rpc.Code numbering, used for per-frame status on streams.
CODE_NUMBERS: dict[grpc.StatusCode, int] = {c: c.value[0] for c in grpc.StatusCode}
CODES_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def from_status(code: grpc.StatusCode, message: str) -> EdgesplitError:
    """The exception for a status code and message."""
    cls = _BY_CODE.get(code, EdgesplitError)
    return cls(message, code)


def from_rpc_error(err: grpc.RpcError) -> EdgesplitError:
    """Map a client-side ``grpc.RpcError`` (sync or aio) into the hierarchy."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if details and "Hostname Verification Check failed" in details:  # grpc's words when the name does not match
        details += (" (the server's certificate does not carry the name dialled; dial the name it was issued for, "
                    "or pass --server-name NAME with that name)")
    return from_status(code, details or code.name)


def as_error(exc: BaseException) -> EdgesplitError:
    """``exc`` as the error it is reported with: an EdgesplitError as it is, anything else as
    INTERNAL ``internal error: Type: message`` (a bug, never the caller's fault)."""
    if isinstance(exc, EdgesplitError):
        return exc
    return EdgesplitError(f"internal error: {type(exc).__name__}: {exc}", grpc.StatusCode.INTERNAL)


# Status details (a trailer) a server sends at most; a longer message is cut. A message that echoed a
# client's string whole (a megabyte id) went out as a trailer the client refuses (its 16 KiB metadata
# limit: RESOURCE_EXHAUSTED "Stream removed" instead of the status), after the server had sent it.
MAX_STATUS_CHARS = 2048


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status (code, details) a server answers ``exc`` with; the one mapping for every daemon.
    Details beyond MAX_STATUS_CHARS are cut (the cut is said)."""
    err = as_error(exc)
    message = str(err)
    if len(message) > MAX_STATUS_CHARS:
        message = f"{message[:MAX_STATUS_CHARS - 40]}... ({len(message) - MAX_STATUS_CHARS + 40} characters cut)"
    return err.code, message
