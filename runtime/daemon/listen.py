"""Checks on a daemon's listen address before gRPC tries it, so a mistake reads as one clear line
(gRPC's own error is "Failed to bind to address" whatever the cause)."""

from __future__ import annotations

import os

from runtime.contracts.errors import InvalidInput

# gRPC server option: no SO_REUSEPORT, so a second daemon on a port in use fails to bind instead of
# silently sharing the port with the first (the kernel would then split connections between them).
NO_REUSEPORT = ("grpc.so_reuseport", 0)


def check_listen(listen: str) -> None:
    """InvalidInput for an address that cannot work (no host: ``:PORT``; no port); OSError for a unix
    socket in a directory that does not exist."""
    if listen.startswith("unix:"):
        path = listen[len("unix:"):]
        if path.startswith("//"):  # unix:///abs/path
            path = path[2:]
        parent = os.path.dirname(path) or "."
        if not path:
            raise InvalidInput(f"listen address {listen!r} names no socket path: give unix:/path/to/file.sock")
        if not os.path.isdir(parent):  # the machine, not the address, is wrong: an OSError like any failed bind
            raise OSError(f"could not bind {listen}: directory {parent} does not exist (create it first; "
                          "under systemd RuntimeDirectory= does)")
        return
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidInput(f"listen address {listen!r} needs a port: HOST:PORT (port 0 picks a free one) or unix:PATH")
    if not host:
        raise InvalidInput(f"listen address {listen!r} has no host: give 0.0.0.0{listen} (every interface), "
                           f"[::]{listen} or 127.0.0.1{listen} (this machine only)")


def bind_failed(listen: str, detail: str) -> str:
    """The message for a bind gRPC refused."""
    if listen.startswith("unix:"):
        return f"could not bind {listen}: {detail} (is the path writable, or a stale socket there?)"
    return f"could not bind {listen}: {detail} (is another process listening on that port?)"
