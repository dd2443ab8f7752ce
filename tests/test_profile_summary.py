"""`edgesplit profile`'s printed summary: a TL transfer's fidelity reads as a person would write it."""

from runtime.cli.profile import summary
from runtime.contracts.profile import Block, Profile, Transfer


def _profile(fidelity):
    tl = Transfer("tl-ab12+int8+lz4", 15_743, 0.001, 0.002, codec="int8+lz4", tl_id="tl-ab12", fidelity=fidelity)
    block = Block(0, "conv", 0.004, 100_000, transfers=(Transfer("raw", 100_000, codec="raw"), tl))
    return Profile("vm", "device", "m", (block,), 150_528, (Transfer("raw", 150_528, codec="raw"),))


def test_tl_fidelity_is_rounded_not_a_float32_dump():
    line = summary(_profile(0.9900000095367432)).splitlines()[-1]
    assert line.endswith("top-1 agreement 0.99") and "15,743 B" in line


def test_unmeasured_fidelity_says_so():
    assert summary(_profile(None)).splitlines()[-1].endswith("top-1 agreement not measured")
