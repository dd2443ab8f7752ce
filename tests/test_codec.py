"""Properties of the wire codecs and the header validation (runtime.wire.codec, runtime.wire.validation)."""

from __future__ import annotations

import random
import warnings

import lz4.block
import pytest
import torch

from runtime.contracts.errors import EdgesplitError, InvalidInput, TooLarge
from runtime.proto.edgesplit.v1 import tensor_pb2
from runtime.wire import codec as codec_mod
from runtime.wire.codec import (
    DEFAULT_MAX_BYTES,
    codec_names,
    decode_tensor,
    encode_output,
    get_codec,
    validate_tensor,
)

ALL = ["raw", "raw+lz4", "fp16", "fp16+lz4", "int8", "int8+lz4"]
SHAPES = [(), (1,), (17,), (4, 9), (1, 3, 7, 5), (2, 64, 28, 28), (2, 3, 4, 5, 6)]
ZERO_SHAPES = [(0,), (0, 3, 4, 4), (2, 0, 5), (1, 3, 0, 7)]


def roundtrip(name: str, x: torch.Tensor) -> torch.Tensor:
    msg = get_codec(name).encode(x)
    assert msg.chunks == 1 and msg.payload_size == len(msg.buffer)
    wire = tensor_pb2.Tensor.FromString(msg.SerializeToString())
    validate_tensor(wire)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's non-writable-buffer warning
        y = decode_tensor(wire)
    assert y.shape == x.shape
    if y.dtype != torch.bfloat16:
        assert y.numpy().flags.writeable
    return y


def test_names_and_lookup():
    assert codec_names() == ALL
    for n in ALL:
        c = get_codec(n)
        assert c.name == n and c.lossless == n.startswith("raw")
    with pytest.raises(InvalidInput, match="raw, raw\\+lz4, fp16"):
        get_codec("zstd")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", SHAPES)
def test_roundtrip_float32(name, shape):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    x = torch.randn(shape, generator=g) * 3
    y = roundtrip(name, x)
    assert y.dtype == torch.float32
    if name.startswith("raw"):
        assert torch.equal(x, y)
    elif name.startswith("fp16"):
        assert bool(((x - y).abs() <= x.abs() * 2**-11 + 2**-25).all())
    else:
        msg = get_codec(name).encode(x)
        axis = msg.quant_axis
        assert axis == (1 if x.dim() >= 2 else 0)
        shape_b = [1] * x.dim()
        if x.dim():
            shape_b[axis] = -1
        scale = torch.tensor(msg.scale).reshape(shape_b)
        lo = torch.tensor(msg.zero_point).reshape(shape_b)
        err = (x - y).abs()
        assert bool((err <= scale / 2 * (1 + 1e-5) + 1e-6 * lo.abs() + 1e-7).all()), err.max()


@pytest.mark.parametrize("name", ["raw", "raw+lz4"])
@pytest.mark.parametrize(
    "x",
    [
        torch.randn(2, 3, 5).half(),
        torch.randn(4, 7).bfloat16(),
        torch.randn(3, 3).double(),
        torch.randint(-(2**40), 2**40, (3, 11), dtype=torch.int64),
        torch.randint(0, 256, (1, 3, 7, 5), dtype=torch.uint8),
        torch.randint(-128, 128, (9,), dtype=torch.int8),
        torch.randint(-(2**31), 2**31 - 1, (2, 5), dtype=torch.int32),
        torch.rand(3, 4) > 0.5,
        torch.tensor(7, dtype=torch.int64),
    ],
    ids=lambda x: str(x.dtype),
)
def test_raw_bit_exact_dtypes(name, x):
    y = roundtrip(name, x)
    assert y.dtype == x.dtype and torch.equal(x, y)


def test_raw_special_values_bit_exact():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.4e38])
    y = roundtrip("raw+lz4", x)
    assert torch.equal(x.view(torch.int32), y.view(torch.int32))


