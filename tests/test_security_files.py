"""Files read at start-up (security audit): a Transfer Layer manifest (runtime.transfer.artifact) and a
--config TOML file (runtime.contracts.config) are checked against their caps before they are read. (The weights need no cap of their own: safetensors maps the
file and checks its header; a tensor the TL has no place for is refused from its name and shape,
its bytes never read: a 512 MiB extra tensor grew the peak RSS by nothing, 2026-12-04.)"""

from __future__ import annotations

import json

import pytest

from runtime.contracts.errors import TooLarge
from runtime.transfer.artifact import BUNDLED_DIR, MAX_MANIFEST_BYTES, read_manifest

pytestmark = pytest.mark.timeout(60)

TL = "tl-d1a2152e9a29"  # the bundled efficientnet_lite0 TL


def test_a_manifest_over_its_cap_is_refused_unread(tmp_path):
    path = tmp_path / f"{TL}.json"
    manifest = json.loads((BUNDLED_DIR / f"{TL}.json").read_text())
    manifest["notes"] = "n" * MAX_MANIFEST_BYTES
    path.write_text(json.dumps(manifest))
    with pytest.raises(TooLarge, match="at most"):
        read_manifest(path)


def test_a_deeply_nested_manifest_is_invalid_input(tmp_path):
    from runtime.contracts.errors import InvalidInput

    path = tmp_path / f"{TL}.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InvalidInput, match="not valid JSON"):
        read_manifest(path)


def test_a_config_file_over_its_cap_is_refused_unread(tmp_path):
    """--config (TOML) is read only up to MAX_CONFIG_BYTES; a missing one still says it does not exist."""
    from runtime.contracts.config import MAX_CONFIG_BYTES, load_config
    from runtime.contracts.errors import InvalidInput
    from runtime.worker.config import WorkerConfig

    big = tmp_path / "big.toml"
    big.write_text("[worker]\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(TooLarge, match="at most"):
        load_config(WorkerConfig, "worker", config_file=str(big), env={})
    with pytest.raises(InvalidInput, match="does not exist"):
        load_config(WorkerConfig, "worker", config_file=str(tmp_path / "none.toml"), env={})
    ok = tmp_path / "ok.toml"
    ok.write_text("[worker]\nmax_batch = 4\n")
    assert load_config(WorkerConfig, "worker", config_file=str(ok), env={}).max_batch == 4


def _png_of_zeros(width: int, height: int) -> bytes:
    """A valid RGB PNG of ``width`` x ``height`` black pixels, made row by row (a few KB per megapixel)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + 3 * width)  # filter byte 0 + the row's pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_cap_is_refused_before_decoding():
    """load_image (the agent's local API Submit, image folders) reads the size from the header and refuses
    an image over MAX_IMAGE_PIXELS before decoding it: a 130 KB PNG of 7,000 x 7,000 pixels would decode
    to 147 MB (Pillow only warns from 89 M pixels, refuses from 179 M)."""
    from runtime.contracts.errors import InvalidInput
    from runtime.models.spec import MAX_IMAGE_PIXELS, load_image

    side = 7000
    assert side * side > MAX_IMAGE_PIXELS
    data = _png_of_zeros(side, side)
    assert len(data) < 1 << 20
    with pytest.raises(InvalidInput, match="pixels"):
        load_image(data)
    assert load_image(_png_of_zeros(64, 48)).size == (64, 48)


def test_only_png_and_jpeg_are_decoded():
    """Pillow opens dozens of formats (some through external programs, e.g. EPS via Ghostscript); the
    callers promise and send PNG or JPEG, so nothing else is opened."""
    import io

    from PIL import Image

    from runtime.contracts.errors import InvalidInput
    from runtime.models.spec import load_image

    for fmt in ("BMP", "GIF", "TIFF"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=fmt)
        with pytest.raises(InvalidInput, match="PNG or JPEG"):
            load_image(buf.getvalue())
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    assert load_image(buf.getvalue()).size == (8, 8)
