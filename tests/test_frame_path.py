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
