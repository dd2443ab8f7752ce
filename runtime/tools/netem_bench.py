"""What the link relay (runtime.tools.netem) gives and costs: RTT, rate and a frame's round trip against the set
values, and the relay process's CPU per MB relayed, for several relay settings side by side.

    python -m runtime.tools.netem_bench --links 1.6@66.7,20@20,58.8@27.4,1000@1 \\
        --variants before=asyncio:16,uvloop=uvloop:16,after=uvloop:0 --rounds 3 --out runtime/tools/results/netem_relay

A link is ``MBIT_PER_S@RTT_MS`` (the relay holds RTT/2 each way). A variant is ``NAME=LOOP:CHUNK_KB[:ROOT]``: the relay
command (``python -m runtime.tools.netem``, a process of its own, as the headline testbed and dpfp_bench start it) on
``LOOP`` (``uvloop``: runtime.wire.eventloop's default, glibc's allocator set; ``asyncio``: asyncio's loop and glibc's
defaults, as the relay ran before it used eventloop.run) with ``--chunk-kb CHUNK_KB`` (0: rate-scaled; ``-``: no flag,
for a relay from before it), run from the checkout ``ROOT`` when given (e.g. ``git archive`` of an older commit,
unpacked; its relay may ignore LOOP). Per round,
link and variant (the variants' order reverses every round, so each sees the same load on average):

- ``rtt_ms``: median of ``--probes`` 1-byte echoes through the relay;
- ``mbps``: a bulk send of ``--bulk-seconds`` of the set rate (at most ``--bulk-max-mb``), timed at the receiver from
  the first read to the last, the first read's bytes left out (as runtime.measure.scenarios.testbed measures it);
- ``frame_ms``: ``--frame-mb`` (at most ``--frame-seconds`` of the rate) sent up and the same bytes echoed back, timed at
  the sender to the last byte back; ``frame_ideal_ms`` = 2 x bytes / rate + RTT;
- ``cpu_ms_per_mb``: the relay process's CPU (every thread's run time, /proc/PID/task/*/schedstat, ns) over the bulk
  send and the frames, per MB relayed (bytes through the relay, both directions).

Writes OUT.json and OUT.md (medians over the rounds). Network stays on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.daemon import children

START_SECONDS = 20.0
IO_TIMEOUT_SECONDS = 120.0
MiB = 2**20


@dataclass(frozen=True)
class Link:
    mbps: float
    rtt_ms: float

    @property
    def bytes_per_second(self) -> float:
        return self.mbps * 125_000.0

    @property
    def name(self) -> str:
        return f"{self.mbps:g} Mbit/s, {self.rtt_ms:g} ms RTT"


@dataclass(frozen=True)
class Variant:
    name: str
    loop: str  # "uvloop" or "asyncio"
    chunk_kb: int | None  # 0: rate-scaled; None: no --chunk-kb (a relay from before the flag)
    root: str = ""  # run the relay from this checkout (e.g. a git archive of an older commit); "": this one


def parse_links(text: str) -> list[Link]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        rate, _, rtt = item.partition("@")
        link = Link(float(rate), float(rtt or 0))
        if not (link.mbps > 0 and link.rtt_ms >= 0):
            raise ValueError(f"link {item!r}: need MBIT_PER_S > 0 @ RTT_MS >= 0")
        out.append(link)
    return out


def parse_variants(text: str) -> list[Variant]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, spec = item.partition("=")
        loop, _, rest = spec.partition(":")
        chunk, _, root = rest.partition(":")
        if loop not in ("uvloop", "asyncio") or not (chunk.isdigit() or chunk == "-") or not name:
            raise ValueError(f"variant {item!r}: need NAME=uvloop|asyncio:CHUNK_KB|-[:ROOT]")
        if root and not (Path(root) / "runtime" / "tools" / "netem.py").is_file():
            raise ValueError(f"variant {item!r}: {root} has no runtime/tools/netem.py")
        out.append(Variant(name, loop, None if chunk == "-" else int(chunk), root))
    return out


class RelayChild:
    """``python -m runtime.tools.netem`` with a variant's settings, as a child process."""

    def __init__(self, target: str, link: Link, variant: Variant):
        env = dict(os.environ, EDGESPLIT_EVENT_LOOP=variant.loop)
        if variant.loop == "asyncio":
            env["EDGESPLIT_MALLOC"] = "default"
        if variant.root:
            env["PYTHONPATH"] = str(Path(variant.root).resolve())
        chunk = [] if variant.chunk_kb is None else ["--chunk-kb", str(variant.chunk_kb)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.tools.netem", "--target", target, "--delay-ms", f"{link.rtt_ms / 2:.4f}",
             "--rate-mbps", f"{link.mbps:.6f}", *chunk, "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=variant.root or None)
        line = children.readline(self.proc, START_SECONDS)
        if "listening on " not in line:
            self.stop()
            raise RuntimeError(f"the relay did not start: {line!r}")
        self.address = line.split("listening on ")[1].split()[0]

    def cpu_seconds(self) -> float:
        """Run time of every thread of the relay so far (schedstat's first field, ns)."""
        total = 0
        task_dir = Path(f"/proc/{self.proc.pid}/task")
        for task in task_dir.iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue  # a thread that ended meanwhile
        return total / 1e9

    def stop(self) -> None:
        children.stop(self.proc)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """'p': 1 byte back. 'B' + 8-byte n: n bytes in, 8-byte rate (B/s, at the receiver) back.
    'F' + 8-byte n: n bytes in, then n bytes back."""
    try:
        while True:
            op = await reader.readexactly(1)
            if op == b"p":
                writer.write(b"p")
            else:
                n = int.from_bytes(await reader.readexactly(8), "big")
                first: tuple[float, int] | None = None
                got = 0
                while got < n:
                    data = await reader.read(min(MiB, n - got))
                    if not data:
                        return
                    first = first or (time.perf_counter(), len(data))
                    got += len(data)
                if op == b"B":
                    assert first is not None
                    rate = (n - first[1]) / max(time.perf_counter() - first[0], 1e-9)
                    writer.write(int(rate).to_bytes(8, "big"))
                else:
                    writer.write(bytes(n))  # built after the last byte came in: inside the frame's time (~1 ms)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    except asyncio.CancelledError:  # the measurement's loop ends with this connection open (direct: no relay closed it)
        pass
    finally:
        writer.close()


async def _exchange(address: str, probes: int, bulk: int, frame: int, frames: int,
                    relay: RelayChild | None) -> dict[str, float]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
    try:
        payload = memoryview(bytes(max(bulk, frame)))  # built before any timing

        async def ask(msg: bytes, answer: int, body: int = 0) -> bytes:
            writer.write(msg)
            for i in range(0, body, MiB):  # in pieces, so the loop also serves the receiving side meanwhile
                writer.write(payload[i: min(body, i + MiB)])
                await writer.drain()
            await writer.drain()
            return await asyncio.wait_for(reader.readexactly(answer), IO_TIMEOUT_SECONDS)

        await ask(b"p", 1)  # connected and warm
        rtts = []
        for _ in range(probes):
            t = time.perf_counter()
            await ask(b"p", 1)
            rtts.append(time.perf_counter() - t)
        cpu0 = relay.cpu_seconds() if relay else 0.0
        rate = int.from_bytes(await ask(b"B" + bulk.to_bytes(8, "big"), 8, bulk), "big")
        times = []
        for _ in range(frames):
            t = time.perf_counter()
            await ask(b"F" + frame.to_bytes(8, "big"), frame, frame)
            times.append(time.perf_counter() - t)
        cpu = (relay.cpu_seconds() - cpu0) if relay else 0.0
    finally:
        writer.close()
    relayed_mb = (bulk + 2 * frame * frames) / 1e6
    return {"rtt_ms": statistics.median(rtts) * 1e3, "mbps": rate * 8 / 1e6,
            "frame_ms": statistics.median(times) * 1e3, "cpu_ms_per_mb": cpu * 1e3 / relayed_mb}


async def measure(link: Link, variant: Variant | None, args: argparse.Namespace) -> dict[str, Any]:
    """One link through one variant's relay (``None``: straight to the echo server, no relay)."""
    server = await asyncio.start_server(_serve, "127.0.0.1", 0)
    target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    bulk = int(min(args.bulk_max_mb * 1e6, max(64 * 1024, link.bytes_per_second * args.bulk_seconds)))
    frame = int(min(args.frame_mb * 1e6, max(16 * 1024, link.bytes_per_second * args.frame_seconds)))
    relay = None
    try:
        if variant is not None:
            relay = await asyncio.to_thread(RelayChild, target, link, variant)
        got = await _exchange(relay.address if relay else target, args.probes, bulk, frame, args.frames, relay)
    finally:
        if relay is not None:
            await asyncio.to_thread(relay.stop)
        server.close()
        await server.wait_closed()
    ideal = (2 * frame / link.bytes_per_second + link.rtt_ms / 1e3) * 1e3
    return {"link": link.name, "mbps_set": link.mbps, "rtt_set_ms": link.rtt_ms,
            "variant": variant.name if variant else "direct", "bulk_bytes": bulk, "frame_bytes": frame,
            "frame_ideal_ms": ideal, **got}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over the rounds per link and variant, with the relative errors against the set values."""
    out = []
    keys = list(dict.fromkeys((r["link"], r["variant"]) for r in rows))
    for link, variant in keys:
        rs = [r for r in rows if r["link"] == link and r["variant"] == variant]
        med = {k: statistics.median(r[k] for r in rs) for k in ("rtt_ms", "mbps", "frame_ms", "cpu_ms_per_mb")}
        first = rs[0]
        out.append({"link": link, "variant": variant, "rounds": len(rs), **med,
                    "rtt_err": med["rtt_ms"] / first["rtt_set_ms"] - 1 if first["rtt_set_ms"] else None,
                    "rate_err": med["mbps"] / first["mbps_set"] - 1,
                    "frame_err": med["frame_ms"] / first["frame_ideal_ms"] - 1,
                    "frame_ideal_ms": first["frame_ideal_ms"], "frame_bytes": first["frame_bytes"],
                    "rtt_range": [min(r["rtt_ms"] for r in rs), max(r["rtt_ms"] for r in rs)],
                    "mbps_range": [min(r["mbps"] for r in rs), max(r["mbps"] for r in rs)],
                    "cpu_range": [min(r["cpu_ms_per_mb"] for r in rs), max(r["cpu_ms_per_mb"] for r in rs)]})
    return out


def markdown(res: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:+.1f} %"

    lines = [f"# netem relay: {res['started_utc']} - {res['ended_utc']}", "",
             f"Command: `{res['command']}`", "",
             f"Machine: {res['machine']}; load {res['load_before']} -> {res['load_after']}", "",
             "Medians over the rounds; errors against the set RTT, rate and the frame's ideal (2 x bytes / rate + RTT); "
             "CPU: the relay process's, per MB relayed.", "",
             "| link | variant | RTT ms | err | Mbit/s | err | frame | frame ms (ideal) | err | relay CPU ms/MB (range) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in res["summary"]:
        lines.append(f"| {s['link']} | {s['variant']} | {s['rtt_ms']:.2f} | {pct(s['rtt_err'])} | {s['mbps']:.2f} | "
                     f"{pct(s['rate_err'])} | {s['frame_bytes'] / 1e6:.2f} MB | {s['frame_ms']:.1f} "
                     f"({s['frame_ideal_ms']:.1f}) | {pct(s['frame_err'])} | {s['cpu_ms_per_mb']:.2f} "
                     f"({s['cpu_range'][0]:.2f}-{s['cpu_range'][1]:.2f}) |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.tools.netem_bench", description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--links", default="1.6@66.7,20@20,58.8@27.4,1000@1", help="MBIT_PER_S@RTT_MS, comma-separated")
    p.add_argument("--variants", default="before=asyncio:16,after=uvloop:0", help="NAME=LOOP:CHUNK_KB, comma-separated")
    p.add_argument("--direct", action="store_true", help="also measure without a relay (what loopback itself gives)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--probes", type=int, default=9, help="1-byte echoes per measurement")
    p.add_argument("--bulk-seconds", type=float, default=1.5, help="bulk send, in seconds of the set rate")
    p.add_argument("--bulk-max-mb", type=float, default=64.0)
    p.add_argument("--frames", type=int, default=3, help="frames (up and back) per measurement")
    p.add_argument("--frame-mb", type=float, default=4.0, help="a frame's bytes each way, at most")
    p.add_argument("--frame-seconds", type=float, default=0.25, help="... and at most this many seconds of the rate")
    p.add_argument("--out", default="", help="write OUT.json and OUT.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        links, variants = parse_links(args.links), parse_variants(args.variants)
        if not (1 <= args.rounds <= 50 and 1 <= args.probes <= 1000 and 1 <= args.frames <= 100
                and 0 < args.bulk_max_mb <= 1024 and 0 < args.frame_mb <= 256):
            raise ValueError("--rounds 1-50, --probes 1-1000, --frames 1-100, --bulk-max-mb <= 1024, --frame-mb <= 256")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started, load0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg()
    rows: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        order: list[Variant | None] = list(variants) if rnd % 2 == 0 else list(reversed(variants))
        if args.direct:
            order.insert(0, None)
        for link in links:
            for v in order:
                row = asyncio.run(measure(link, v, args))
                rows.append({"round": rnd, **row})
                print(f"round {rnd} {row['link']:>28} {row['variant']:>8}: RTT {row['rtt_ms']:7.2f} ms, "
                      f"{row['mbps']:8.2f} Mbit/s, frame {row['frame_ms']:7.1f} ms (ideal {row['frame_ideal_ms']:.1f}), "
                      f"relay CPU {row['cpu_ms_per_mb']:.2f} ms/MB", flush=True)
    load1 = os.getloadavg()
    res = {"command": "python -m runtime.tools.netem_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
           "started_utc": started, "ended_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in load1],
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}",
           "rows": rows, "summary": summarise(rows)}
    text = markdown(res)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
        Path(args.out + ".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
