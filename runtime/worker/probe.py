"""The worker's side of a bandwidth probe (issue 11): ``Inference.Probe`` carries a payload the agent
times, to measure a link no frame measures (the agent runs locally, or its frames are too small).
The worker does no work on it: it checks the size and counts the bytes."""

from __future__ import annotations

from runtime.contracts.errors import InvalidInput
from runtime.proto.edgesplit.v1 import inference_pb2 as pb

MAX_PROBE_BYTES = 2**20  # largest probe payload answered (the agent's default probes stay at or under 256 KiB)


def answer(request: pb.ProbeRequest, limit: int = MAX_PROBE_BYTES) -> pb.ProbeReply:
    """The reply to one probe; InvalidInput for a payload over ``limit`` (gRPC's message limit bounds
    what was received before this check)."""
    n = len(request.payload)
    if n > limit:
        raise InvalidInput(f"probe payload of {n} bytes is over the worker's limit of {limit}; send at most {limit}")
    return pb.ProbeReply(received_bytes=n)
