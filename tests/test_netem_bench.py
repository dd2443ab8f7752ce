"""runtime.tools.netem_bench: what it parses and refuses, and one small measurement through a real relay process
(only set values and the relay's guarantees are checked: no timing figure is asserted beyond them)."""

from __future__ import annotations

import json

import pytest

from runtime.tools import netem_bench as nb

pytestmark = pytest.mark.timeout(120)


def test_links_and_variants_are_parsed_and_bad_ones_refused(tmp_path):
    assert nb.parse_links("1.6@66.7, 1000@1") == [nb.Link(1.6, 66.7), nb.Link(1000.0, 1.0)]
    assert nb.parse_variants("a=uvloop:0,b=asyncio:16") == [nb.Variant("a", "uvloop", 0), nb.Variant("b", "asyncio", 16)]
    assert nb.parse_variants("old=asyncio:-")[0].chunk_kb is None  # a relay from before --chunk-kb
    for bad in ("0@10", "5@-1", "x@1"):
        with pytest.raises(ValueError):
            nb.parse_links(bad)
    for bad in ("a=trio:0", "a=uvloop:x", "=uvloop:0", f"a=uvloop:0:{tmp_path}"):  # tmp_path holds no relay
        with pytest.raises(ValueError):
            nb.parse_variants(bad)
    assert nb.main(["--links", "0@1"]) == 2
    assert nb.main(["--rounds", "0"]) == 2


def test_a_small_run_measures_the_relay_against_the_set_link(tmp_path):
    out = tmp_path / "r"
    code = nb.main(["--links", "20@10", "--variants", "new=uvloop:0", "--direct", "--rounds", "1", "--probes", "3",
                    "--bulk-seconds", "0.1", "--frames", "1", "--frame-seconds", "0.02", "--out", str(out)])
    assert code == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in res["rows"]}
    assert set(rows) == {"direct", "new"}
    relayed = rows["new"]
    assert relayed["rtt_ms"] >= 10.0  # the relay holds each byte 5 ms each way at least
    assert 0 < relayed["mbps"] <= 20 * 1.25  # paced (the receiver's figure leaves the first read out)
    assert relayed["frame_ms"] >= relayed["frame_ideal_ms"] * 0.9 and relayed["cpu_ms_per_mb"] > 0
    assert rows["direct"]["cpu_ms_per_mb"] == 0.0
    md = out.with_suffix(".md").read_text()
    assert "Command: `python -m runtime.tools.netem_bench --links 20@10" in md and "| 20 Mbit/s, 10 ms RTT | new |" in md
