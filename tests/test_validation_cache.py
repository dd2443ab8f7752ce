"""validate_tensor's memo of headers that passed (issue 14): a repeated header skips its checks, but never the
checks that depend on the message itself (the payload's size, an int8 header's scale values)."""

from __future__ import annotations

import pytest
import torch

from runtime.contracts.errors import InvalidInput, TooLarge
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire import validation
from runtime.wire.codec import get_codec
from runtime.wire.validation import validate_tensor


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch):
    monkeypatch.setattr(validation, "_PASSED", {})


def _encoded(codec: str, shape=(1, 8, 4, 4)) -> tensor_pb2.Tensor:
    msg = get_codec(codec).encode(torch.randn(*shape))
    copy = tensor_pb2.Tensor()
    copy.CopyFrom(msg)
    return copy


def test_a_passed_header_is_remembered_and_a_wrong_payload_still_refused():
    msg = _encoded("raw")
    validate_tensor(msg)
    assert len(validation._PASSED) == 1
    validate_tensor(msg)  # the same header again: one entry
    assert len(validation._PASSED) == 1
    short = tensor_pb2.Tensor()
    short.CopyFrom(msg)
    short.buffer = bytes(msg.buffer)[:-4]  # same header, payload 4 bytes short
    with pytest.raises(InvalidInput, match=r"len\(buffer\)"):
        validate_tensor(short)


def test_int8_scale_values_are_checked_on_every_message():
    msg = _encoded("int8")
    validate_tensor(msg)
    bad = tensor_pb2.Tensor()
    bad.CopyFrom(msg)
    bad.scale[1] = 0.0  # same counts, so the same key: the values must still be checked
    with pytest.raises(InvalidInput, match=r"scale\[1\]=0\.0"):
        validate_tensor(bad)
    bad.CopyFrom(msg)
    bad.zero_point[0] = float("nan")
    with pytest.raises(InvalidInput, match=r"zero_point\[0\]"):
        validate_tensor(bad)


def test_a_refused_header_is_not_remembered_and_the_limit_is_part_of_the_key():
    msg = _encoded("raw")
    with pytest.raises(TooLarge):
        validate_tensor(msg, max_bytes=16)
    assert not validation._PASSED
    validate_tensor(msg)  # passes under the default limit ...
    with pytest.raises(TooLarge):
        validate_tensor(msg, max_bytes=16)  # ... and is still refused under a smaller one


def test_the_memo_is_bounded(monkeypatch):
    monkeypatch.setattr(validation, "MAX_PASSED", 3)
    for width in range(1, 7):
        validate_tensor(_encoded("raw", (1, 2, width, 1)))
    assert len(validation._PASSED) == 3
