"""The worker announces itself to the planner: its address, tier, the profiles of the models it
serves, the Transfer Layers it holds and the next tiers it forwards chained frames to (its
``--next-tier`` allowlist: the planner chains it only to those); again every ``planner_refresh_seconds`` (so a planner
that restarted or lost it learns it back) and with back-off while the planner is unreachable."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import Callable, Sequence

from runtime.contracts import profile as profiles
from runtime.contracts.errors import EdgesplitError, InvalidInput, PreconditionFailed
from runtime.contracts.tiers import DEVICE
from runtime.daemon.planner_client import PlannerClient, PlannerClientOptions
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.wire.asyncutil import Backoff, cancel_and_wait

logger = logging.getLogger(__name__)

RPC_TIMEOUT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 30.0


def load_profiles(paths, tier: str) -> list[str]:
    """The profile documents to send, validated here so a bad file stops the worker at start."""
    if not paths:
        raise InvalidInput("a worker that registers with a planner needs --profiles: one profile per model it serves, "
                           "measured on this machine ('edgesplit profile --role edge --out FILE')")
    docs = []
    for path in paths:
        p = profiles.load(path)
        if p.role == DEVICE:
            raise InvalidInput(f"{path} was measured as role device; profile this machine with --role {tier}")
        docs.append(p.to_json())
    return docs


def advertised_address(listen: str, port: int, advertise: str) -> str:
    if advertise:
        return advertise
    host = listen.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{port}"


class PlannerRegistration:
    def __init__(self, planner: str | PlannerClientOptions, worker_id: str, address: str, tier: str,
                 profile_docs: list[str], tl_ids: list[str], refresh_seconds: float, next_tiers: Sequence[str] = ()):
        # the planner's address, or client options carrying the worker's transport (TLS, tokens)
        self.client_options = (planner if isinstance(planner, PlannerClientOptions)
                               else PlannerClientOptions(planner, rpc_timeout=RPC_TIMEOUT_SECONDS))
        self.planner, self.worker_id, self.address, self.tier = self.client_options.address, worker_id, address, tier
        self.request = ppb.RegisterWorkerRequest(worker_id=worker_id, address=address, tier=tier,
                                                 profiles_json=profile_docs, tl_ids=tl_ids,
                                                 next_tiers=[a.strip() for a in next_tiers])
        self.refresh_seconds = refresh_seconds
        self.registered = asyncio.Event()
        # the planner connection left READY this often (a silent partition: within 1.8 s, by the control
        # channel's keep-alive; runtime.wire.transport) and when last (time.monotonic(); 0.0: never)
        self.connection_losses = 0
        self.lost_at = 0.0
        self.died: Callable[[str], None] | None = None  # called with "connection_lost" (the worker's metric)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        backoff = Backoff(0.5, MAX_BACKOFF_SECONDS)
        planner = PlannerClient(self.client_options)
        watcher = asyncio.get_running_loop().create_task(planner.watch_connection(self._lost))
        try:
            while True:
                try:
                    reply = await planner.register_worker(self.request)
                except EdgesplitError as e:
                    delay = backoff.next()
                    level = logging.ERROR if isinstance(e, (InvalidInput, PreconditionFailed)) else logging.WARNING
                    logger.log(level, "planner %s did not register worker %s: %s: %s (retry in %.1fs)", self.planner,
                               self.worker_id, e.code.name, e, delay)
                    await asyncio.sleep(delay)
                    continue
                if not self.registered.is_set():
                    logger.info("registered with planner %s as %s at %s (%d profiles)", self.planner, self.worker_id,
                                self.address, reply.profiles)
                self.registered.set()
                backoff.reset()
                await asyncio.sleep(self.refresh_seconds)
        finally:
            await cancel_and_wait(watcher)
            await planner.close()

    def _lost(self, state: str) -> None:
        self.connection_losses += 1
        self.lost_at = time.monotonic()
        if self.died is not None:
            self.died("connection_lost")
        if self.registered.is_set():
            logger.warning("connection to planner %s lost (%s); worker %s registers again in at most %.0fs",
                           self.planner, state, self.worker_id, self.refresh_seconds)

    async def close(self) -> None:
        """Stop re-registering and tell the planner this worker leaves (bounded: 1 s), so no plan keeps it."""
        await cancel_and_wait(self._task)
        if not self.registered.is_set():
            return
        leaving = ppb.RegisterWorkerRequest(worker_id=self.worker_id, address=self.address, tier=self.tier, leaving=True)
        planner = PlannerClient(dataclasses.replace(self.client_options, connect_timeout=1.0, rpc_timeout=1.0))
        try:
            await planner.register_worker(leaving)
        except EdgesplitError as e:
            logger.info("could not tell planner %s that %s leaves (%s); it expires there", self.planner,
                        self.worker_id, e)
        finally:
            await planner.close()
