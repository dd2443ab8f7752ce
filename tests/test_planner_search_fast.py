"""The planner's fast paths (row bounds for latency and throughput over two cuts) give the same rankings as
the whole-grid search, and the vectorised
transfer tables hold what the profiles say (random instances, larger than the brute-force ones)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from planner import evaluate as evaluate_mod
from planner.grid import smallest_pairs
from planner.rowbound import throughput_rows
from planner.search import search
from planner.tables import build_table, receiver_decode
from runtime.contracts.costmodel import Constraints
from tests.test_planner_search import _random_instance


def _fast_equals_grid(seed: int, monkeypatch: pytest.MonkeyPatch) -> list:
    """Ranks one random instance with and without the row bound; returns what the row bound answered."""
    rng = random.Random(1000 + seed)
    n = rng.randint(2, 120)
    tiers, net = _random_instance(rng, n, rng.choice((1, 2, 3)))
    cons = rng.choice((Constraints(), Constraints(raw_input_stays=True), Constraints(min_fidelity=0.9),
                       Constraints(max_upload_bytes={"device": rng.randint(200, 3000)})))
    top_n = rng.choice((1, 5, 20))
    include_return = bool(seed % 2)
    objective = "latency" if seed % 2 else "throughput"
    used = []
    monkeypatch.setattr(evaluate_mod, "smallest_pairs", lambda *a: used.append(smallest_pairs(*a)) or used[-1])
    monkeypatch.setattr(evaluate_mod, "throughput_rows", lambda *a: used.append(throughput_rows(*a)) or used[-1])
    fast = search(tiers, net, cons, objective, top_n=top_n, include_return=include_return)
    monkeypatch.setattr(evaluate_mod, "ROW_BOUND", False)
    grid = search(tiers, net, cons, objective, top_n=top_n, include_return=include_return)
    assert fast == grid
    return used


@pytest.mark.parametrize("seed", range(80))
def test_row_bound_ranking_equals_the_whole_grid(seed, monkeypatch):
    _fast_equals_grid(seed, monkeypatch)


def test_row_bound_is_taken():
    """The equality above is not vacuous: the row bound answers for most device-edge-cloud chains."""
    taken = []
    for seed in range(80):
        mp = pytest.MonkeyPatch()
        try:
            taken += _fast_equals_grid(seed, mp)
        finally:
            mp.undo()
    assert len(taken) > 80 and sum(x is not None for x in taken) > 0.8 * len(taken)


def _reference_table(p):
    """The table as the obvious per-row loop builds it."""
    rows = [p.transfers_after(a) for a in range(p.n_blocks + 1)]
    width = max(map(len, rows))
    nbytes = np.full((len(rows), width), np.inf)
    fid = np.full((len(rows), width), np.nan)
    enc, dec, tl = np.zeros_like(nbytes), np.zeros_like(nbytes), np.zeros(nbytes.shape, dtype=bool)
    for a, row in enumerate(rows):
        for i, t in enumerate(row):
            nbytes[a, i], enc[a, i], dec[a, i] = t.bytes, t.encode_seconds, t.decode_seconds
            fid[a, i] = math.nan if t.fidelity is None else t.fidelity
            tl[a, i] = bool(t.tl_id)
    return rows, nbytes, enc, dec, fid, tl


@pytest.mark.parametrize("seed", range(10))
def test_tables_hold_every_transfer(seed):
    rng = random.Random(seed)
    tiers, _ = _random_instance(rng, rng.randint(1, 40), rng.choice((1, 2, 3)))
    for p in (p for t in tiers for p in t.profiles):
        table = build_table(p)
        rows, nbytes, enc, dec, fid, tl = _reference_table(p)
        assert table.options == rows
        assert [table.row_names(a) for a in range(len(rows))] == [tuple(t.name for t in r) for r in rows]
        for got, want in ((table.nbytes, nbytes), (table.encode, enc), (table.decode, dec), (table.fidelity, fid)):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(table.is_tl, tl)
        np.testing.assert_array_equal(table.seconds, np.concatenate([[0.0], np.cumsum([b.seconds for b in p.blocks])]))


def test_receiver_decode_maps_options_by_name():
    """Where the receiver lists other transfers than the sender, each option takes the receiver's decode time
    by name, and the sender's where the receiver has none."""
    rng = random.Random(7)
    tiers, _ = _random_instance(rng, 6, 3)
    sender = tiers[0].profiles[0]
    receiver_tiers, _ = _random_instance(random.Random(8), 6, 2)  # raw and int8+lz4 only
    receiver = receiver_tiers[1].profiles[0]
    st, rt = build_table(sender), build_table(receiver)
    dec = receiver_decode(st, rt)
    for a in range(sender.n_blocks + 1):
        theirs = {t.name: t.decode_seconds for t in receiver.transfers_after(a)}
        for i, t in enumerate(sender.transfers_after(a)):
            assert dec[a, i] == theirs.get(t.name, t.decode_seconds)
