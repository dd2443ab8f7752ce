"""The loopback floor (runtime.measure.loopback_floor): a real exchange between two processes, the server's hold left
out, its limits, no child left behind, and the bench's overhead over compute + transfer made from it."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from runtime.measure import bench, loopback_floor


def _servers() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"runtime.measure.loopback_floor" in cmd and b"--serve" in cmd:
            pids.append(int(pid))
    return pids


def test_floor_leaves_out_the_hold_and_the_idle():
    before = set(_servers())
    floors = loopback_floor.measure(200_000, 4_000, idle_s=0.03, hold_s=0.05, frames=3)
    assert len(floors) == 3
    # each exchange held 50 ms on the server and idled 30 ms before: the floor is the bytes' trip alone
    assert all(0 < f < 0.03 for f in floors), floors
    assert set(_servers()) <= before  # the child is gone
    s = loopback_floor.summary(floors)
    assert s["min_ms"] <= s["p50_ms"] <= s["p90_ms"]


@pytest.mark.parametrize("kwargs", [dict(up=loopback_floor.MAX_BYTES + 1, down=0), dict(up=0, down=-1),
                                    dict(up=10, down=10, hold_s=11.0), dict(up=10, down=10, frames=0)])
def test_measure_refuses_values_past_its_limits(kwargs):
    args = dict(idle_s=0.0, hold_s=0.0, frames=1) | kwargs
    with pytest.raises(ValueError):
        loopback_floor.measure(args.pop("up"), args.pop("down"), **args)


def test_server_refuses_a_request_past_the_limits_before_allocating():
    ports: list[str] = []
    errors: list[BaseException] = []
    said = threading.Event()

    def run() -> None:
        try:
            loopback_floor.serve(lambda p: (ports.append(p), said.set()))
        except BaseException as e:  # the refusal ends the server
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert said.wait(10)
    with socket.create_connection(("127.0.0.1", int(ports[0])), timeout=10) as sock:
        sock.sendall(loopback_floor._REQUEST.pack(loopback_floor.MAX_BYTES + 1, 0, 0))
        assert sock.recv(1) == b""  # closed, nothing answered
    t.join(10)
    assert not t.is_alive()
    assert errors and isinstance(errors[0], ValueError) and "over the limits" in str(errors[0])


def test_cli_prints_the_floor_and_refuses_bad_sizes(capsys):
    assert loopback_floor.main(["--up", "1000", "--down", "10", "--idle-ms", "0", "--hold-ms", "0", "--frames", "3"]) == 0
    assert "1,000 bytes up / 10 down" in capsys.readouterr().out
    assert loopback_floor.main(["--up", str(loopback_floor.MAX_BYTES + 1), "--frames", "1"]) == 2
    assert "up and down must be" in capsys.readouterr().err


def test_bench_row_gets_its_floor_and_the_overhead_over_it(monkeypatch):
    seen = {}

    def fake_measure(up, down, *, idle_s, hold_s, frames):
        seen.update(up=up, down=down, idle_s=idle_s, hold_s=hold_s, frames=frames)
        return [0.0004, 0.0005, 0.0006]

    monkeypatch.setattr(loopback_floor, "measure", fake_measure)
    row = {"bytes_per_frame": 802_847.0, "result_bytes": 4_128, "overhead_p50_ms": 1.75,
           "p50_ms": {"head": 1.5, "encode": 0.05, "edge_decode": 0.1, "edge_tail": 18.0}}
    bench.add_floor(row, 60)
    assert seen == dict(up=802_847, down=4_128, idle_s=pytest.approx(0.00155), hold_s=pytest.approx(0.0181), frames=60)
    assert row["loopback_floor_p50_ms"] == pytest.approx(0.5)
    assert row["overhead_over_floor_p50_ms"] == pytest.approx(1.25)
