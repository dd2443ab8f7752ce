"""systemd's readiness and watchdog protocol (``Type=notify``, ``WatchdogSec=``), without a library:
one datagram per message to the unix socket named by ``$NOTIFY_SOCKET`` (sd_notify(3)).

Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing and costs nothing.

    notify("READY=1")              # the daemon serves: models loaded, port bound
    notify("STOPPING=1")           # draining
    task = start_watchdog()        # "WATCHDOG=1" every WatchdogSec/2 while the event loop runs
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4096  # sd_notify messages are a few short KEY=VALUE lines; refuse more


def _address(env: dict[str, str] | os._Environ[str]) -> str | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):  # abstract namespace
        return "\0" + path[1:]
    return path if path.startswith("/") else None  # systemd gives absolute paths; anything else is not ours


def notify(state: str, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``); True when sent, False outside systemd or on a socket error
    (logged: a unit with Type=notify then times out, which says the same to the operator)."""
    address = _address(os.environ if env is None else env)
    data = state.encode()
    if address is None or len(data) > MAX_MESSAGE_BYTES:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(data)
    except OSError as e:
        logger.warning("sd_notify %s to %r failed: %s", state, address, e)
        return False
    return True


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Seconds between keep-alives (half of ``$WATCHDOG_USEC``), or None when no watchdog is asked
    for this process (unset, or ``$WATCHDOG_PID`` names another one)."""
    env = dict(os.environ) if env is None else env
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def start_watchdog(env: dict[str, str] | None = None) -> asyncio.Task[None] | None:
    """On the running loop: "WATCHDOG=1" every interval until cancelled. A loop that hangs stops the
    keep-alives and systemd restarts the service."""
    interval = watchdog_interval(env)
    if interval is None or _address(os.environ if env is None else env) is None:
        return None

    async def keepalive() -> None:
        while True:
            notify("WATCHDOG=1", env)
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(keepalive(), name="sd-watchdog")


async def stop_watchdog(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
