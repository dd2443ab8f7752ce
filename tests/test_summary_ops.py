"""The agent's summary after plans changed the split mid-run: each configuration's bytes are set
against the raw size at its own split (one average against the last split reported 0.25x)."""

from __future__ import annotations

import pytest
import torch

from runtime.agent.client import FrameResult
from runtime.agent.summary import summarize
from runtime.models.loader import load_model


@pytest.mark.timeout(60)
def test_summary_per_configuration_after_a_plan_change():
    loaded = load_model("digits_cnn")
    early, late = loaded.split("pool1"), loaded.split("pool2")
    out = torch.zeros(1, 10)

    def frame(seq, sp, nbytes, version):
        return FrameResult(seq, f"f{seq}", out, "edge", sp.name, "int8+lz4", version, wire_bytes=nbytes,
                           times={"head": 0.001, "total": 0.002})

    results = [frame(i, early, early.fp32_bytes // 8, 0) for i in range(3)]
    results += [frame(3 + i, late, late.fp32_bytes // 4, 1) for i in range(2)]
    text = summarize(results, late, "int8+lz4", "digits_cnn", split_of=loaded.split)
    lines = text.splitlines()
    assert "at the end" in lines[0] and "2 used" in text
    mine = [line for line in lines if line.startswith("  split")]
    assert len(mine) == 2
    assert f"({early.name})" in mine[0] and "3 frames" in mine[0] and "compression 8.00x" in mine[0] and "v0" in mine[0]
    assert f"({late.name})" in mine[1] and "2 frames" in mine[1] and "compression 4.00x" in mine[1] and "v1" in mine[1]

    # one configuration throughout: the single bytes line, as before
    same = summarize(results[:3], early, "int8+lz4", "digits_cnn", split_of=loaded.split)
    assert "compression 8.00x" in same and "plans changed" not in same
