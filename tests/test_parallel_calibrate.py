"""The coordinator's per-byte calibration (runtime.agent.parallel_calibrate, issue 13), against real
worker processes on loopback: pointwise blocks only (no halo), so every byte counted is the map once
out and once back."""

from __future__ import annotations

import asyncio

import pytest

from runtime.agent.parallel_calibrate import calibrate, calibration_stage, fit
from runtime.models.loader import load_model
from runtime.parallel.tiled import segment_geometry

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(180)]


def test_calibration_sends_each_pointwise_map_once_each_way(start_worker):
    loaded = load_model("resnet18")
    addresses = [f"127.0.0.1:{start_worker('--torch-threads', '1')[1]}" for _ in range(2)]
    stage = calibration_stage(loaded, addresses)
    assert 1 <= len(stage.blocks) <= 3
    for b in stage.blocks:
        assert all(layer.kind == "pointwise" for layer in segment_geometry(loaded.sliced, b.start, b.end))
    cal = asyncio.run(asyncio.wait_for(calibrate(loaded, addresses, 0.0, 1e9, frames=2), 120))
    per_frame = sum(2 * loaded.split(b.start).fp32_bytes for b in stage.blocks)  # raw: in once, out once
    assert cal.bytes == 2 * per_frame
    assert cal.bytes_per_second >= 0 and cal.block_overhead_seconds >= 0


def test_fit_splits_a_fixed_cost_per_block_from_a_per_byte_rate():
    rate, fixed = fit([(b, 0.004 + b / 2e8) for b in (1e6, 4e6, 1e7, 1e6, 4e6)])  # 4 ms + 200 MB/s
    assert rate == pytest.approx(2e8) and fixed == pytest.approx(0.004)
    assert fit([(1e6, 0.01), (1e6, 0.03)]) == (pytest.approx(1e6 / 0.02), 0.0)  # one size: no line, bytes / rest
    assert fit([(1e6, 0.03), (4e6, 0.01)])[1] == 0.0  # more bytes, less rest: no slope, no fixed cost
    assert fit([(1e6, -0.01), (2e6, -0.02)]) == (0.0, 0.0)  # nothing left to explain: not measurable


def test_compute_blocks_are_the_last_convolution_units():
    loaded = load_model("vgg16")
    plain = calibration_stage(loaded, ["a:1", "b:2"])
    with_compute = calibration_stage(loaded, ["a:1", "b:2"], compute_blocks=2)
    assert with_compute.blocks[:len(plain.blocks)] == plain.blocks
    extra = with_compute.blocks[len(plain.blocks):]
    assert [(b.start, b.end) for b in extra] == [("features_25", "features_26"), ("features_27", "features_28")]  # 14x14 convs
    for b in extra:
        assert any(layer.kind == "conv" for layer in segment_geometry(loaded.sliced, b.start, b.end))