def test_noncontiguous_and_grad_input():
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    xt = x.permute(0, 2, 3, 1)
    for n in ALL:
        y = roundtrip(n, xt)
        assert y.shape == xt.shape
    assert torch.equal(roundtrip("raw", xt), xt.detach())


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", ZERO_SHAPES)
def test_zero_size(name, shape):
    y = roundtrip(name, torch.empty(shape))
    assert y.numel() == 0 and y.dtype == torch.float32


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(), (5,), (1, 3, 7, 5)])
def test_all_zero_and_constant_exact(name, shape):
    assert torch.equal(roundtrip(name, torch.zeros(shape)), torch.zeros(shape))
    if name.startswith("int8"):  # constant channels decode exactly to their value
        x = torch.full(shape, -3.25)
        assert torch.equal(roundtrip(name, x), x)


def test_fp16_saturates_instead_of_inf():
    x = torch.tensor([1e6, -1e6, float("inf"), -float("inf"), 65504.0, 1.0, float("nan")])
    y = roundtrip("fp16", x)
    assert y[:5].tolist() == [65504.0, -65504.0, 65504.0, -65504.0, 65504.0]
    assert y[5] == 1.0 and torch.isnan(y[6])


def test_fp16_and_int8_reject_non_float():
    for n in ["fp16", "int8+lz4"]:
        with pytest.raises(InvalidInput, match="floating-point"):
            get_codec(n).encode(torch.arange(4))


