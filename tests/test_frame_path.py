"""The agent's frame path without payload copies (issue 14): a frame encoded straight into its stream
message goes out as that message when it fits one; a larger one is cut into chunks that the worker's
assembler puts back together byte for byte; encode_into equals encode."""

from __future__ import annotations

import pytest
import torch

from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.codec import get_codec
from runtime.wire.transport import FrameAssembler, frame_messages


@pytest.mark.parametrize("codec", ["raw", "fp16+lz4", "int8"])
def test_encode_into_a_stream_message_equals_encode(codec):
    x = torch.randn(1, 8, 20, 20, generator=torch.Generator().manual_seed(1))
    c = get_codec(codec)
    msg = pb.StreamRequest()
    c.encode_into(x, msg.frame.tensor)
    assert msg.frame.tensor == c.encode(x)
    assert msg.frame.tensor.payload_size == len(msg.frame.tensor.buffer)


@pytest.mark.parametrize("chunk", [1 << 20, 10_000])
def test_a_stream_message_frame_is_sent_as_is_or_chunked_and_reassembled(chunk):
    x = torch.randn(1, 16, 40, 40, generator=torch.Generator().manual_seed(2))  # 102 KB raw
    c = get_codec("raw")
    req = pb.StreamRequest()
    c.encode_into(x, req.frame.tensor)
    req.frame.header.seq = 7
    whole = bytes(req.frame.tensor.buffer)
    msgs = frame_messages(req, chunk)
    if chunk > len(whole):
        assert len(msgs) == 1 and msgs[0] is req  # no copy into another message
    else:
        assert len(msgs) == -(-len(whole) // chunk) and all(m.chunk.seq == 7 for m in msgs[1:])
    asm = FrameAssembler(1 << 22)
    frames = [f for f in (asm.feed(m) for m in msgs) if f is not None]
    assert len(frames) == 1 and frames[0].tensor.buffer == whole
    assert torch.equal(c.decode(frames[0].tensor), x)


def test_overhead_parts_account_for_the_whole_overhead():
    """agent + codec + gRPC + worker hand-offs = total - head - tail - queueing, frame by frame."""
    from types import SimpleNamespace

    from runtime.agent.summary import runtime_overhead
    from runtime.measure.bench import overhead_parts

    t = {"board_queue": 0.001, "head": 0.010, "encode": 0.0005, "transfer_edge": 0.020, "edge_queue": 0.002,
         "edge_decode": 0.0003, "edge_tail": 0.012, "edge_held": 0.0151, "total": 0.0330}
    r = SimpleNamespace(times=t)
    parts = overhead_parts([r])
    assert parts["agent"] == pytest.approx(1.5) and parts["codec"] == pytest.approx(0.8)
    assert parts["grpc"] == pytest.approx(4.9) and parts["worker"] == pytest.approx(0.8)
    assert sum(parts.values()) == pytest.approx(runtime_overhead(r) * 1e3)
    older = overhead_parts([SimpleNamespace(times={k: v for k, v in t.items() if k != "edge_held"})])
    assert older["worker"] != older["worker"] and older["agent"] == pytest.approx(1.5)  # nan: no worker timestamps
