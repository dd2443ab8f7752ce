"""The user-space link emulator (runtime.tools.netem): delay, rate, runtime changes, bounded buffers, CLI.

Times are measured at the receiver and only bounded loosely from above (a busy 2-core machine
is slower, never faster): the lower bounds are what the relay guarantees by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time

import pytest
from conftest import cli, terminate, wait_for

from runtime.tools.netem import DelayProxy, LinkShape, main

pytestmark = pytest.mark.timeout(60)


class Sink:
    """A TCP server that counts what it receives (first and last byte times), or reads nothing."""

    def __init__(self, read: bool = True):
        self.read = read
        self.received = 0
        self.first = self.last = 0.0
        self.eof = asyncio.Event()
        self.handlers: list[asyncio.Task] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader, writer):
        self.handlers.append(asyncio.current_task())
        try:
            if not self.read:
                await self.eof.wait()
            while data := await reader.read(65536):
                now = time.perf_counter()
                self.first = self.first or now
                self.received, self.last = self.received + len(data), now
        except ConnectionError:
            pass
        self.eof.set()
        writer.close()

    async def close(self):
        self.eof.set()
        await asyncio.wait_for(asyncio.gather(*self.handlers), 5)
        self.server.close()


async def _echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _round_trips(address: str, n: int) -> list[float]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        writer.write(b"p")
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(1), 5)
        out.append(time.perf_counter() - t0)
    writer.close()
    return out


def test_delay_adds_twice_the_one_way_delay_to_a_round_trip():
    async def scenario():
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            direct = min(await _round_trips(target, 5))
            async with DelayProxy(target, LinkShape(delay_seconds=0.025)) as proxy:
                delayed = await _round_trips(proxy.address, 5)
                proxy.set_shape(delay_seconds=0.005)  # applies to connections already open, and to new ones
                shorter = await _round_trips(proxy.address, 5)
            return direct, delayed, shorter
        finally:
            server.close()

    direct, delayed, shorter = asyncio.run(scenario())
    assert direct < 0.02
    assert all(0.050 <= rt < 0.050 + 0.25 for rt in delayed), delayed
    assert all(0.010 <= rt < 0.010 + 0.25 for rt in shorter), shorter


def _transfer(proxy_shape: LinkShape, nbytes: int, change=None) -> tuple[float, DelayProxy]:
    """Send ``nbytes`` through a relay with ``proxy_shape``; returns the rate seen by the receiver."""

    async def scenario():
        sink = Sink()
        target = await sink.start()
        async with DelayProxy(target, proxy_shape) as proxy:
            host, port = proxy.address.rsplit(":", 1)
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"x" * nbytes)
            if change is not None:
                await asyncio.sleep(0.05)
                change(proxy)
            await writer.drain()
            writer.write_eof()
            await asyncio.wait_for(sink.eof.wait(), 30)  # end of stream is passed on after the data
            writer.close()
        await sink.close()
        assert sink.received == nbytes and proxy.relayed_bytes == {"up": nbytes, "down": 0}
        return (sink.received - 16 * 1024) / (sink.last - sink.first), proxy

    return asyncio.run(scenario())


def test_rate_cap_paces_a_bulk_transfer_and_can_change_at_runtime():
    unlimited, _ = _transfer(LinkShape(), 2_000_000)
    capped, _ = _transfer(LinkShape(rate_bytes_per_second=2e6), 600_000)  # 16 Mbit/s
    assert unlimited > 20e6, unlimited
    assert 1.0e6 < capped <= 2e6 * 1.1, capped  # measured from the first byte to the last at the receiver
    # slowed down mid-transfer: bytes arriving after the change are paced at the new rate
    slowed, _ = _transfer(LinkShape(rate_bytes_per_second=4e6), 1_200_000,
                          change=lambda p: p.set_shape(rate_bytes_per_second=1e6))
    assert slowed < 2e6, slowed


def test_buffers_are_bounded_and_close_cuts_connections():
    async def scenario():
        sink = Sink(read=False)  # never reads: the relay must stop reading too
        target = await sink.start()
        proxy = await DelayProxy(target, LinkShape(), buffer_bytes=64 * 1024).start()
        host, port = proxy.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"x" * 64 * 2**20)
        with pytest.raises(asyncio.TimeoutError):  # the sender is pushed back on, not buffered for
            await asyncio.wait_for(writer.drain(), 1.0)
        held = proxy.buffered_bytes
        await asyncio.wait_for(proxy.close(), 5)
        # the client sees its connection end (or a reset: the relay had unread bytes from it)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await sink.close()
        return held

    held = asyncio.run(scenario())
    assert 0 < held <= 64 * 1024


def test_command_line_relays_and_stops_on_sigterm(reaper, tmp_path):
    log = tmp_path / "netem.log"

    async def scenario():
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        proc = reaper.spawn([*cli()[:2], "runtime.tools.netem", "--listen", "127.0.0.1:0", "--target", target,
                             "--delay-ms", "10", "--rate-mbps", "8"], log=log)
        found = await asyncio.to_thread(wait_for, lambda: re.search(r"listening on (127\.0\.0\.1:\d+) ->",
                                                                      log.read_text()), 30, "netem to listen", proc)
        try:
            return await _round_trips(found.group(1), 3), await asyncio.to_thread(terminate, proc, 10)
        finally:
            server.close()

    rts, code = asyncio.run(scenario())
    assert all(0.020 <= rt < 0.020 + 0.25 for rt in rts), rts
    assert code == 0
    assert main(["--target", "nowhere"]) == 2


def test_read_size_scales_with_the_rate_between_its_floor_and_cap():
    from runtime.tools.netem import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES

    def size(mbps: float, **kw) -> int:
        return DelayProxy("127.0.0.1:1", LinkShape.from_ms_mbps(1, mbps), **kw).read_bytes()

    assert size(0.1) == size(1.6) == size(58.8) == MIN_CHUNK_BYTES  # the scenarios' links: 16 KiB, as before
    assert MIN_CHUNK_BYTES < size(200) == 25_000 < MAX_CHUNK_BYTES  # about 1 ms of the rate
    assert size(1000) == size(0) == MAX_CHUNK_BYTES  # capped; unlimited takes the cap
    assert size(1000, chunk_bytes=16 * 1024) == 16 * 1024  # a set size whatever the rate
    assert size(1000, buffer_bytes=MIN_CHUNK_BYTES * 2) == MIN_CHUNK_BYTES * 2  # never beyond the buffer
    proxy = DelayProxy("127.0.0.1:1", LinkShape.from_ms_mbps(1, 1000))
    proxy.set_shape(rate_bytes_per_second=1.6 * 125_000)
    assert proxy.read_bytes() == MIN_CHUNK_BYTES  # follows a rate changed at run time
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1:1", buffer_bytes=MIN_CHUNK_BYTES - 1)
    with pytest.raises(ValueError):
        DelayProxy("127.0.0.1:1", chunk_bytes=-1)
    assert main(["--target", "127.0.0.1:1", "--chunk-kb", "-1"]) == 2


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_sub_millisecond_delay_is_held_not_rounded_to_the_loops_milliseconds(loop_name):
    """0.5 ms each way: the loops' timers keep whole ms (uvloop rounds a 0.5 ms sleep to none, so the old relay
    gave ~0.3 ms round trips on uvloop); the relay's timerfd holds each byte at least the delay, on either loop."""
    from runtime.tools.netem import _PreciseTimer

    async def scenario():
        if sys.platform.startswith("linux"):
            timer = _PreciseTimer(asyncio.get_running_loop())
            assert timer.fd >= 0  # the kernel's timer, not the loop's
            when = time.monotonic() + 0.0003
            await timer.sleep_until(when)
            assert time.monotonic() >= when
            timer.close()
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        try:
            async with DelayProxy(target, LinkShape(delay_seconds=0.0005)) as proxy:
                return await _round_trips(proxy.address, 20)
        finally:
            server.close()

    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        rts = uvloop.run(scenario())
    else:
        rts = asyncio.run(scenario())
    assert all(0.001 <= rt < 0.001 + 0.25 for rt in rts), rts
