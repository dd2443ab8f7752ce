"""dpfp_bench's timeline (runtime.tools.dpfp_timeline): a block's span split into its critical tile's terms."""

from __future__ import annotations

import pytest

from runtime.agent.parallel import TileReport
from runtime.tools.dpfp_timeline import TERMS, frame_terms, markdown, medians


def tile(block: int, ready: float, sent: float, answered: float, done: float, compute: float) -> TileReport:
    return TileReport(block, (0, 1), "w", ran_on="w", ready_at=ready, sent_at=sent, answered_at=answered, done_at=done,
                      queue_seconds=0.001, decode_seconds=0.002, compute_seconds=compute, sent_bytes=10, received_bytes=5)


def test_terms_add_up_to_each_blocks_span():
    t0 = 100.0
    reps = [tile(0, 100.001, 100.002, 100.050, 100.051, 0.030), tile(0, 100.001, 100.003, 100.060, 100.062, 0.040),
            tile(1, 100.058, 100.059, 100.090, 100.092, 0.020)]  # block 1 starts before block 0 ends (wavefront)
    rows = frame_terms(t0, reps, 2)
    assert rows[0]["span"] == pytest.approx(0.062) and rows[1]["span"] == pytest.approx(0.030)
    for r in rows:
        assert sum(r[k] for k in TERMS) == pytest.approx(r["span"])
    assert rows[0]["compute"] == 0.040 and rows[0]["net+grpc"] == pytest.approx(0.057 - 0.043)
    assert rows[1]["wait"] == pytest.approx(-0.004)  # its crop was ready 4 ms before block 0's last tile
    assert rows[0]["bytes"] == 30 and rows[0]["peer_bytes"] == 0
    halo = [tile(0, 100.001, 100.002, 100.050, 100.051, 0.030)]
    halo[0].peer_bytes = 7  # crop parts its worker fetched from a neighbour: moved, though not through the agent
    assert frame_terms(t0, halo, 1)[0]["bytes"] == 22 and frame_terms(t0, halo, 1)[0]["peer_bytes"] == 7
    med = medians([(t0, reps), (t0, reps)], 2)
    assert med[0]["span"] == pytest.approx(0.062)
    lines = markdown([{"strategy": "dpfp", "workers": 2, "blocks": [["a", "b"], ["b", "c"]], "timeline": med}])
    assert any("**all blocks** | 92.0" in line for line in lines)


def test_tile_compute_of_a_stage_against_its_untiled_blocks():
    from runtime.models.loader import load_model
    from runtime.parallel.plan import ParallelStage, TiledBlock
    from runtime.tools.dpfp_tiles import measure

    loaded = load_model("vgg16")
    stage = ParallelStage(("a", "b"), (TiledBlock("features_23", "features_27", (1.0, 1.0)),
                                       TiledBlock("features_27", "features_30", (1.0, 1.0), grid_cols=2)),
                          model="vgg16")
    rows = measure(stage, loaded, 1)
    assert [r["block"] for r in rows] == ["features_23..features_27", "features_27..features_30"]
    for r in rows:
        assert r["tiles"] == 2 and len(r["tile_seconds"]) == 2 and r["untiled_seconds"] > 0
        assert r["sum_over_untiled"] > 0.5  # two halves, halos included, cannot take much less than the whole


def test_an_early_dispatched_halo_tile_counts_from_the_previous_blocks_end():
    t0 = 100.0
    reps = [tile(0, 100.001, 100.002, 100.050, 100.051, 0.030),
            tile(1, 100.002, 100.003, 100.090, 100.091, 0.020)]  # sent at once; its worker waited for block 0's tile
    reps[1].early = True
    rows = frame_terms(t0, reps, 2)
    assert rows[1]["span"] == pytest.approx(0.040) and rows[1]["wait"] == 0.0 and rows[1]["encode"] == 0.0
    assert rows[1]["net+grpc"] == pytest.approx(0.039 - 0.023)  # answer in - block 0's end - the worker's own times
    assert sum(rows[1][k] for k in TERMS) == pytest.approx(rows[1]["span"])