@pytest.mark.parametrize("bad,kind", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
def test_int8_rejects_non_finite(bad, kind):
    x = torch.randn(1, 4, 3, 3)
    x[0, 2, 1, 1] = bad
    with pytest.raises(InvalidInput, match=f"channel 2 contains {kind}"):
        get_codec("int8").encode(x)


def test_int8_extreme_range():
    x = torch.tensor([[-1e38, 2e38], [1e-40, 2e-40]]).T.contiguous()  # channels along axis 1
    y = roundtrip("int8", x)
    msg = get_codec("int8").encode(x)
    assert all(s > 0 for s in msg.scale)
    assert bool(torch.isfinite(y).all())
    assert bool(((x - y).abs() <= torch.tensor(msg.scale) / 2 * (1 + 1e-5) + 1e-45).all())
    with pytest.raises(InvalidInput, match="channel 0: range"):
        get_codec("int8").encode(torch.tensor([[-3e38], [3e38]]))


def test_lz4_shrinks_sparse_activations():
    x = torch.relu(torch.randn(1, 256, 56, 56, generator=torch.Generator().manual_seed(0)) - 1.0)
    raw_bytes = x.numel() * 4
    for n, factor in [("raw+lz4", 1.05), ("fp16+lz4", 2.1), ("int8+lz4", 3.0)]:
        msg = get_codec(n).encode(x)
        assert len(msg.buffer) * factor < raw_bytes, (n, len(msg.buffer))
        assert get_codec(n).estimate_ratio(x) > factor
    assert get_codec("int8+lz4").estimate_ratio(x) > get_codec("int8").estimate_ratio(x)


def test_estimate_ratio_nominal():
    assert [get_codec(n).estimate_ratio() for n in ALL] == [1, 1, 2, 2, 4, 4]
    assert get_codec("raw").estimate_ratio(torch.zeros(3, dtype=torch.float16)) == 2


def test_encode_output_is_raw():
    x = torch.randn(2, 10)
    msg = encode_output(x)
    assert msg.codec == tensor_pb2.CODEC_RAW and msg.compression == tensor_pb2.COMPRESSION_NONE
    assert torch.equal(decode_tensor(msg), x)


# -- validation -----------------------------------------------------------------------------


def good(name="raw", x=None) -> tensor_pb2.Tensor:
    return get_codec(name).encode(torch.randn(1, 3, 4, 4) if x is None else x)


def _set(**kw):
    def f(m):
        for k, v in kw.items():
            if isinstance(v, list):
                del getattr(m, k)[:]
                getattr(m, k).extend(v)
            else:
                setattr(m, k, v)

    return f


def _buf(fn):
    """Replace the buffer (payload_size follows it, as an honest sender would set it)."""

    def f(m):
        m.buffer = fn(m.buffer)
        m.payload_size = len(m.buffer)

    return f


INVALID = [
    ("raw", _set(codec=0), "codec=0"),
    ("raw", _set(codec=9), "codec=9"),
    ("raw", _set(compression=5), "compression=5"),
    ("raw", _set(dtype="complex64"), "dtype='complex64'"),
    ("raw", _set(dtype=""), "dtype=''"),
    ("fp16", _set(dtype="float16"), "dtype='float16'"),
    ("int8", _set(dtype="int64"), "dtype='int64'"),
    ("raw", _set(shape=[1] * 9), "rank 9"),
    ("raw", _set(shape=[2**31 + 1, 0]), "shape[0]=2147483649"),
    ("raw", _set(shape=[1, 3, 4, 5]), "encoded_size=192"),
    ("raw", _set(encoded_size=193), "encoded_size=193"),
    ("fp16", _set(encoded_size=192), "encoded_size=192"),
    ("raw", _buf(lambda b: b[:-1]), "len(buffer)=191"),
    ("raw", _buf(lambda b: b + b"x"), "len(buffer)=193"),
    ("raw", _set(payload_size=5), "payload_size=5"),
    ("raw", lambda m: setattr(m, "buffer", m.buffer[:-1]), "len(buffer)=191"),
    ("raw+lz4", _buf(lambda b: b"\0" * 500), "len(buffer)=500"),
    ("raw", _set(chunks=3, payload_size=100), "payload_size=100"),
    ("raw+lz4", _set(chunks=2, payload_size=10**6), "payload_size=1000000"),
    ("raw", _set(chunks=2, payload_size=192, buffer=b"\0" * 100), "join all chunks"),
    ("raw", _set(scale=[1.0]), "scale/zero_point"),
    ("int8", _set(quant_axis=4), "quant_axis=4"),
    ("int8", _set(scale=[1.0, 1.0]), "len(scale)=2"),
    ("int8", _set(zero_point=[0.0]), "len(zero_point)=1"),
    ("int8", _set(scale=[1.0, 0.0, 1.0]), "scale[1]=0.0"),
    ("int8", _set(scale=[1.0, 1.0, -2.0]), "scale[2]=-2.0"),
    ("int8", _set(scale=[float("nan"), 1.0, 1.0]), "scale[0]=nan"),
    ("int8", _set(scale=[1.0, float("inf"), 1.0]), "scale[1]=inf"),
    ("int8", _set(zero_point=[0.0, 0.0, float("inf")]), "zero_point[2]=inf"),
    ("raw+lz4", _buf(lambda b: b"\xff" * 20), "lz4"),
    ("raw+lz4", _buf(lambda b: lz4.block.compress(b"ab", store_size=False)),
     "decompressed to 2"),
    ("raw", lambda m: (setattr(m, "dtype", "bool"), setattr(m, "buffer", b"\x02" * 48),
                       setattr(m, "encoded_size", 48), setattr(m, "payload_size", 48)), "bool"),
]


@pytest.mark.parametrize("name,mutate,field", INVALID, ids=[f"{i}-{c[2]}" for i, c in enumerate(INVALID)])
def test_invalid_messages(name, mutate, field):
    msg = good(name)
    mutate(msg)
    for decode in (decode_tensor, get_codec(name).decode):
        with pytest.raises(InvalidInput) as e:
            decode(msg)
        assert field in str(e.value)


def test_codec_mismatch_on_direct_decode():
    with pytest.raises(InvalidInput, match="cannot be decoded by int8"):
        get_codec("int8").decode(good("raw"))


def test_too_large_is_resource_exhausted():
    msg = tensor_pb2.Tensor(shape=[2**31, 2**31, 2**31, 2**31], dtype="int64",
                            codec=tensor_pb2.CODEC_RAW)
    with pytest.raises(TooLarge, match="max_bytes=268435456") as e:
        validate_tensor(msg)
    assert e.value.code.name == "RESOURCE_EXHAUSTED"
    x = torch.randn(4, 4)
    with pytest.raises(TooLarge, match="max_bytes=32"):
        decode_tensor(get_codec("raw").encode(x), max_bytes=32)
    assert torch.equal(decode_tensor(get_codec("raw").encode(x), max_bytes=64), x)


def test_lz4_bomb_refused_without_decompressing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("decompress must not be called")

    monkeypatch.setattr(codec_mod.lz4.block, "decompress", boom)
    gib = 2**30
    bomb = lz4.block.compress(b"\0" * 2**20, store_size=False)  # small, expands a lot
    # 1 GiB claimed by the shape: over max_bytes
    big = tensor_pb2.Tensor(shape=[1, 256, 1024, 1024], dtype="float32", codec=tensor_pb2.CODEC_RAW,
                            compression=tensor_pb2.COMPRESSION_LZ4, encoded_size=gib, buffer=bomb)
    with pytest.raises(TooLarge):
        decode_tensor(big)
    # 1 GiB claimed by encoded_size alone, shape small: inconsistent
    lie = tensor_pb2.Tensor(shape=[1, 4], dtype="float32", codec=tensor_pb2.CODEC_RAW,
                            compression=tensor_pb2.COMPRESSION_LZ4, encoded_size=gib, buffer=bomb)
    with pytest.raises(InvalidInput, match=f"encoded_size={gib}"):
        decode_tensor(lie)
    assert gib > DEFAULT_MAX_BYTES


def test_fuzz_garbage_only_raises_edgesplit_errors():
    rng = random.Random(1234)
    torch.manual_seed(1234)
    bases = [good(n) for n in ALL] + [good(n, torch.relu(torch.randn(2, 8, 5, 5))) for n in ALL]
    fields = ["codec", "compression", "quant_axis", "encoded_size", "chunks", "payload_size"]
    for _ in range(300):
        msg = tensor_pb2.Tensor()
        msg.CopyFrom(rng.choice(bases))
        op = rng.randrange(5)
        buf = bytearray(msg.buffer)
        if op == 0:  # flip bytes
            for _ in range(rng.randint(1, 8)):
                if buf:
                    buf[rng.randrange(len(buf))] = rng.randrange(256)
            msg.buffer = bytes(buf)
        elif op == 1:  # random garbage of random length
            msg.buffer = rng.randbytes(rng.randrange(0, 2 * len(buf) + 2))
        elif op == 2:  # truncate
            msg.buffer = bytes(buf[: rng.randrange(len(buf) + 1)])
        elif op == 3:  # header field noise
            f = rng.choice(fields)
            setattr(msg, f, rng.choice([0, 1, 2, 3, 7, len(buf), 2**31 - 1]))
        else:  # shape noise
            del msg.shape[:]
            msg.shape.extend(rng.randrange(0, 9) for _ in range(rng.randrange(0, 5)))
        try:
            y = decode_tensor(msg)
        except EdgesplitError:
            continue
        assert list(y.shape) == list(msg.shape)


@pytest.mark.parametrize("name", ["raw", "int8+lz4"])
def test_chunked_header_and_joined_payload(name):
    x = torch.randn(2, 4, 6, 6)
    full = get_codec(name).encode(x)
    first = tensor_pb2.Tensor()
    first.CopyFrom(full)
    first.chunks, first.buffer = 3, full.buffer[:50]  # first chunk only: header checks pass
    validate_tensor(first)
    with pytest.raises(InvalidInput, match="join all chunks"):
        decode_tensor(first)
    first.buffer = full.buffer  # the caller joined the chunks
    assert torch.equal(decode_tensor(first), decode_tensor(full))
