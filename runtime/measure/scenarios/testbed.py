"""The testbed's pieces, each removed on success, failure and Ctrl-C: link relays (``runtime.tools.netem`` as
child processes), the measurement of the link a relay actually gives (RTT and receiver-side bandwidth, through a
twin relay process with the same settings), and :class:`Cleanup`, which undoes them. The board's cgroup v1 CPU
quota is :class:`runtime.daemon.cgroup.CpuQuota`, the one runtime.tools uses too."""

from __future__ import annotations

import asyncio
import logging
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

from runtime.daemon import children

logger = logging.getLogger(__name__)

RELAY_START_SECONDS = 20.0


class Relay:
    """``python -m runtime.tools.netem`` as a child process relaying to ``target``."""

    def __init__(self, target: str, delay_ms: float, rate_mbps: float):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.tools.netem", "--listen", "127.0.0.1:0", "--target", target,
             "--delay-ms", f"{delay_ms:.4f}", "--rate-mbps", f"{rate_mbps:.6f}", "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = children.readline(self.proc, RELAY_START_SECONDS)
        if "listening on " not in line:
            self.stop()
            raise RuntimeError(f"the relay did not start: {line!r}")
        self.address = line.split("listening on ")[1].split()[0]

    def stop(self) -> None:
        children.stop(self.proc, 5)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """1 byte in -> 1 byte back (RTT probes); a 'B' + 8-byte length starts a bulk send, acked at its end."""
    try:
        while True:
            b = await reader.readexactly(1)
            if b == b"B":
                n = int.from_bytes(await reader.readexactly(8), "big")
                first: tuple[float, int] | None = None
                got = 0
                while got < n:
                    data = await reader.read(min(65536, n - got))
                    if not data:
                        return
                    first = first or (time.perf_counter(), len(data))
                    got += len(data)
                last = time.perf_counter()
                assert first is not None  # n > 0: one read at least
                rate = (n - first[1]) / max(last - first[0], 1e-9)  # bytes after the first read, over the time
                writer.write(int(rate).to_bytes(8, "big"))
            else:
                writer.write(b)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _measure(delay_ms: float, rate_mbps: float, probes: int, bulk_bytes: int) -> dict[str, float]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        relay = await asyncio.to_thread(Relay, f"127.0.0.1:{port}", delay_ms, rate_mbps)
        try:
            host, p = relay.address.rsplit(":", 1)
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(p)), 5)
            rtts: list[float] = []
            for _ in range(probes):
                t = time.perf_counter()
                writer.write(b"p")
                await writer.drain()
                await asyncio.wait_for(reader.readexactly(1), 10)
                rtts.append(time.perf_counter() - t)
            writer.write(b"B" + bulk_bytes.to_bytes(8, "big") + bytes(bulk_bytes))
            await writer.drain()
            rate = int.from_bytes(await asyncio.wait_for(reader.readexactly(8), 120), "big")
            writer.close()
        finally:
            await asyncio.to_thread(relay.stop)
    finally:
        server.close()
        await server.wait_closed()
    return {"rtt_ms": statistics.median(rtts) * 1e3, "mbps": rate * 8 / 1e6}


def measure_link(delay_ms: float, rate_mbps: float, probes: int = 5, seconds: float = 1.5) -> dict[str, Any]:
    """Achieved RTT (median of 1-byte echoes) and bandwidth (at the receiver, ~``seconds`` of bulk data)
    through a relay with these settings, beside the set values; ``off`` names what is > 5 % off."""
    bulk = int(max(64 * 1024, rate_mbps * 125_000 * seconds))
    got = asyncio.run(_measure(delay_ms, rate_mbps, probes, bulk))
    set_rtt, off = 2 * delay_ms, []
    if abs(got["rtt_ms"] - set_rtt) > 0.05 * set_rtt:
        off.append("rtt")
    if abs(got["mbps"] - rate_mbps) > 0.05 * rate_mbps:
        off.append("bandwidth")
    return {"set_rtt_ms": set_rtt, "set_mbps": rate_mbps, "rtt_ms": got["rtt_ms"], "mbps": got["mbps"],
            "bulk_bytes": bulk, "off": off}


_Handler = Callable[[int, FrameType | None], Any] | int | None  # what signal.signal returns


class Cleanup:
    """Everything a run creates, undone in reverse order on exit, error or Ctrl-C (SIGTERM too)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], object]] = []
        self._old_term: _Handler = None

    def add(self, fn: Callable[[], object]) -> None:
        self._undo.append(fn)

    def __enter__(self) -> Cleanup:
        self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as e:
                logger.warning("cleanup step failed: %s", e)
        signal.signal(signal.SIGTERM, self._old_term)


def _raise_interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")
