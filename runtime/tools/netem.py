"""A slow link in user space: a TCP relay that holds bytes for a one-way delay and paces a rate.

``tc netem`` is missing from the kernels edgesplit is developed on, and namespaces need root, so
tests and users who want an IIoT-like link on one machine put this relay between the agent and
the worker (gRPC passes through it unchanged)::

    python -m runtime.tools.netem --listen 127.0.0.1:50052 --target 127.0.0.1:50051 --delay-ms 10 --rate-mbps 2

Each direction of each connection is its own link (full duplex). A chunk read from one side is
scheduled the way a serialising link would send it and then delivered ``delay`` later::

    start      = max(arrival, when the previous chunk finished serialising)
    finished   = start + len(chunk) / rate          (0 when the rate is unlimited)
    deliver_at = finished + delay

so a round trip gains ``2 x delay`` and a bulk transfer arrives at ``rate`` (measure it at the
receiver: the sender's socket buffers absorb a burst first). Delay and rate may be changed while
connections are open (:meth:`DelayProxy.set_shape`); a change applies to bytes that arrive from
then on, bytes already scheduled keep their times, as on a real link whose queue drains at the
old rate. Each direction holds at most ``buffer_bytes`` (a bounded router queue): beyond that
the relay stops reading, and TCP flow control pushes back on the sender. End of stream is
passed on once the bytes before it were delivered; a reset on either side closes both.

Bytes are read in pieces of about 1 ms of the rate (16-64 KiB, :meth:`DelayProxy.read_bytes`) and held until their
instant by the kernel's timer (a timerfd, not the event loop's millisecond timers), so a 0.5 ms delay is 0.5 ms.
The command runs on the daemons' event loop (``runtime.wire.eventloop``: uvloop, glibc's allocator set;
``EDGESPLIT_EVENT_LOOP=asyncio`` for asyncio's). Measured against the set values and per MB of CPU:
runtime/tools/results/netem_relay.md (``python -m runtime.tools.netem_bench``). Usable with any TCP service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

from runtime.wire import eventloop

logger = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 16 * 1024  # bytes read at a time at most, at low rates: the granularity of pacing
MAX_CHUNK_BYTES = 64 * 1024  # the most read at a time (rate-scaled chunks stop here)
CHUNK_SECONDS = 1e-3  # rate-scaled chunks hold about this much of the rate (see DelayProxy.read_bytes)
DEFAULT_CHUNK_BYTES = 0  # 0: rate-scaled; a number: that many bytes whatever the rate
DEFAULT_BUFFER_BYTES = 256 * 1024  # per direction and connection
CONNECT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class LinkShape:
    """What the relay emulates, the same in both directions."""

    delay_seconds: float = 0.0  # one way
    rate_bytes_per_second: float = 0.0  # 0 = unlimited

    def __post_init__(self) -> None:
        if not (self.delay_seconds >= 0 and self.rate_bytes_per_second >= 0):
            raise ValueError(f"delay and rate must be >= 0, got {self.delay_seconds} s and "
                             f"{self.rate_bytes_per_second} B/s")

    @classmethod
    def from_ms_mbps(cls, delay_ms: float, rate_mbps: float) -> LinkShape:
        return cls(delay_ms / 1e3, rate_mbps * 125_000.0)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class _PreciseTimer:
    """Waits until a ``time.monotonic()`` instant with the kernel's precision: a Linux timerfd (CLOCK_MONOTONIC, set
    to the absolute instant) that the event loop watches like a socket. The loops' own timers keep milliseconds:
    asyncio's epoll wait is rounded up to the next ms (+0.47-0.59 ms late a sleep, measured), uvloop rounds the delay
    to whole ms (a 0.5 ms sleep returns at once); on a 0.5 ms one-way delay either is off by about its size
    (runtime/tools/results/netem_relay.md). Where no timerfd can be made (not Linux) it falls back to asyncio.sleep."""

    _libc: ctypes.CDLL | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.fd = -1
        self._waiter: asyncio.Future[None] | None = None
        libc = self._load()
        if libc is not None:
            fd = int(libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC))
            if fd >= 0:
                try:
                    loop.add_reader(fd, self._fired)
                except (NotImplementedError, OSError, ValueError):  # a loop that cannot watch it
                    os.close(fd)
                else:
                    self.fd = fd

    @classmethod
    def _load(cls) -> ctypes.CDLL | None:
        if cls._libc is None and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
                libc.timerfd_settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.POINTER(_ITimerSpec), ctypes.c_void_p)
                cls._libc = libc
            except (OSError, AttributeError):
                return None
        return cls._libc

    async def sleep_until(self, when: float) -> None:
        wait = when - time.monotonic()
        if wait <= 0:
            return
        if self.fd < 0 or self._libc is None:
            await asyncio.sleep(wait)
            return
        sec = int(when)
        spec = _ITimerSpec(_TimeSpec(0, 0), _TimeSpec(sec, max(1, int((when - sec) * 1e9))))
        if self._libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            await asyncio.sleep(wait)
            return
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _fired(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self.fd, 8)  # the expiry count; the fd is readable until it is read
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


_CLOCK_MONOTONIC = 1  # <time.h>; time.monotonic() reads this clock on Linux
_TFD_TIMER_ABSTIME = 1  # <sys/timerfd.h>


class _Direction:
    """One way of one connection: read, schedule, hold, write. Times are ``time.monotonic()`` (uvloop's loop.time()
    is the loop's cached milliseconds)."""

    def __init__(self, proxy: DelayProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str):
        self.proxy, self.reader, self.writer, self.name = proxy, reader, writer, name
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()  # (deliver at, bytes), None: end; bounded in bytes by _read
        self.link_free = 0.0  # monotonic time at which the link finishes serialising what it was given
        self.queued_bytes = 0  # read and not yet written (<= proxy.buffer_bytes)
        self.room = asyncio.Event()  # set by the writer whenever bytes leave

    async def pump(self) -> None:
        """Relay until end of stream (passed on) or an error (raised, so the connection closes)."""
        timer = _PreciseTimer(asyncio.get_running_loop())
        tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._write(timer))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            timer.close()

    async def _read(self) -> None:
        while True:
            chunk = self.proxy.read_bytes()
            while self.queued_bytes + chunk > self.proxy.buffer_bytes:  # full: stop reading, TCP pushes back
                self.room.clear()
                await self.room.wait()
            data = await self.reader.read(chunk)
            if not data:
                self.queue.put_nowait(None)
                return
            if self.proxy.blackhole:  # a silent partition: bytes vanish, no RST, no FIN
                self.proxy.swallowed_bytes += len(data)
                continue
            shape = self.proxy.shape
            start = max(time.monotonic(), self.link_free)
            self.link_free = start + (len(data) / shape.rate_bytes_per_second if shape.rate_bytes_per_second else 0.0)
            self.queued_bytes += len(data)
            self.queue.put_nowait((self.link_free + shape.delay_seconds, data))

    async def _write(self, timer: _PreciseTimer) -> None:
        while True:
            item = await self.queue.get()
            if item is None:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            deliver_at, data = item
            await timer.sleep_until(deliver_at)
            self.writer.write(data)
            await self.writer.drain()
            self.queued_bytes -= len(data)
            self.room.set()
            self.proxy.relayed_bytes[self.name] += len(data)


