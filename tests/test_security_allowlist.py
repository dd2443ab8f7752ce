"""Prepare and frames limited to the models a worker serves (issue 10 part 5, ``--serve-models``): a caller
cannot make the worker load a model it was not deployed for; refused PERMISSION_DENIED with what to
change, before anything is loaded (asserted on the worker's own list of loaded models)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from runtime.contracts.errors import InvalidInput, PermissionDenied
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.worker.allowlist import served_models
from runtime.worker.config import WorkerConfig

pytestmark = pytest.mark.timeout(120)
RPC = 30.0
BUNDLED = {"digits_cnn", "resnet18", "vgg16", "efficientnet_lite0"}


def test_the_list_comes_from_serve_else_from_what_the_configuration_names():
    assert served_models(WorkerConfig(), BUNDLED).allowed is None  # names none: the quick start serves all
    assert served_models(WorkerConfig(serve_models=("all",)), BUNDLED).allowed is None
    assert served_models(WorkerConfig(serve_models=("digits_cnn", "vgg16")), BUNDLED).allowed == {"digits_cnn", "vgg16"}
    assert served_models(WorkerConfig(preload=("resnet18@add_2", "digits_cnn")), BUNDLED).allowed == {
        "resnet18", "digits_cnn"}
    # the bundled Transfer Layer artifact names its model
    assert served_models(WorkerConfig(tls=("tl-d1a2152e9a29",)), BUNDLED).allowed == {"efficientnet_lite0"}
    # --serve-models wins over what the configuration names
    assert served_models(WorkerConfig(serve_models=("vgg16",), preload=("resnet18",)), BUNDLED).allowed == {"vgg16"}
    with pytest.raises(InvalidInput, match="--serve-models names nosuch"):
        served_models(WorkerConfig(serve_models=("nosuch",)), BUNDLED)


def test_a_refusal_says_what_to_change():
    served = served_models(WorkerConfig(preload=("digits_cnn",)), BUNDLED)
    served.check("digits_cnn")
    with pytest.raises(PermissionDenied) as info:
        served.check("vgg16")
    assert "--serve-models vgg16" in str(info.value) and "--preload" in str(info.value) and "digits_cnn" in str(info.value)


def test_profiles_name_the_models_served():
    from pathlib import Path

    edge = Path(__file__).resolve().parents[1] / "runtime/measure/fleet/profiles/efficientnet_lite0-edge.json"
    assert served_models(WorkerConfig(profiles=(str(edge),)), BUNDLED).allowed == {"efficientnet_lite0"}


def test_a_worker_refuses_prepare_frames_and_tiles_of_models_it_does_not_serve():
    from runtime.worker.server import serve

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, serve_models=("digits_cnn",)))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ws.port}") as ch:
                stub = pb_grpc.InferenceStub(ch)
                ok = await stub.Prepare(pb.PrepareRequest(header=pb.FrameHeader(model_id="digits_cnn",
                                                                                split_id="pool1")), timeout=RPC)
                refused = []
                for model, split in (("resnet18", "add_2"), ("vgg16", "pool5"), ("efficientnet_lite0", "input")):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Prepare(pb.PrepareRequest(header=pb.FrameHeader(model_id=model, split_id=split)),
                                           timeout=RPC)
                    refused.append((info.value.code(), info.value.details()))
                call = stub.InferStream(timeout=RPC)
                await call.write(pb.StreamRequest(frame=pb.InferRequest(
                    header=pb.FrameHeader(agent_id="x", seq=7, model_id="vgg16", split_id="pool5"),
                    tensor=tensor_pb2.Tensor(shape=[1, 512, 7, 7], dtype="float32", buffer=bytes(4 * 512 * 49)))))
                frame = await asyncio.wait_for(call.read(), RPC)
                await call.done_writing()
                from runtime.proto.edgesplit.v1 import tiles_pb2, tiles_pb2_grpc

                with pytest.raises(grpc.aio.AioRpcError) as info:  # tiles of a parallel stage: the same list
                    await tiles_pb2_grpc.TilesStub(ch).InferTile(tiles_pb2.TileRequest(
                        header=pb.FrameHeader(agent_id="x", seq=1, model_id="vgg16", split_id="pool1",
                                              end_split="pool2"), input_height=56, input_width=56), timeout=RPC)
                refused.append((info.value.code(), info.value.details()))
                return ok, refused, frame, sorted(ws.service.tails._models)
        finally:
            await ws.drain_and_stop(0.5)

    ok, refused, frame, loaded = asyncio.run(go())
    assert list(ok.input_shape)
    for code, details in refused:
        assert code == grpc.StatusCode.PERMISSION_DENIED and "--serve-models" in details and "digits_cnn" in details
    assert frame.header.seq == 7 and frame.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert loaded == ["digits_cnn"]  # nothing else was loaded
