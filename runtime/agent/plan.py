"""Plans on the agent: the ActivePlan a frame runs under, and the PlanBuilder that checks and builds
a new one (model, version, split, codec, TL, route) and has its worker accept it before the switch."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from runtime.contracts.errors import DeadlineExceeded, EdgesplitError, InvalidInput, PreconditionFailed, Unavailable
from runtime.models.loader import LoadedModel
from runtime.models.slicing import OUTPUT, SplitPoint
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.chain import Hop, check_route
from runtime.wire.codec import Codec, codec_at, get_codec
from runtime.wire.stream import EdgeStream

if TYPE_CHECKING:
    from runtime.transfer.artifact import LoadedTL

logger = logging.getLogger(__name__)


_PUSHED_TL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def pushed_tl_id(tl_id: str) -> str | None:
    """A Transfer Layer id from a pushed plan, checked: an id is looked up in the agent's --tl-dir (and the bundled
    TLs), so it must be a bare id ("tl-" + 12 hex as 'edgesplit tl train' writes), never a path or a file name
    (InvalidInput; the plan is refused). "" -> None (no TL)."""
    if not tl_id:
        return None
    if not _PUSHED_TL_ID.fullmatch(tl_id) or tl_id.endswith((".json", ".safetensors")):
        raise InvalidInput(f"the plan's tl_id {tl_id[:64]!r} is not a Transfer Layer id (letters, digits, '_', '.', "
                           "'-', at most 128, no path or file name): the agent resolves ids in its --tl-dir only")
    return tl_id

@dataclass(frozen=True)
class ActivePlan:
    """Everything one frame needs, switched as a whole.

    A frame reads ``Agent.active`` once, before its first ``await``, and uses only that object
    until it has its result: head, TL encoder, wire codec, header (split, plan version, TL id),
    stream, and the local tail for fallback. ``Agent.apply_plan`` builds a new ActivePlan in full
    and then replaces ``Agent.active`` in one assignment, so a frame never mixes two plans.
    """

    version: int
    split: SplitPoint
    codec: Codec
    head: torch.nn.Module
    local_tail: torch.nn.Module
    tl: LoadedTL | None = None
    stream: EdgeStream | None = None  # None: every frame runs on the board
    # Worker chaining (runtime.wire.chain): the worker runs [split, end_split) and forwards to next_hops.
    end_split: str = ""  # where the worker's slice ends; "" = the worker runs the whole tail
    next_hops: tuple[Hop, ...] = ()  # the tiers after the worker, in order (none: its first --next-tier)
    fallback: bool = False  # an entry of the plan's fallback table, run under its version (runtime.agent.fallbacks)

    @property
    def encoder(self) -> torch.nn.Module | None:
        return self.tl.tl.encoder if self.tl is not None else None

    @property
    def tl_id(self) -> str:
        return self.tl.tl_id if self.tl is not None else ""

    @property
    def worker(self) -> str:
        return self.stream.address if self.stream is not None else ""

    @property
    def chain(self) -> str:
        """The chain after the worker, for logs ("" when the worker runs the whole tail)."""
        if not self.end_split:
            return ""
        return f" (slice ..{self.end_split}, then " + " -> ".join(map(str, self.next_hops or (Hop(),))) + ")"


class PlanBuilder:
    """Checks a plan against this agent's model and builds it off the event loop (no switch here)."""

    def __init__(self, loaded: LoadedModel, agent_id: str, tl_dir: str, prepare_timeout: float,
                 new_stream: Callable[[str], EdgeStream]):
        self.loaded = loaded
        self.agent_id = agent_id
        self.tl_dir = tl_dir
        self.prepare_timeout = prepare_timeout
        self.new_stream = new_stream

    def header(self, plan: ActivePlan, seq: int = 0) -> pb.FrameHeader:
        return pb.FrameHeader(agent_id=self.agent_id, seq=seq, model_id=self.loaded.name, split_id=plan.split.name,
                              plan_version=plan.version, model_digest=self.loaded.digest, tl_id=plan.tl_id,
                              end_split=plan.end_split, next_hops=[h.to_pb() for h in plan.next_hops])

    def check_route(self, split: SplitPoint, end_split: str, next_hops: Sequence[Hop | str],
                    has_worker: bool) -> tuple[str, tuple[Hop, ...]]:
        """(end split name or "", hops) of a chained plan, checked against the model. Raises EdgesplitError."""
        hops = tuple(h if isinstance(h, Hop) else Hop.parse(h) for h in next_hops)
        end = check_route(self.loaded, split, end_split, hops)  # NotFound / InvalidInput
        if end is not None and not has_worker:
            raise InvalidInput(f"end split {end_split!r} names a slice for the worker, but the plan has no worker "
                               "(or runs every layer here): give a worker, or drop end_split")
        return (end.name if end is not None else ""), hops

    async def build(self, current: ActivePlan, streams: dict[str, EdgeStream], split, codec, tl, version: int,
                    address: str, model_id: str, end_split: str = "", next_hops: Sequence = (),
                    fallback: bool = False) -> tuple[ActivePlan, bool]:
        """The new plan, fully built and accepted by its worker; and whether its stream is new.

        ``address``: the worker the plan uses ("" for none); ``streams``: the agent's open streams by address."""
        if model_id and model_id != self.loaded.name:
            raise PreconditionFailed(f"the plan is for model {model_id!r}, but this agent runs {self.loaded.name!r}")
        if version < current.version or (version == current.version and not fallback):
            raise PreconditionFailed(f"stale plan: version {version} is not newer than the current v{current.version}")
        sp = self.loaded.split(split)  # NotFound with the valid range
        art = await self.resolve_tl(current, tl, sp)
        local = sp.name == OUTPUT or not address
        # InvalidInput with the valid names; "ans" codes with the plan's (transform) TL's model; jpeg only at split 0
        cod = codec if isinstance(codec, Codec) else get_codec(codec, model=art.tl.entropy_model if art else None,
                                                               spec=self.loaded.spec)
        try:
            cod = codec_at(cod, sp.index, sp.name)
        except InvalidInput:
            if not local:
                raise
            # a local plan sends nothing: the codec it keeps from the plan before (a plan naming no codec
            # keeps the current one, e.g. jpeg at split 0) does not bind it
            cod = get_codec("raw")
        loop = asyncio.get_running_loop()
        # Not on the board thread: frames keep running while the new head and tail are built.
        head, tail = await loop.run_in_executor(None, lambda: (self.loaded.head(sp.name), self.loaded.tail(sp.name)))
        end, hops = self.check_route(sp, end_split, next_hops, sp.name != OUTPUT and bool(address))
        if local:
            return ActivePlan(version, sp, cod, head, tail, art, None, fallback=fallback), False
        stream = streams.get(address)
        fresh = stream is None
        if stream is None:
            stream = self.new_stream(address)
        plan = ActivePlan(version, sp, cod, head, tail, art, stream, end, hops, fallback)
        await self._prepare(plan, stream, fresh)
        return plan, fresh

    async def _prepare(self, plan: ActivePlan, stream: EdgeStream, fresh: bool) -> None:
        """Have the worker accept ``plan`` (closing a fresh stream on any failure). Raises EdgesplitError."""
        address, sp = stream.address, plan.split
        try:
            await stream.prepare(self.header(plan), self.prepare_timeout)
        except (Unavailable, DeadlineExceeded) as e:
            if fresh:
                await stream.close()
                raise Unavailable(f"worker {address} did not answer: {e}") from None
            logger.warning("worker %s unreachable while switching to plan v%d; switching anyway (frames fall "
                           "back locally until it answers): %s", address, plan.version, e)
        except EdgesplitError as e:
            if fresh:
                await stream.close()
            raise type(e)(f"worker {address} refused {self.loaded.name}@{sp.name}"
                          f"{' with TL ' + plan.tl_id if plan.tl_id else ''}: {e}", e.code) from None
        except BaseException:
            if fresh:
                await stream.close()
            raise

    async def resolve_tl(self, current: ActivePlan, tl, sp: SplitPoint):
        if tl is None or tl == "":
            return None
        from runtime.transfer.artifact import LoadedTL, load_tl

        if isinstance(tl, LoadedTL):
            art = tl
        elif current.tl is not None and str(tl) in (current.tl.tl_id, str(current.tl.path)):
            art = current.tl
        else:
            loop = asyncio.get_running_loop()
            try:
                art = await loop.run_in_executor(None, lambda: load_tl(tl, self.tl_dir or None, loaded=self.loaded))
            except EdgesplitError as e:
                raise type(e)(f"Transfer Layer {str(tl)!r} (tl_dir {self.tl_dir or '.'!r}): {e}", e.code) from None
        if art.model.name != self.loaded.name or art.model.digest != self.loaded.digest:
            raise PreconditionFailed(f"Transfer Layer {art.tl_id} is for {art.model.name} weights {art.model.digest}, "
                                     f"not {self.loaded.name} weights {self.loaded.digest}")
        if art.split.name != sp.name:
            raise PreconditionFailed(f"Transfer Layer {art.tl_id} is for split {art.split.name!r}, "
                                     f"but the plan names split {sp.name!r}")
        return art
