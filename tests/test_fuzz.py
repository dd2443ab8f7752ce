"""Property-based fuzzing (Hypothesis, bounded example counts) of what parses untrusted bytes: the wire
tensor decoder, frame reassembly and the profile parser. Whatever the input, the answer is a decoded
value or an EdgesplitError (a status a client can act on), never another exception, and reassembly
never holds more than its budget."""

from __future__ import annotations

import contextlib
import json

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test extra: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from runtime.contracts import profile as profiles  # noqa: E402
from runtime.contracts.errors import EdgesplitError  # noqa: E402
from runtime.proto.edgesplit.v1 import inference_pb2 as pb  # noqa: E402
from runtime.proto.edgesplit.v1 import tensor_pb2  # noqa: E402
from runtime.wire.budget import ByteBudget  # noqa: E402
from runtime.wire.codec import decode_tensor  # noqa: E402
from runtime.wire.transport import FrameAssembler  # noqa: E402

pytestmark = pytest.mark.timeout(120)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CODECS = list(tensor_pb2.Codec.values())
tensors = st.builds(
    tensor_pb2.Tensor,
    shape=st.lists(st.integers(0, 2**20), max_size=5),
    dtype=st.sampled_from(["float32", "float16", "int8", "uint8", "bogus", ""]),
    codec=st.sampled_from(CODECS),
    buffer=st.binary(max_size=4096),
    encoded_size=st.integers(0, 2**33),
    payload_size=st.integers(0, 2**33),
    scale=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=8),
)


@FUZZ
@given(tensors)
def test_the_tensor_decoder_answers_or_refuses(msg):
    try:
        out = decode_tensor(msg, max_bytes=1 << 20)
    except EdgesplitError:
        return
    assert out.numel() * out.element_size() <= 1 << 20


messages = st.one_of(
    st.builds(lambda seq, size, chunks, n: pb.StreamRequest(frame=pb.InferRequest(
        header=pb.FrameHeader(seq=seq), tensor=tensor_pb2.Tensor(buffer=bytes(n), payload_size=size, chunks=chunks))),
        st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 6), st.integers(0, 3000)),
    st.builds(lambda seq, index, n: pb.StreamRequest(chunk=pb.FrameChunk(seq=seq, index=index, data=bytes(n))),
              st.integers(0, 3), st.integers(0, 6), st.integers(0, 3000)),
    st.just(pb.StreamRequest()),
)


@FUZZ
@given(st.lists(messages, max_size=30))
def test_reassembly_never_holds_more_than_its_budget(msgs):
    budget = ByteBudget(total_bytes=4000, timeout=60.0)
    asm = FrameAssembler(8000, budget)
    for m in msgs:
        try:
            frame = asm.feed(m)
        except EdgesplitError:
            continue
        finally:
            assert 0 <= budget.held <= 4000
        if frame is not None:
            assert len(frame.tensor.buffer) == (frame.tensor.payload_size or len(frame.tensor.buffer))
    asm.close()
    assert budget.held == 0


GOOD = json.loads(profiles.Profile(
    machine="m", role="device", model="t", input_bytes=10,
    blocks=(profiles.Block(index=0, name="a", seconds=0.1, output_bytes=4),
            profiles.Block(index=1, name="b", seconds=0.2, output_bytes=4))).to_json())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


@FUZZ
@given(st.sampled_from(["input_bytes", "blocks", "settings", "role", "version", "model"]), json_values)
def test_the_profile_parser_answers_or_refuses(key, value):
    doc = dict(GOOD, **{key: value})
    try:
        text = json.dumps(doc)
    except ValueError:
        return
    try:
        p = profiles.loads(text)
    except EdgesplitError:
        return
    assert p.n_blocks >= 1


@FUZZ
@given(st.binary(max_size=2000))
def test_the_profile_parser_survives_any_bytes(data):
    with contextlib.suppress(EdgesplitError):
        profiles.loads(data)


@FUZZ
@given(text=st.binary(max_size=2048))
def test_tokens_and_crl_files_answer_a_table_or_invalid_input(tmp_path_factory, text):
    """A server's tokens file and CRL file (operator-written, re-read while serving): any bytes give the
    table / the revoked serials or InvalidInput (a bad edit keeps the previous list), never a crash."""
    from runtime.contracts.errors import InvalidInput
    from runtime.daemon.revocation import load_crl
    from runtime.tools import pki
    from runtime.wire.security import load_tokens, read_token

    d = tmp_path_factory.mktemp("f")
    (d / "tokens").write_bytes(text)
    with contextlib.suppress(InvalidInput):
        table = load_tokens(str(d / "tokens"))
        assert all(len(k) == 64 for k in table)
    with contextlib.suppress(InvalidInput):  # a client's token file
        assert read_token(str(d / "tokens"))
    ca = pki.make_ca()
    pki.write(ca, d, "ca")
    (d / "crl").write_bytes(text)
    with contextlib.suppress(InvalidInput):
        load_crl(str(d / "crl"), str(d / "ca.pem"))
