"""systemd notify protocol: READY=1 only once the daemon serves (after the preload), WATCHDOG=1 at
half of WatchdogSec, STOPPING=1 on SIGTERM; nothing at all outside systemd."""

from __future__ import annotations

import os
import socket
import time

import pytest
from conftest import START_TIMEOUT, child_env, cli, free_port, health_status

from runtime.daemon.sdnotify import notify, watchdog_interval


def bound_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    return sock


@pytest.mark.timeout(10)
def test_notify_sends_one_datagram_and_nothing_outside_systemd(tmp_path):
    with bound_socket(str(tmp_path / "notify")) as sock:
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert sock.recv(4096) == b"READY=1"
    abstract = f"edgesplit-test-{os.getpid()}"
    with bound_socket("\0" + abstract) as sock:
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + abstract})
        assert sock.recv(4096) == b"STOPPING=1"
    assert not notify("READY=1", {})  # not under systemd: nothing sent, no error
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})  # logged, not raised


@pytest.mark.timeout(10)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # meant for another process
    assert watchdog_interval({}) is None and watchdog_interval({"WATCHDOG_USEC": "x"}) is None


@pytest.mark.timeout(120)
def test_worker_is_ready_only_when_serving_then_keeps_the_watchdog_alive(reaper, tmp_path):
    port = free_port()
    path = str(tmp_path / "notify")
    with bound_socket(path) as sock:
        env = child_env() | {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}  # keep-alive every 0.1 s
        proc = reaper.spawn(cli("worker", "--listen", f"127.0.0.1:{port}", "--preload", "digits_cnn", "--torch-threads",
                                "1"), log=tmp_path / "worker.log", env=env)
        messages: list[bytes] = []
        deadline = time.monotonic() + START_TIMEOUT
        while b"READY=1" not in messages and time.monotonic() < deadline and proc.poll() is None:
            try:
                messages.append(sock.recv(4096))
            except TimeoutError:
                continue
        assert b"READY=1" in messages, (messages, (tmp_path / "worker.log").read_text()[-2000:])
        assert health_status(f"127.0.0.1:{port}") == "SERVING"  # ready means serving, the model loaded
        assert "loaded model digits_cnn" in (tmp_path / "worker.log").read_text()
        pings = 0
        for _ in range(50):  # bounded: a few keep-alives within ~1 s
            try:
                pings += sock.recv(4096) == b"WATCHDOG=1"
            except TimeoutError:
                break
            if pings >= 3:
                break
        assert pings >= 3
        proc.terminate()
        rest: list[bytes] = []
        for _ in range(200):
            try:
                rest.append(sock.recv(4096))
            except TimeoutError:
                break
            if b"STOPPING=1" in rest:
                break
        assert b"STOPPING=1" in rest
        assert proc.wait(timeout=30) == 0