class DelayProxy:
    """``async with DelayProxy(target, shape) as proxy:`` relays ``proxy.address`` to ``target``."""

    def __init__(self, target: str, shape: LinkShape = LinkShape(), listen: str = "127.0.0.1:0", *,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS):
        if chunk_bytes < 0 or buffer_bytes < max(chunk_bytes, MIN_CHUNK_BYTES):
            raise ValueError(f"need 0 <= chunk_bytes <= buffer_bytes and buffer_bytes >= {MIN_CHUNK_BYTES}, got "
                             f"{chunk_bytes} and {buffer_bytes}")
        self.target = _split_address(target)
        self.listen = _split_address(listen)
        self.shape = shape
        self.buffer_bytes = buffer_bytes
        self.chunk_bytes = chunk_bytes  # 0: rate-scaled (read_bytes)
        self.connect_timeout = connect_timeout
        self.relayed_bytes = {"up": 0, "down": 0}  # delivered to the target / back to clients
        self.connections = 0  # accepted so far
        self.blackhole = False  # True: swallow every byte from now on, both ways (a silent partition)
        self.swallowed_bytes = 0  # bytes dropped while blackholed
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._directions: set[_Direction] = set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in the relay now, over all connections and directions."""
        return sum(d.queued_bytes for d in self._directions)

    def read_bytes(self) -> int:
        """The most bytes one read takes, which the relay then paces as one piece: ``chunk_bytes`` where set, else
        about CHUNK_SECONDS of the current rate, at least MIN_CHUNK_BYTES and at most MAX_CHUNK_BYTES (the most when
        the rate is unlimited), never more than ``buffer_bytes``. At 1.6-58.8 Mbit/s that is 16 KiB; at 1 Gbit/s
        64 KiB, a quarter of the loop passes per MB (runtime/tools/results/netem_relay.md). A piece is delivered
        whole once it finished serialising, so a larger one arrives in coarser steps (64 KiB is 0.5 ms at 1 Gbit/s);
        the last byte of a transfer arrives when it would with any size."""
        if self.chunk_bytes:
            return self.chunk_bytes
        rate = self.shape.rate_bytes_per_second
        size = MAX_CHUNK_BYTES if not rate else min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, int(rate * CHUNK_SECONDS)))
        return min(size, self.buffer_bytes)

    def set_shape(self, delay_seconds: float | None = None, rate_bytes_per_second: float | None = None) -> None:
        """Change the delay and/or the rate (0 = unlimited) for bytes arriving from now on."""
        self.shape = LinkShape(self.shape.delay_seconds if delay_seconds is None else delay_seconds,
                               self.shape.rate_bytes_per_second if rate_bytes_per_second is None
                               else rate_bytes_per_second)
        logger.info("link now %.1f ms one way, %s", self.shape.delay_seconds * 1e3,
                    f"{self.shape.rate_bytes_per_second * 8 / 1e6:g} Mbit/s" if self.shape.rate_bytes_per_second
                    else "unlimited")

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1])
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop accepting, cut every connection, wait for the relay tasks to end."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        server_w = None
        try:
            try:
                server_r, server_w = await asyncio.wait_for(asyncio.open_connection(*self.target), self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as e:
                logger.warning("cannot reach %s:%d: %s", *self.target, e or type(e).__name__)
                return
            up = _Direction(self, client_r, server_w, "up")
            down = _Direction(self, server_r, client_w, "down")
            self._directions |= {up, down}
            try:
                pumps = [asyncio.create_task(d.pump()) for d in (up, down)]
                try:
                    for done in asyncio.as_completed(pumps):
                        await done  # an error in either direction ends both
                finally:
                    for p in pumps:
                        p.cancel()
                    await asyncio.gather(*pumps, return_exceptions=True)
            finally:
                self._directions -= {up, down}
        except (OSError, asyncio.IncompleteReadError) as e:
            logger.debug("connection ended: %s", e)
        finally:
            for w in (client_w, server_w):
                if w is not None:
                    w.close()
            for w in (client_w, server_w):
                if w is not None:
                    with contextlib.suppress(OSError, asyncio.TimeoutError):
                        await asyncio.wait_for(w.wait_closed(), 1.0)


# -- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.netem", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="address to accept connections on; port 0 picks a free one (default: %(default)s)")
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="address to relay each connection to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction (default: %(default)s)")
    p.add_argument("--rate-mbps", type=float, default=0.0,
                   help="rate cap in Mbit/s, each direction; 0 = unlimited (default: %(default)s)")
    p.add_argument("--buffer-kb", type=int, default=DEFAULT_BUFFER_BYTES // 1024,
                   help="bytes held per direction and connection, in KiB (default: %(default)s)")
    p.add_argument("--chunk-kb", type=int, default=DEFAULT_CHUNK_BYTES // 1024,
                   help=f"bytes read and paced as one piece, in KiB; 0 = about {CHUNK_SECONDS * 1e3:g} ms of the rate, "
                        f"{MIN_CHUNK_BYTES // 1024}-{MAX_CHUNK_BYTES // 1024} KiB (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


async def _serve(args: argparse.Namespace) -> None:
    chunk = args.chunk_kb * 1024
    proxy = DelayProxy(args.target, LinkShape.from_ms_mbps(args.delay_ms, args.rate_mbps), args.listen,
                       buffer_bytes=max(args.buffer_kb * 1024, chunk, MIN_CHUNK_BYTES), chunk_bytes=chunk)
    await proxy.start()
    rate = f"{args.rate_mbps:g} Mbit/s" if args.rate_mbps else "unlimited rate"
    print(f"edgesplit netem listening on {proxy.address} -> {args.target} ({args.delay_ms:g} ms one way, {rate})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _split_address(args.target)
        LinkShape.from_ms_mbps(args.delay_ms, args.rate_mbps)
        if args.chunk_kb < 0:
            raise ValueError(f"--chunk-kb must be >= 0, got {args.chunk_kb}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eventloop.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
