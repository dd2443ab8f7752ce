"""Frames on the stream without protobuf copies (runtime.wire.framewire): the bytes an OutFrame writes are
the StreamRequest protobuf would write, and parse_request reads any StreamRequest back as protobuf does."""

from __future__ import annotations

import pytest
import torch

from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.codec import decode_tensor, get_codec, wire_bytes
from runtime.wire.framewire import MAX_SCANNED_FIELDS, MIN_ZERO_COPY_BYTES, InFrame, parse_request, serialize_request
from runtime.wire.transport import FrameAssembler, frame_messages

CODECS = ["raw", "fp16", "int8", "raw+lz4", "fp16+lz4", "int8+lz4"]
SHAPES = [(1, 16, 112, 112), (1, 80, 14, 14), (1, 10), (0, 3)]


def _header(msg: pb.InferRequest) -> None:
    msg.header.seq, msg.header.model_id, msg.header.split_id, msg.header.agent_id = 7, "m", "conv2d_2", "a1"
    msg.header.trace_context["traceparent"] = "00-ab-cd-01"


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_outframe_bytes_parse_as_the_plain_message(name, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    codec = get_codec(name)
    out = codec.encode_frame(x)
    _header(out.request.frame)
    plain = pb.StreamRequest()
    codec.encode_into(x, plain.frame.tensor)
    _header(plain.frame)
    data = serialize_request(out)
    assert pb.StreamRequest.FromString(data) == plain  # any protobuf parser reads the same message
    assert out.wire_bytes() == wire_bytes(plain.frame.tensor)
    assert serialize_request(plain) == plain.SerializeToString()


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_parse_request_decodes_as_protobuf_does(name, shape):
    torch.manual_seed(1)
    x = torch.randn(shape)
    out = get_codec(name).encode_frame(x)
    _header(out.request.frame)
    data = out.serialize()
    got = parse_request(data)
    assert isinstance(got, InFrame) == (len(data) >= MIN_ZERO_COPY_BYTES)
    frame = FrameAssembler(1 << 30).feed(got)
    ref = FrameAssembler(1 << 30).feed(pb.StreamRequest.FromString(data))
    assert frame.header == ref.header
    assert len(frame.tensor.buffer) == len(ref.tensor.buffer) == frame.tensor.payload_size
    assert torch.equal(decode_tensor(frame.tensor), decode_tensor(ref.tensor))


def test_parse_request_of_a_protobuf_written_frame():
    """A sender that does not use OutFrame (another client, the forward path) writes plain protobuf."""
    x = torch.randn(1, 16, 112, 112)
    plain = pb.StreamRequest()
    get_codec("raw").encode_into(x, plain.frame.tensor)
    _header(plain.frame)
    got = parse_request(plain.SerializeToString())
    assert isinstance(got, InFrame)
    assert got.header == plain.frame.header
    assert torch.equal(decode_tensor(got.tensor), x)


def test_parse_request_refuses_what_protobuf_refuses():
    x = torch.randn(1, 16, 112, 112)
    data = get_codec("raw").encode_frame(x).serialize()
    with pytest.raises(Exception) as want:
        pb.StreamRequest.FromString(data[:-5])
    with pytest.raises(type(want.value)):
        parse_request(data[:-5])  # truncated: protobuf's own error, as before
    assert isinstance(parse_request(b"\x12" + data[1:]), pb.StreamRequest)  # not a frame: protobuf's own reading


def test_parse_request_scans_a_bounded_number_of_fields():
    """A frame padded with many tiny unknown fields is left to protobuf's C parser, not walked in Python: the
    same message either way, and the scan stops after MAX_SCANNED_FIELDS."""
    x = torch.randn(1, 16, 112, 112)
    frame = get_codec("raw").encode_frame(x)
    _header(frame.frame)
    msg = pb.StreamRequest.FromString(frame.serialize())
    padding = b"\xf8\x07\x01" * (MAX_SCANNED_FIELDS + 1)  # field 127, varint 1: unknown to InferRequest
    inner = msg.frame.SerializeToString() + padding
    data = b"\x0a" + _varint(len(inner)) + inner
    got = parse_request(data)
    assert not isinstance(got, InFrame)  # protobuf's own reading
    assert got.frame.header == msg.frame.header and got.frame.tensor.buffer == msg.frame.tensor.buffer


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def test_size_checks_see_the_received_length():
    """The assembler checks payload_size against the bytes that arrived, not against the header's claim."""
    x = torch.randn(1, 16, 112, 112)
    out = get_codec("raw").encode_frame(x)
    out.request.frame.tensor.payload_size += 4  # a lying header
    got = parse_request(out.serialize())
    assert isinstance(got, InFrame)
    with pytest.raises(Exception, match="payload_size"):
        FrameAssembler(1 << 30).feed(got)
    with pytest.raises(Exception, match="exceeds this worker's cap"):
        FrameAssembler(1000).feed(parse_request(get_codec("raw").encode_frame(x).serialize()))


def test_outframe_larger_than_a_message_goes_in_chunks():
    x = torch.randn(1, 16, 112, 112)
    out = get_codec("raw").encode_frame(x)
    _header(out.request.frame)
    msgs = frame_messages(out, 300_000)
    assert len(msgs) == 3 and all(isinstance(m, pb.StreamRequest) for m in msgs)
    asm = FrameAssembler(1 << 30)
    frames = [asm.feed(parse_request(serialize_request(m))) for m in msgs]
    assert frames[:2] == [None, None]
    assert torch.equal(decode_tensor(frames[2].tensor), x)
    small = get_codec("raw").encode_frame(x)
    assert frame_messages(small, 1 << 20) == [small]  # fits one message: sent as it is


def test_worker_registration_keeps_every_generated_method():
    """add_inference_servicer registers what the generated code does, InferStream read by parse_request."""
    from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
    from runtime.worker.service import _Handlers, add_inference_servicer

    class Servicer(pb_grpc.InferenceServicer):
        pass

    generated, ours = _Handlers(), _Handlers()
    pb_grpc.add_InferenceServicer_to_server(Servicer(), generated)
    add_inference_servicer(Servicer(), ours)
    assert ours.service == generated.service == "edgesplit.v1.Inference"
    assert set(ours.handlers) == set(generated.handlers) == {m.name for m in pb.DESCRIPTOR.services_by_name["Inference"].methods}
    for name, handler in ours.handlers.items():
        want = parse_request if name == "InferStream" else generated.handlers[name].request_deserializer
        assert handler.request_deserializer == want
        assert handler.response_serializer == generated.handlers[name].response_serializer
