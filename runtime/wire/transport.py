"""Transport knobs and frame chunking, shared by the agent and the worker.

A frame whose payload is larger than ``chunk_bytes`` travels as one ``StreamRequest.frame``
carrying the first piece, followed at once by ``chunks - 1`` ``StreamRequest.chunk`` messages.
No message therefore meets the gRPC receive limit, whatever the tensor size. The agent sizes a frame's messages by
its link (:func:`link_chunk_bytes`), ``chunk_bytes`` the most.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from runtime.contracts.errors import DeadlineExceeded, InvalidInput, TooLarge
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.wire.budget import ByteBudget
from runtime.wire.framewire import OutFrame
from runtime.wire.liveness import LivenessOptions
from runtime.wire.security import SecurityOptions, aio_channel, sync_channel

MiB = 2**20
KiB = 2**10
# a frame's messages on a link the agent has measured: what the link carries in CHUNK_SECONDS, so a frame past its
# deadline stops taking the link within about that (its remaining messages are not sent; the worker is told to drop it)
CHUNK_SECONDS = 0.25
MIN_CHUNK_BYTES = 64 * KiB  # and never smaller (0.33 s at 1.6 Mbit/s; a message costs a write and a read wake-up)
UNMEASURED_CHUNK_BYTES = 256 * KiB  # a link not measured yet: unknown is not fast


def link_chunk_bytes(cap: int, bytes_per_second: float) -> int:
    """Payload bytes per stream message of a frame on a link that carries ``bytes_per_second`` (0.0: not measured):
    what it carries in :data:`CHUNK_SECONDS`, at least :data:`MIN_CHUNK_BYTES`, ``cap`` the most; an unmeasured link
    :data:`UNMEASURED_CHUNK_BYTES`. On loopback or a LAN a frame up to ``cap`` is one message: 803 KB frames as 256 KiB
    chunks ran 0.7 ms slower in 3 of 3 pairs (overhead 2.67-2.73 against 1.92-1.99 ms; runtime/measure/results/
    overhead.md); at 1.6 Mbit/s a 1 MiB message would hold the link 5.2 s past a frame's deadline."""
    if bytes_per_second <= 0:
        return min(cap, UNMEASURED_CHUNK_BYTES)
    return min(cap, max(MIN_CHUNK_BYTES, int(bytes_per_second * CHUNK_SECONDS)))


