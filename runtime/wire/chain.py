"""Worker chaining: a frame's route through the tiers after the device (shared by agent and worker).

A chained frame's header carries ``end_split`` (where the first worker's slice ends) and
``next_hops`` (the stages after it: the next worker's address, where its slice ends, and the codec
of the tensor sent to it). The device runs [input, split), the first worker [split, end_split),
each hop [previous end, its end_split); an empty end_split means "to the output" and ends the
route. A plan thus names which worker runs which slice, as the planner's N-tier configurations do
(device -> edge -> cloud).

A worker forwards only to the addresses it was started with (``--next-tier``); that check is the
worker's (runtime.worker.forward), this module only checks that a route is well formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from runtime.contracts.errors import EdgesplitError, InvalidInput
from runtime.models.loader import LoadedModel
from runtime.models.slicing import OUTPUT, SplitPoint
from runtime.proto.edgesplit.v1 import inference_pb2 as pb

MAX_HOPS = 8  # stages after the first worker a frame may name


class HopLike(Protocol):
    address: str
    end_split: str
    codec: str


@dataclass(frozen=True)
class Hop:
    """One stage after the first worker (the wire's ``edgesplit.v1.Hop``)."""

    address: str = ""  # next worker HOST:PORT, as in the forwarder's --next-tier; "" = its first one
    end_split: str = ""  # where that worker's slice ends; "" = it runs the rest of the model
    codec: str = ""  # codec of the tensor forwarded to it; "" = the forwarder's --forward-codec

    @classmethod
    def parse(cls, text: str, codec: str = "") -> Hop:
        """``ADDRESS`` or ``ADDRESS@END_SPLIT`` (the agent's ``--next-hop``); ``@END_SPLIT`` alone
        names the forwarding worker's first --next-tier."""
        address, sep, end = text.strip().rpartition("@")
        if not sep:
            address, end = end, ""
        return cls(address.strip(), end.strip(), codec)

    def to_pb(self) -> pb.Hop:
        return pb.Hop(address=self.address, end_split=self.end_split, codec=self.codec)

    def __str__(self) -> str:
        return (self.address or "(next tier)") + (f"@{self.end_split}" if self.end_split else "")


def slice_end(loaded: LoadedModel, split: SplitPoint, end_split: str) -> SplitPoint | None:
    """Where a slice that begins at ``split`` ends; None when it runs to the model output.

    NotFound for a split point the model lacks; InvalidInput when it is not after ``split``.
    """
    if not end_split or end_split == OUTPUT:
        return None
    end = loaded.split(end_split)  # NotFound with the valid range
    if end.name == OUTPUT:
        return None
    if end.index <= split.index:
        raise InvalidInput(
            f"end split {end_split!r} (index {end.index}) is not after split {split.name!r} (index {split.index}) "
            f"of {loaded.name}: a slice must end after it begins (see 'edgesplit models {loaded.name}')"
        )
    return end


def check_route(loaded: LoadedModel, split: SplitPoint, end_split: str,
                hops: Sequence[HopLike]) -> SplitPoint | None:
    """Check a whole route: each slice is non-empty and begins where the previous one ended.

    Returns where the first worker's slice ends (None: it runs the whole tail, nothing is forwarded).
    """
    if len(hops) > MAX_HOPS:
        raise InvalidInput(f"the route names {len(hops)} next hops; at most {MAX_HOPS} are allowed")
    end = slice_end(loaded, split, end_split)
    if end is None:
        if hops:
            raise InvalidInput("next hops are given but end_split is empty (the worker would run the whole tail "
                               "and forward nothing): set end_split to where the worker's slice ends")
        return None
    prev: SplitPoint | None = end
    for i, hop in enumerate(hops, 1):
        where = f"next hop {i} ({hop.address or 'the next tier'})"
        if prev is None:
            raise InvalidInput(f"{where} follows a hop that runs to the model output; drop it, or give the hop "
                               "before it an end_split")
        try:
            prev = slice_end(loaded, prev, hop.end_split)
        except EdgesplitError as e:
            raise type(e)(f"{where}: {e}", e.code) from None
    return end
