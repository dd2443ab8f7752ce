"""runtime.measure.grpc_echo: the two-process echo that adds the frame path's pieces one at a time."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from runtime.measure import grpc_echo

pytestmark = pytest.mark.timeout(120)


def test_every_level_answers_frames_across_two_processes():
    out = subprocess.run([sys.executable, "-m", "runtime.measure.grpc_echo", "--frames", "3", "--rounds", "2",
                          "--size", "300000", "--idle-ms", "1"], capture_output=True, text=True, timeout=100, check=True)
    rows = dict(re.findall(r"^\| (\w+) \| ([\d. /]+) \| [\d.]+ \|$", out.stdout, re.M))
    assert list(rows) == list(grpc_echo.LEVELS), out.stdout
    for level, rounds in rows.items():
        values = [float(v) for v in rounds.split(" / ")]
        assert len(values) == 2 and all(v > 0 for v in values), (level, rounds)


def test_a_client_reads_one_answer_per_frame_at_the_full_level():
    """The protobuf frames are parsed by the worker's parse_request (a 300 KB frame takes its zero-copy path)
    and every frame gets its InferResult back, in order."""
    times = grpc_echo.run_config("full", {}, frames=4, size=300_000, idle=0.001)
    assert len(times) == 4 and all(t > 0 for t in times)


def test_configurations_and_limits():
    assert grpc_echo.parse_config("iomgr=bare,GRPC_EXPERIMENTS:-a;-b,X:1") == (
        "iomgr", "bare", {"GRPC_EXPERIMENTS": "-a,-b", "X": "1"})
    for bad in ("bare", "x=nolevel", "x=bare,NOCOLON"):
        with pytest.raises(argparse.ArgumentTypeError):
            grpc_echo.parse_config(bad)
    for args in (["--size", "0"], ["--size", str(grpc_echo.MAX_FRAME_BYTES + 1)], ["--rounds", "101"]):
        with pytest.raises(SystemExit):
            grpc_echo.main(args)
