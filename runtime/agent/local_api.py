"""The agent's local API: other programs on the board submit frames over gRPC.

Listen on loopback (``127.0.0.1:PORT``) or a Unix socket (``unix:/run/edgesplit/agent.sock``);
never on a public interface: the API has no authentication.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from runtime.agent.client import Agent
from runtime.agent.sources import load_image
from runtime.contracts.errors import InvalidInput
from runtime.daemon.server import Daemon, DaemonOptions
from runtime.models import preprocess
from runtime.proto.edgesplit.v1 import agent_pb2, agent_pb2_grpc
from runtime.wire.codec import decode_tensor, encode_output
from runtime.wire.security import SecurityOptions, is_loopback

logger = logging.getLogger(__name__)

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name

MAX_IMAGE_BYTES = 32 * 2**20


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, agent: Agent):
        self.agent = agent
        # a submitted image (up to 40 M pixels) is decoded off the event loop, which carries every frame's
        # stream; one thread: decodes go one at a time, as they did on the loop, so memory stays one image's
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-api-decode")

    def _input(self, request: agent_pb2.SubmitRequest) -> torch.Tensor:
        kind = request.WhichOneof("input")
        if kind == "image":
            if len(request.image) > MAX_IMAGE_BYTES:
                raise InvalidInput(f"image of {len(request.image)} bytes exceeds {MAX_IMAGE_BYTES}")
            return preprocess(self.agent.loaded.spec, load_image(request.image))
        if kind == "tensor":
            want = list(self.agent.loaded.input_shape)
            if list(request.tensor.shape) != want or request.tensor.dtype != "float32":
                raise InvalidInput(f"tensor must be float32 of shape {want}, got {request.tensor.dtype} {list(request.tensor.shape)}")
            return decode_tensor(request.tensor, max_bytes=4 * 2**20 * 16)
        raise InvalidInput("SubmitRequest needs 'image' (PNG/JPEG bytes) or 'tensor'")

    async def Submit(self, request, context):
        # an EdgesplitError becomes its status in the daemon's interceptor
        x = await asyncio.get_running_loop().run_in_executor(self.decoder, self._input, request)
        r = await self.agent.infer(x, "local-api")
        idx, score = r.top1()
        labels = self.agent.loaded.spec.labels
        t = r.times
        return agent_pb2.SubmitResult(
            seq=r.seq, class_index=idx, label=labels[idx] if labels and idx < len(labels) else "",
            score=score, where=r.where, fallback_reason=r.fallback_reason, plan_version=r.plan_version,
            split_id=r.split, head_seconds=t.get("head", 0.0), encode_seconds=t.get("encode", 0.0),
            transfer_edge_seconds=t.get("transfer_edge", 0.0), total_seconds=t.get("total", 0.0),
            wire_bytes=r.wire_bytes, output=encode_output(r.output),
        )


@dataclass
class LocalApi:
    daemon: Daemon
    service: AgentService | None = None  # its image decoder thread is ended on stop

    @property
    def server(self):
        return self.daemon.server

    @property
    def address(self) -> str:
        return self.daemon.address

    async def stop(self, grace: float) -> None:
        """Health NOT_SERVING, then stop (calls in flight get ``grace`` seconds)."""
        await self.daemon.drain(grace)
        if self.service is not None:
            self.service.decoder.shutdown(wait=False)


async def serve_local_api(agent: Agent, address: str) -> LocalApi:
    transport = agent.transport
    if is_loopback(address):  # programs on the board: plain (the agent's certificate is a client's, for the worker)
        transport = dataclasses.replace(transport, security=SecurityOptions())
    daemon = Daemon(DaemonOptions(listen=address, services=(SERVICE_NAME,), transport=transport))
    service = AgentService(agent)
    await daemon.start(lambda server: agent_pb2_grpc.add_AgentServicer_to_server(service, server))
    return LocalApi(daemon, service)