@dataclass(frozen=True)
class TransportOptions:
    """gRPC channel/server settings; one object instead of raw option tuples."""

    max_message_bytes: int = 8 * MiB  # send and receive limit per message, both ends
    # the most payload bytes per stream message (< max_message_bytes, whose 8 MiB the worker's must match; the agent
    # sends fewer on a slow or unmeasured link: link_chunk_bytes). Each message is a write, a read and a wake-up on
    # both sides; on loopback (EfficientNet-Lite0 raw, runtime overhead p50, alternating, overhead.md): 803 KB
    # 4.4-4.9 ms as one message against 6.2-6.8 as 256 KiB chunks (2026-12-03) and 1.92-1.99 against 2.67-2.73
    # (2026-12-05); 1.2 MB (conv2d_4) 2.04 / 2.11 / 2.57 ms with a 4 MiB cap against 2.73 / 2.68 / 2.76 as two
    # 1 MiB messages (3 of 3 pairs, 07:06 UTC). So frames up to 4 MiB go as one message on a fast link.
    chunk_bytes: int = 4 * MiB
    # keep-alive. Frame channels (agent -> worker, worker -> next tier, and the probes' own connections) and the
    # worker's server: only the backstop, 10 s + 60 s. A ping (or the answer to the server's) queues behind the frames already sent: on
    # a 1.6 Mbit/s link one 400 KB frame holds it 2 s, and eight 602 KB frames in flight 24 s, which ended
    # live streams under the former 10 s ("ping timeout"). Their streams are watched by `liveness` instead:
    # a silent partition is declared 1.5 s after the last progress, busy (the path's own connection is
    # probed) or idle. Control channels (agent and worker -> planner; `control_channel`) carry small
    # messages only, so their pings wait behind nothing of their own: 1 s + 0.8 s notices a silent
    # partition within 1.8 s of the last byte read (runtime.daemon.planner_client; README "Liveness").
    keepalive_time_ms: int = 1_000  # control channels and the planner's server: ping the connection this often (also idle)
    # frame channels, probe channels and the worker's server: ping after this long without a byte read (gRPC
    # resets the timer on each read). Was 1 s: with the probe channel's and the server's pings, ~50 wake-ups of
    # gRPC's threads a second on an idle agent (8 at 10 s); with idle stream probes off, under the board quota,
    # its gRPC threads' CPU went 1.7-2.4 -> 0.8-0.9 ms/s (issue 14, runtime/measure/results/agent_idle_cpu.md).
    # The liveness watchdog, not keep-alive, detects a dead stream (1.5 s)
    frame_keepalive_time_ms: int = 10_000
    keepalive_timeout_ms: int = 60_000  # frame channels and servers: drop the connection when a ping is not answered in time
    control_keepalive_timeout_ms: int = 800  # control channels: the same, for the planner's channels
    # servers that take no frames (the planner's), and the most the agent widens its planner ping timeout to
    # after a ping was lost while its frames still got through (runtime.agent.planner_link)
    control_backstop_timeout_ms: int = 10_000
    security: SecurityOptions = field(default_factory=SecurityOptions)  # TLS / mTLS / tokens (runtime.wire.security)
    liveness: LivenessOptions = field(default_factory=LivenessOptions)  # link-aware (runtime.wire.liveness)

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        """An asyncio channel to ``address`` with these limits and this process's credentials."""
        return aio_channel(address, list(self.channel_options()), self.security)

    def control_channel(self, address: str) -> grpc.aio.Channel:
        """An asyncio channel for small control messages (the planner's API): keep-alive with the short
        ``control_keepalive_timeout_ms``."""
        return aio_channel(address, list(self.channel_options(control=True)), self.security)

    def probe_channel(self, address: str) -> grpc.aio.Channel:
        """A channel on a TCP connection of its own (gRPC otherwise shares one connection between
        channels with the same target and options), so probes never queue behind a stream's frames."""
        return aio_channel(address, [*self.channel_options(), ("grpc.use_local_subchannel_pool", 1)], self.security)

    def sync_channel(self, address: str) -> grpc.Channel:
        """A blocking channel (CLI, health checks) with these limits and credentials."""
        return sync_channel(address, list(self.channel_options()), self.security)

    def channel_options(self, control: bool = False) -> list[tuple[str, int]]:
        """Client options; ``control``: a control channel's short keep-alive timeout (see the fields)."""
        timeout = self.control_keepalive_timeout_ms if control else self.keepalive_timeout_ms
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms if control else self.frame_keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", timeout),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # gRPC >= 1.5x times an unanswered ping out by this (default 1 min), not by keepalive_timeout_ms
            ("grpc.http2.ping_timeout_ms", timeout),
        ]

    def server_options(self, frames: bool = True) -> list[tuple[str, int]]:
        """Server options; ``frames`` False (a server whose clients send no frames: the planner's): keep-alive
        gives a connection up after ``control_backstop_timeout_ms``, not the frame channels' backstop."""
        timeout = self.keepalive_timeout_ms if frames else self.control_backstop_timeout_ms
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", self.frame_keepalive_time_ms if frames else self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", timeout),
            # accept the clients' keep-alive pings (a control channel's every second, too) without strikes
            ("grpc.http2.min_ping_interval_without_data_ms", min(5_000, self.keepalive_time_ms // 2)),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.http2.ping_timeout_ms", timeout),
            ("grpc.keepalive_permit_without_calls", 1),
        ]


def frame_messages(request: pb.InferRequest | pb.StreamRequest | OutFrame,
                   chunk_bytes: int) -> list[pb.StreamRequest | OutFrame]:
    """Split one frame into stream messages of at most ``chunk_bytes`` of payload each.

    ``request``: an InferRequest (copied once into the messages, left as it was), a StreamRequest
    whose ``frame`` is set (a frame that fits one message is sent as it is, no copy; a larger one is cut
    into chunks and its ``frame`` shortened to the first), or an OutFrame (the agent's frames: its payload
    written once, by the stream's serializer, when it fits one message; runtime.wire.framewire).
    Every access to a protobuf bytes field copies it, so the payload is read once at most.
    """
    if isinstance(request, OutFrame):
        size = len(request.payload)
        request.frame.tensor.payload_size = size
        if size <= chunk_bytes:
            request.frame.tensor.chunks = 1
            return [request]
        request = request.message()
    if isinstance(request, pb.StreamRequest):
        msg, first = request, request.frame
        size = first.tensor.payload_size or len(first.tensor.buffer)
    else:
        msg = pb.StreamRequest()
        first = msg.frame
        first.CopyFrom(request)
        size = request.tensor.payload_size or len(request.tensor.buffer)
    n = max(1, -(-size // chunk_bytes))
    first.tensor.payload_size = size
    first.tensor.chunks = n
    if n == 1:
        return [msg]
    view = memoryview(first.tensor.buffer)
    first.tensor.buffer = bytes(view[:chunk_bytes])
    msgs: list[pb.StreamRequest | OutFrame] = [msg]
    seq = first.header.seq
    for i in range(1, n):
        msgs.append(pb.StreamRequest(chunk=pb.FrameChunk(seq=seq, index=i, data=bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes]))))
    return msgs


class FrameAssembler:
    """Rebuilds whole frames from stream messages, checking order and sizes as they arrive."""

    def __init__(self, max_payload_bytes: int, budget: ByteBudget | None = None):
        self.max_payload_bytes = max_payload_bytes  # the cap per frame, so per stream (one frame open at a time)
        self.budget = budget  # the worker's total for incomplete frames, shared by its streams (runtime.wire.budget)
        self._evicted_seq: int | None = None  # a frame the budget dropped for age: its late chunks are refused
        self._frame: pb.InferRequest | None = None
        self._parts: list[bytes] = []
        self._size = 0
        self._next = 0

    @property
    def pending_seq(self) -> int | None:
        return self._frame.header.seq if self._frame is not None else None

    @property
    def pending_header(self) -> pb.FrameHeader | None:
        """Header of the frame whose chunks are still arriving (the frame an error then concerns)."""
        return self._frame.header if self._frame is not None else None

    def feed(self, msg: pb.StreamRequest) -> pb.InferRequest | None:
        """Take one message; return a complete frame when it has arrived, else None. ``msg`` may be an
        InFrame (runtime.wire.framewire: its ``buffer`` a view of the received bytes, so ``len`` copies nothing).

        Raises InvalidInput or TooLarge; the partial frame is dropped and the assembler is
        ready for the next frame.
        """
        kind = msg.WhichOneof("kind")
        if self._frame is not None and self.budget is not None and self.budget.age(self) > self.budget.timeout:
            seq, self._evicted_seq = self._frame.header.seq, self._frame.header.seq
            self._reset()
            raise DeadlineExceeded(f"frame {seq}: incomplete for more than {self.budget.timeout:g}s; dropped")
        if kind == "frame":
            if self._frame is not None:
                text = f"frame {self._frame.header.seq} ended after {self._next} chunks; a new frame began before its last chunk"
                self._reset()
                raise InvalidInput(text)
            frame = msg.frame
            chunks = frame.tensor.chunks or 1
            declared = frame.tensor.payload_size or len(frame.tensor.buffer)
            if declared > self.max_payload_bytes:
                raise TooLarge(
                    f"frame {frame.header.seq}: payload of {declared} bytes exceeds this worker's cap of "
                    f"{self.max_payload_bytes} bytes; use a smaller split, a lossy codec or raise --max-tensor-bytes"
                )
            if chunks == 1:
                if len(frame.tensor.buffer) != declared:
                    raise InvalidInput(
                        f"frame {frame.header.seq}: payload_size is {declared} but the buffer holds {len(frame.tensor.buffer)} bytes"
                    )
                return frame
            if len(frame.tensor.buffer) > declared:
                raise InvalidInput(f"frame {frame.header.seq}: first chunk is larger than payload_size {declared}")
            if self.budget is not None:
                self.budget.charge(self, len(frame.tensor.buffer))  # Overloaded when the worker's total is reached
            self._frame = frame
            self._parts = [bytes(frame.tensor.buffer)]  # an InFrame's view: kept as bytes of its own
            self._size = len(frame.tensor.buffer)
            self._next = 1
            return None
        if kind == "chunk":
            chunk = msg.chunk
            if self._frame is None:
                if chunk.seq == self._evicted_seq:
                    raise DeadlineExceeded(f"frame {chunk.seq} was dropped: it stayed incomplete too long")
                raise InvalidInput(f"chunk {chunk.index} of frame {chunk.seq} arrived with no frame open")
            frame = self._frame
            if chunk.seq != frame.header.seq or chunk.index != self._next:
                text = f"expected chunk {self._next} of frame {frame.header.seq}, got chunk {chunk.index} of frame {chunk.seq}"
                self._reset()
                raise InvalidInput(text)
            self._size += len(chunk.data)
            if self._size > frame.tensor.payload_size:
                self._reset()
                raise InvalidInput(f"frame {frame.header.seq}: chunks exceed the declared payload_size {frame.tensor.payload_size}")
            if self.budget is not None:
                try:
                    self.budget.charge(self, len(chunk.data))
                except Exception:
                    self._reset()
                    raise
            self._parts.append(chunk.data)
            self._next += 1
            if self._next < frame.tensor.chunks:
                return None
            if self._size != frame.tensor.payload_size:
                self._reset()
                raise InvalidInput(
                    f"frame {frame.header.seq}: {self._size} bytes arrived but payload_size is {frame.tensor.payload_size}"
                )
            frame.tensor.buffer = b"".join(self._parts)
            frame.tensor.chunks = 1
            self._reset()
            return frame
        raise InvalidInput("empty StreamRequest: set either 'frame' or 'chunk'")

    def cancel(self, seq: int) -> bool:
        """The sender gave up on frame ``seq``: drop it if its chunks are still arriving. True if dropped."""
        if self._frame is None or self._frame.header.seq != seq:
            return False
        self._reset()
        return True

    def evict(self) -> None:
        """The budget dropped this stream's partial frame (too old, room needed)."""
        if self._frame is not None:
            self._evicted_seq = self._frame.header.seq
        self._reset()

    def close(self) -> None:
        """The stream ended: release what a partial frame held."""
        self._reset()

    def _reset(self) -> None:
        if self.budget is not None:
            self.budget.release(self)
        self._frame = None
        self._parts = []
        self._size = 0
        self._next = 0
