"""The loopback link's own floor for a frame's bytes: what moving them costs with no runtime at all (issue 14).

    python -m runtime.measure.loopback_floor --up 802847 --down 4100 --idle-ms 2 --hold-ms 19 --frames 60

``edgesplit bench`` counts as runtime overhead everything of a frame's time but the head and the tail, the bytes'
trip over loopback included. The issue's aim is the overhead *over compute + transfer* (as the headline's scenarios
subtract bytes / bandwidth + RTT): this measures the transfer part on the same machine, the same way a frame pays it.
A child process serves a plain blocking TCP socket on 127.0.0.1; for each exchange the client idles ``--idle-ms`` (the
head's time, when the worker's side sleeps), sends ``--up`` bytes, the server reads them, holds ``--hold-ms`` (the
tail's time, when the agent's side sleeps) and answers ``--down`` bytes with the hold it measured; the client's
round trip less that hold is the floor: two kernel copies each way and the wake-ups after idle that any transport
between two processes pays (TCP_NODELAY on both ends, as gRPC sets). ``--frames`` exchanges after ``WARMUP``;
it prints the median, p90 and min in ms. The child is ended on every exit (error and Ctrl-C too).

Limits (a request names sizes the server allocates): ``--up`` and ``--down`` up to ``MAX_BYTES`` (64 MiB), ``--hold-ms``
up to ``MAX_HOLD_MS``, ``--frames`` up to ``MAX_FRAMES``; the server refuses a header past them and ends.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence

MAX_BYTES = 64 * 2**20
MAX_HOLD_MS = 10_000.0
MAX_FRAMES = 100_000
WARMUP = 5
_REQUEST = struct.Struct("!QQQ")  # up bytes, down bytes, hold in microseconds
_ANSWER = struct.Struct("!Q")  # the hold the server measured, in nanoseconds (before the down bytes)
START_SECONDS = 30.0  # the server must say its port within this
IO_SECONDS = 60.0  # and no exchange may stall longer


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {len(view)} bytes")
        got += n


def serve(out: Callable[[str], None] = print) -> None:
    """The server's side: one connection, exchanges until the client closes it (``out`` gets the port first)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        out(str(listener.getsockname()[1]))
        listener.settimeout(START_SECONDS)
        conn, _ = listener.accept()
    with _nodelay(conn):
        conn.settimeout(IO_SECONDS)
        head = bytearray(_REQUEST.size)
        buf = bytearray()
        while True:
            try:
                _read_into(conn, memoryview(head))
            except ConnectionError:
                return  # the client is done
            up, down, hold_us = _REQUEST.unpack(head)
            if up > MAX_BYTES or down > MAX_BYTES or hold_us > MAX_HOLD_MS * 1e3:
                raise ValueError(f"request over the limits: up {up}, down {down} bytes (max {MAX_BYTES}), hold "
                                 f"{hold_us} us (max {MAX_HOLD_MS:g} ms)")
            if len(buf) < max(up, down):
                buf = bytearray(max(up, down))
            _read_into(conn, memoryview(buf)[:up])
            last = time.perf_counter_ns()
            if hold_us:
                time.sleep(hold_us / 1e6)
            conn.sendall(_ANSWER.pack(time.perf_counter_ns() - last))
            conn.sendall(memoryview(buf)[:down])


@contextlib.contextmanager
def _server() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-m", "runtime.measure.loopback_floor", "--serve"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"the loopback floor's server did not start (said {line!r}, exit {proc.poll()})")
        yield int(line)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def measure(up: int, down: int, *, idle_s: float, hold_s: float, frames: int) -> list[float]:
    """``frames`` exchanges' floors in seconds (round trip less the server's hold), after ``WARMUP`` unmeasured."""
    if not (0 <= up <= MAX_BYTES and 0 <= down <= MAX_BYTES):
        raise ValueError(f"up and down must be 0..{MAX_BYTES} bytes, got {up} and {down}")
    if not (0 <= hold_s * 1e3 <= MAX_HOLD_MS and 0 <= idle_s * 1e3 <= MAX_HOLD_MS):
        raise ValueError(f"hold and idle must be 0..{MAX_HOLD_MS:g} ms")
    if not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be 1..{MAX_FRAMES}, got {frames}")
    payload = memoryview(bytes(up))
    answer = memoryview(bytearray(_ANSWER.size + down))
    request = _REQUEST.pack(up, down, round(hold_s * 1e6))
    floors = []
    with _server() as port, _nodelay(socket.create_connection(("127.0.0.1", port), timeout=START_SECONDS)) as sock:
        sock.settimeout(IO_SECONDS)
        for i in range(WARMUP + frames):
            time.sleep(idle_s)
            t0 = time.perf_counter_ns()
            sock.sendall(request)
            sock.sendall(payload)
            _read_into(sock, answer)
            elapsed = time.perf_counter_ns() - t0
            if i >= WARMUP:
                floors.append((elapsed - _ANSWER.unpack_from(answer)[0]) / 1e9)
    return floors


def summary(floors: Sequence[float]) -> dict[str, float]:
    ms = sorted(f * 1e3 for f in floors)
    return {"p50_ms": statistics.median(ms), "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))], "min_ms": ms[0]}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.measure.loopback_floor", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--up", type=int, default=802_847, help="bytes sent each exchange (a frame's wire bytes)")
    p.add_argument("--down", type=int, default=4_100, help="bytes answered (a result's)")
    p.add_argument("--idle-ms", type=float, default=2.0, help="idle before each send (the head's time)")
    p.add_argument("--hold-ms", type=float, default=19.0, help="the server's hold before answering (the tail's time)")
    p.add_argument("--frames", type=int, default=60, help=f"exchanges measured (after {WARMUP} unmeasured)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child's side
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.serve:
        serve(lambda port: print(port, flush=True))
        return 0
    try:
        floors = measure(args.up, args.down, idle_s=args.idle_ms / 1e3, hold_s=args.hold_ms / 1e3, frames=args.frames)
    except ValueError as e:
        print(f"loopback_floor: {e}", file=sys.stderr)
        return 2
    s = summary(floors)
    print(f"loopback floor, {args.up:,} bytes up / {args.down:,} down, idle {args.idle_ms:g} ms, hold {args.hold_ms:g} "
          f"ms, {len(floors)} exchanges: p50 {s['p50_ms']:.3f} ms, p90 {s['p90_ms']:.3f}, min {s['min_ms']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
