"""Client channels that pick up a renewed certificate, key, CA or token without a restart.

grpc's channel credentials are fixed when a channel is made, and a long-lived channel (the planner
client's, a prober's, a coordinator's) reconnects with them for ever. :class:`ReloadingChannel` wraps
a secure channel: on each new call it looks (at most once a second, :data:`RECHECK_SECONDS`) whether
the files changed or SIGHUP was received (:func:`reload_credentials`, which the daemons' signal
handling calls); if so it makes a new channel from the files, so the next call and the next
connection use the new credentials. Calls already running keep their connection; the previous
channel is closed :data:`RETIRE_GRACE_SECONDS` later (a stream still on it then ends and its owner
reopens it on the new one). A file that cannot be read keeps the current channel (logged) and is
tried again a second later. The watching is runtime.wire.filewatch's, shared with the servers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import grpc

from runtime.wire.filewatch import RECHECK_SECONDS, FileWatch, generation, request_reload

logger = logging.getLogger(__name__)

RETIRE_GRACE_SECONDS = 330.0  # calls on a replaced channel may go on this long: past the planner client's
# 300 s stream deadline, so its WatchPlan and telemetry streams reopen on the new channel by themselves

__all__ = ["RECHECK_SECONDS", "RETIRE_GRACE_SECONDS", "ReloadingChannel", "generation", "reload_credentials"]


def reload_credentials() -> None:
    """Make every ReloadingChannel, server certificate, tokens file and CRL be read again at its next
    check (SIGHUP; runtime.wire.filewatch)."""
    request_reload()
    logger.info("credentials will be re-read before the next call (reload requested)")


class _Multi:
    """A multicallable that takes the channel's current inner channel at each call."""

    def __init__(self, owner: ReloadingChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self._owner, self._kind, self._args, self._kwargs = owner, kind, args, kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inner = getattr(self._owner.current(), self._kind)(*self._args, **self._kwargs)
        return inner(*args, **kwargs)


class ReloadingChannel(grpc.aio.Channel):  # type: ignore[misc]  # grpc ships no type information
    """A grpc.aio.Channel made anew by ``make`` when ``files`` change or SIGHUP asks (see module doc)."""

    def __init__(self, make: Callable[[], grpc.aio.Channel], files: tuple[str, ...],
                 check: Callable[[], Awaitable[None]] | None = None):
        self._files = files
        self._check = check  # awaited by channel_ready (runtime.wire.crl: the server's certificate against a CRL)
        self._watch = FileWatch(files, make, "client credentials", RECHECK_SECONDS)
        self._retired: dict[asyncio.Task[None], grpc.aio.Channel] = {}  # closing later -> the replaced channel

    @property
    def reloads(self) -> int:
        """Channels made after the first (tests, logs)."""
        return self._watch.reloads

    @property
    def _channel(self) -> grpc.aio.Channel:
        return self._watch.value

    def current(self) -> grpc.aio.Channel:
        """The channel new calls go to, made anew first when the credentials changed."""
        old = self._watch.value
        if self._watch.check():
            self._retire(old)
        return self._watch.value

    def _retire(self, old: grpc.aio.Channel) -> None:
        async def later() -> None:
            await old.close(grace=RETIRE_GRACE_SECONDS)

        try:
            task = asyncio.get_running_loop().create_task(later())
        except RuntimeError:  # no loop running: nothing to wait with; its calls end with it
            return
        self._retired[task] = old
        task.add_done_callback(lambda t: self._retired.pop(t, None))

    # -- grpc.aio.Channel ------------------------------------------------------------------------------

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Multi(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Multi(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Multi(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Multi(self, "stream_stream", args, kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        if self._check is not None:
            await self._check()
        await self.current().channel_ready()

    async def close(self, grace: float | None = None) -> None:
        retired = list(self._retired.items())
        self._retired.clear()
        for task, old in retired:
            task.cancel()
            await old.close(grace)
        await self._channel.close(grace)

    async def __aenter__(self) -> ReloadingChannel:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc_val: BaseException | None,
                        exc_tb: TracebackType | None) -> None:
        await self.close()
