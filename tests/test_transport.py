"""Frame chunking on the stream: runtime.wire.transport.frame_messages and FrameAssembler (no server)."""

from __future__ import annotations

import os

import pytest

from runtime.contracts.errors import InvalidInput, TooLarge
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire.transport import FrameAssembler, TransportOptions, frame_messages

CHUNK = 1000
CAP = 1 << 20


def make_request(seq: int, nbytes: int) -> pb.InferRequest:
    payload = os.urandom(nbytes)
    return pb.InferRequest(
        header=pb.FrameHeader(agent_id="a", stream_epoch=3, seq=seq, model_id="m", split_id="s", plan_version=2),
        tensor=tensor_pb2.Tensor(
            shape=[nbytes], dtype="uint8", codec=tensor_pb2.CODEC_RAW, encoded_size=nbytes,
            buffer=payload, chunks=1, payload_size=nbytes,
        ),
    )


def feed_all(asm: FrameAssembler, msgs: list[pb.StreamRequest]) -> pb.InferRequest:
    """Feed every message; only the last may complete the frame."""
    for m in msgs[:-1]:
        assert asm.feed(m) is None
    out = asm.feed(msgs[-1])
    assert out is not None
    assert asm.pending_seq is None
    return out


def check_roundtrip(asm: FrameAssembler, req: pb.InferRequest, chunk: int) -> None:
    msgs = frame_messages(req, chunk)
    n = len(req.tensor.buffer)
    assert len(msgs) == max(1, -(-n // chunk))
    # no message carries more than `chunk` payload bytes
    assert len(msgs[0].frame.tensor.buffer) <= chunk
    assert all(len(m.chunk.data) <= chunk for m in msgs[1:])
    assert msgs[0].frame.tensor.chunks == len(msgs)
    assert msgs[0].frame.tensor.payload_size == n
    # survive the wire
    wire = [pb.StreamRequest.FromString(m.SerializeToString()) for m in msgs]
    out = feed_all(asm, wire)
    assert out.tensor.buffer == req.tensor.buffer  # exact bytes
    assert out.header == req.header
    assert out.tensor.chunks <= 1
    assert out.tensor.payload_size == n
    assert list(out.tensor.shape) == list(req.tensor.shape)


@pytest.mark.parametrize("nbytes", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, 10 * CHUNK + 7])
def test_roundtrip_sizes(nbytes):
    asm = FrameAssembler(CAP)
    check_roundtrip(asm, make_request(5, nbytes), CHUNK)


def test_many_frames_one_assembler():
    asm = FrameAssembler(CAP)
    for seq, n in enumerate([10, CHUNK, 3 * CHUNK + 5, 0, CHUNK + 1, 17]):
        check_roundtrip(asm, make_request(seq, n), CHUNK)


def test_frame_messages_does_not_modify_request():
    req = make_request(1, 3 * CHUNK)
    before = req.SerializeToString()
    frame_messages(req, CHUNK)
    assert req.SerializeToString() == before


def test_default_chunk_below_message_limit():
    t = TransportOptions()
    assert t.chunk_bytes < t.max_message_bytes


def test_declared_payload_over_cap_is_too_large():
    asm = FrameAssembler(4 * CHUNK)
    msgs = frame_messages(make_request(1, 4 * CHUNK + 1), CHUNK)
    with pytest.raises(TooLarge, match="exceeds"):
        asm.feed(msgs[0])
    assert asm.pending_seq is None
    # the claim alone is refused, even when the first piece is small
    lie = pb.StreamRequest()
    lie.CopyFrom(frame_messages(make_request(2, 2 * CHUNK), CHUNK)[0])
    lie.frame.tensor.payload_size = 1 << 30
    with pytest.raises(TooLarge):
        asm.feed(lie)
    # an unchunked frame at the cap is fine
    check_roundtrip(asm, make_request(3, 4 * CHUNK), CHUNK)


def test_single_message_payload_size_mismatch():
    asm = FrameAssembler(CAP)
    msg = frame_messages(make_request(1, 100), CHUNK)[0]
    msg.frame.tensor.payload_size = 99
    with pytest.raises(InvalidInput, match="payload_size"):
        asm.feed(msg)
    check_roundtrip(asm, make_request(2, 100), CHUNK)


def test_first_piece_larger_than_declared():
    asm = FrameAssembler(CAP)
    msgs = frame_messages(make_request(1, 3 * CHUNK), CHUNK)
    msgs[0].frame.tensor.payload_size = CHUNK - 1
    with pytest.raises(InvalidInput, match="larger than payload_size"):
        asm.feed(msgs[0])
    assert asm.pending_seq is None
    check_roundtrip(asm, make_request(2, 3 * CHUNK), CHUNK)


def _mutated(msgs, i, **fields):
    out = [pb.StreamRequest.FromString(m.SerializeToString()) for m in msgs]
    for k, v in fields.items():
        setattr(out[i].chunk, k, v)
    return out


@pytest.mark.parametrize(
    "case, phrase",
    [
        ("wrong_index", "expected chunk 2 of frame 7, got chunk 3"),
        ("repeated_index", "expected chunk 2 of frame 7, got chunk 1"),
        ("wrong_seq", "expected chunk 1 of frame 7, got chunk 1 of frame 8"),
        ("swapped", "expected chunk 2 of frame 7, got chunk 3"),
    ],
)
def test_bad_chunk_order_recovers(case, phrase):
    asm = FrameAssembler(CAP)
    msgs = frame_messages(make_request(7, 5 * CHUNK), CHUNK)  # frame + chunks 1..4
    if case == "wrong_index":
        msgs = _mutated(msgs, 2, index=3)
    elif case == "repeated_index":
        msgs = _mutated(msgs, 2, index=1)
    elif case == "wrong_seq":
        msgs = _mutated(msgs, 1, seq=8)
    else:
        msgs = [msgs[0], msgs[1], msgs[3], msgs[2], msgs[4]]
    with pytest.raises(InvalidInput, match=phrase):
        for m in msgs:
            assert asm.feed(m) is None
    assert asm.pending_seq is None
    # the next whole frame goes through
    check_roundtrip(asm, make_request(9, 3 * CHUNK + 1), CHUNK)


def test_chunk_with_no_frame_open():
    asm = FrameAssembler(CAP)
    msgs = frame_messages(make_request(4, 3 * CHUNK), CHUNK)
    with pytest.raises(InvalidInput, match="no frame open"):
        asm.feed(msgs[1])
    check_roundtrip(asm, make_request(5, 3 * CHUNK), CHUNK)


def test_new_frame_before_last_chunk():
    asm = FrameAssembler(CAP)
    first = frame_messages(make_request(1, 3 * CHUNK), CHUNK)
    second = frame_messages(make_request(2, 3 * CHUNK), CHUNK)
    assert asm.feed(first[0]) is None
    assert asm.feed(first[1]) is None
    assert asm.pending_seq == 1
    with pytest.raises(InvalidInput, match="frame 1 ended after 2 chunks"):
        asm.feed(second[0])
    assert asm.pending_seq is None
    check_roundtrip(asm, make_request(3, 2 * CHUNK + 3), CHUNK)


def test_extra_bytes_in_chunks():
    asm = FrameAssembler(CAP)
    msgs = frame_messages(make_request(1, 3 * CHUNK), CHUNK)
    msgs = _mutated(msgs, 2, data=b"x" * (CHUNK + 1))
    assert asm.feed(msgs[0]) is None
    assert asm.feed(msgs[1]) is None
    with pytest.raises(InvalidInput, match="exceed the declared payload_size"):
        asm.feed(msgs[2])
    assert asm.pending_seq is None
    check_roundtrip(asm, make_request(2, 3 * CHUNK), CHUNK)


def test_too_few_bytes_in_chunks():
    asm = FrameAssembler(CAP)
    msgs = frame_messages(make_request(1, 3 * CHUNK), CHUNK)
    msgs = _mutated(msgs, 2, data=b"x" * (CHUNK - 1))
    assert asm.feed(msgs[0]) is None
    assert asm.feed(msgs[1]) is None
    with pytest.raises(InvalidInput, match="payload_size is 3000"):
        asm.feed(msgs[2])
    assert asm.pending_seq is None
    check_roundtrip(asm, make_request(2, 3 * CHUNK), CHUNK)


def test_empty_stream_request():
    asm = FrameAssembler(CAP)
    with pytest.raises(InvalidInput, match="empty StreamRequest"):
        asm.feed(pb.StreamRequest())
    check_roundtrip(asm, make_request(1, CHUNK + 1), CHUNK)
