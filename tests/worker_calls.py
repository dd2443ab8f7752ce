"""A real worker in the test's own process, one unary Infer call per request: what the input codec tests
(test_codec_pixels, test_codec_webp, test_jpeg) send a frame's encoded tensor through."""

from __future__ import annotations

import grpc

from runtime.models.loader import LoadedModel
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve

RPC_TIMEOUT = 60.0  # one call's deadline: an EfficientNet frame on a loaded 2-core machine


def infer_request(loaded: LoadedModel, tensor: tensor_pb2.Tensor, split: str = "input", seq: int = 0) -> pb.InferRequest:
    """``tensor`` as agent "t"'s frame ``seq`` of ``loaded`` at ``split``, with the model's digest."""
    h = pb.FrameHeader(agent_id="t", stream_epoch=1, seq=seq, model_id=loaded.name, split_id=split,
                       model_digest=loaded.digest)
    return pb.InferRequest(header=h, tensor=tensor)


async def infer_each(reqs: list[pb.InferRequest]) -> list[pb.InferResult | grpc.aio.AioRpcError]:
    """Each request's answer from a worker on 127.0.0.1:0 (one torch thread, one frame at a time), in order: the
    response, or the call's error (its status and details are what the tests read)."""
    ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, max_concurrency=1))
    out: list[pb.InferResult | grpc.aio.AioRpcError] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
            stub = pb_grpc.InferenceStub(ch)
            for r in reqs:
                try:
                    out.append(await stub.Infer(r, timeout=RPC_TIMEOUT))
                except grpc.aio.AioRpcError as e:
                    out.append(e)
    finally:
        await ws.drain_and_stop(1)
    return out
