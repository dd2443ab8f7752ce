"""Tracing (runtime.daemon.tracing): one frame is one trace across the agent and a chain of workers.

Real daemons on loopback in this process (agent -> edge worker -> cloud worker, and a planner), spans
exported to an in-memory exporter; a worker subprocess started with ``--trace-exporter file``. Checks
trace ids and parent/child links, the W3C context in frame headers and gRPC metadata, sampling, and
that tracing is off (nothing imported, nothing recorded, contexts passed on untouched) by default.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import grpc
import pytest
import torch
from conftest import REPO, child_env, cli, wait_for
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from planner_helpers import DEVICE_PROFILE, EDGE_PROFILE, MODEL, RPC, Planner

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.daemon import tracing
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.proto.edgesplit.v1 import planner_pb2 as ppb
from runtime.proto.edgesplit.v1 import planner_pb2_grpc as ppb_grpc
from runtime.wire import security
from runtime.wire.chain import Hop
from runtime.wire.codec import get_codec
from runtime.wire.transport import TransportOptions
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(180)]

DIGITS, SPLIT, END = "digits_cnn", "pool1", "pool2"  # device: ..pool1, edge: pool1..pool2, cloud: pool2..output
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def spans():
    """Tracing on for one test, into memory; off again afterwards."""
    mem = InMemorySpanExporter()
    tracing.configure(tracing.TracingSettings(), "edgesplit-test", exporter=mem)
    yield mem
    tracing.shutdown()


def hexid(n: int) -> str:
    return format(n, "016x")


def by_trace(finished) -> dict[int, list]:
    out: dict[int, list] = {}
    for s in finished:
        out.setdefault(s.context.trace_id, []).append(s)
    return out


def one(spans_, name: str):
    found = [s for s in spans_ if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans_])
    return found[0]


async def chain_frames(images, codec: str = "raw"):
    """agent -> edge [pool1, pool2) -> cloud [pool2, output): the results, and the agent's Prepare."""
    loaded = load_model(DIGITS)
    cloud = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
    edge = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, next_tiers=(f"127.0.0.1:{cloud.port}",)))
    agent = Agent(loaded, InitialPlan(loaded.split(SPLIT), get_codec(codec), worker=f"127.0.0.1:{edge.port}",
                                      end_split=END, next_hops=[Hop(f"127.0.0.1:{cloud.port}", codec="raw")]),
                  AgentOptions(deadline_seconds=30.0))
    try:
        await agent.start()
        return [await agent.infer(x) for x in images]
    finally:
        await agent.close()
        await edge.drain_and_stop(1.0)
        await cloud.drain_and_stop(1.0)


def images(n: int) -> list[torch.Tensor]:
    return [torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(n)]


def test_one_frame_is_one_trace_across_agent_and_two_workers(aio, spans):
    results = aio.run(chain_frames(images(2)))
    assert [r.where for r in results] == ["edge", "edge"], [r.fallback_reason for r in results]
    assert "board_return" in results[0].times  # the plan's first frame went to the board thread
    traces = by_trace(spans.get_finished_spans())
    frames = {tid: ss for tid, ss in traces.items() if any(s.name == "agent.frame" for s in ss)}
    assert len(frames) == 2  # each frame its own trace
    for r, ss in zip(results, sorted(frames.values(), key=lambda ss: one(ss, "agent.frame").start_time), strict=True):
        root = one(ss, "agent.frame")
        assert root.parent is None and root.attributes["edgesplit.frame.seq"] == r.seq
        assert root.attributes["edgesplit.where"] == "edge"
        workers = sorted((s for s in ss if s.name == "worker.frame"), key=lambda s: s.start_time)
        assert len(workers) == 2  # the edge's and the cloud's, in this frame's trace
        edge_span, cloud_span = workers
        forward = one(ss, "worker.forward")
        assert edge_span.parent.span_id == root.context.span_id  # from the frame header's traceparent
        assert forward.parent.span_id == edge_span.context.span_id
        assert cloud_span.parent.span_id == forward.context.span_id  # the forwarded header's traceparent
        assert edge_span.attributes["edgesplit.split"] == SPLIT and edge_span.attributes["edgesplit.end_split"] == END
        assert cloud_span.attributes["edgesplit.split"] == END
        children = {}
        for s in ss:
            if s.parent is not None:
                children.setdefault(s.parent.span_id, set()).add(s.name)
        assert {"agent.board_queue", "agent.head", "agent.encode", "agent.send", "agent.wait",
                "worker.frame"} <= children[root.context.span_id]
        # the way back from the board thread, for a frame handed to it (the plan's first: its board time unknown)
        assert ("agent.board_return" in children[root.context.span_id]) == ("board_return" in r.times)
        assert {"worker.receive", "worker.queue", "worker.decode", "worker.tail", "worker.forward.encode",
                "worker.forward"} <= children[edge_span.context.span_id]
        assert {"worker.receive", "worker.queue", "worker.decode", "worker.tail"} <= children[cloud_span.context.span_id]
        for s in ss:  # every stage lies inside its frame's span (1 ms slack for the laid-out ones)
            assert root.start_time - 1_000_000 <= s.start_time <= s.end_time <= root.end_time + 1_000_000, s.name
    # the agent's Prepare travelled the chain in gRPC metadata: client -> edge -> client -> cloud
    prepares = [s for s in spans.get_finished_spans() if s.name == "edgesplit.v1.Inference/Prepare"]
    assert len(prepares) == 4 and len({s.context.trace_id for s in prepares}) == 1
    ids = {s.context.span_id for s in prepares}
    assert sum(1 for s in prepares if s.parent is None) == 1
    assert all(s.parent.span_id in ids for s in prepares if s.parent is not None)


def test_sample_ratio_zero_records_no_frame_anywhere(aio):
    mem = InMemorySpanExporter()
    tracing.configure(tracing.TracingSettings(trace_sample_ratio=0.0), "edgesplit-test", exporter=mem)
    try:
        results = aio.run(chain_frames(images(2)))
    finally:
        tracing.shutdown()
    assert [r.where for r in results] == ["edge", "edge"]
    # the workers follow the agent's "not sampled" flag (ParentBased): a trace is whole or absent
    assert mem.get_finished_spans() == ()


def test_off_by_default_records_nothing_and_passes_the_context_on(aio):
    assert tracing.TracingSettings().trace_exporter == "none"
    assert tracing.configure(tracing.TracingSettings(), "edgesplit-test") is False
    assert not tracing.enabled() and security.CLIENT_INTERCEPTORS == [] and tracing.server_interceptor() is None

    async def forwarded_context() -> dict:
        """A chained frame sent with a traceparent: what the edge puts in the header it forwards."""
        cloud = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        edge = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1, next_tiers=(f"127.0.0.1:{cloud.port}",)))
        seen = []
        forward = edge.service.next.forward

        async def spy(route, tensor):
            seen.append(route.header)
            return await forward(route, tensor)

        edge.service.next.forward = spy
        try:
            loaded = load_model(DIGITS)
            x = loaded.head(SPLIT)(images(1)[0])
            h = pb.FrameHeader(agent_id="a", model_id=DIGITS, split_id=SPLIT, end_split=END, seq=1,
                               trace_context={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
            async with TransportOptions().aio_channel(f"127.0.0.1:{edge.port}") as ch:
                res = await pb_grpc.InferenceStub(ch).Infer(pb.InferRequest(header=h, tensor=get_codec("raw").encode(x)),
                                                            timeout=RPC)
            assert res.code == 0, res.message
            return dict(seen[0].trace_context)
        finally:
            await edge.drain_and_stop(1.0)
            await cloud.drain_and_stop(1.0)

    assert aio.run(forwarded_context()) == {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}


def test_tracing_off_imports_no_opentelemetry():
    code = ("import sys, runtime.cli.main, runtime.worker.server, runtime.agent.run, planner.server; "
            "from runtime.cli.common import start_tracing; from runtime.worker.config import WorkerConfig; "
            "assert start_tracing(WorkerConfig(), 'worker') is False; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_header_context_limits():
    state_ok = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "tracestate": "v=1", "other": "x"}
    assert tracing._carrier(state_ok) == {"traceparent": state_ok["traceparent"], "tracestate": "v=1"}
    assert tracing._carrier({"traceparent": "0" * 129}) == {}  # over the limit: ignored (a new trace)
    long_state = {"traceparent": state_ok["traceparent"], "tracestate": "x" * 513}
    assert tracing._carrier(long_state) == {"traceparent": state_ok["traceparent"]}
    assert tracing._carrier({"tracestate": "v=1"}) == {}  # no traceparent, no context


def test_planner_rpcs_are_spans_joined_through_metadata(aio, spans, tmp_path):
    async def scenario():
        planner = await Planner.start(tmp_path / "p.sqlite")  # created after configure: traced
        try:
            async with TransportOptions().aio_channel(planner.address) as ch:  # this process's client interceptors
                stub = ppb_grpc.PlannerStub(ch)
                await stub.RegisterWorker(ppb.RegisterWorkerRequest(worker_id="w1", address="127.0.0.1:50051",
                                                                    tier="edge", profiles_json=[EDGE_PROFILE]),
                                          timeout=RPC)
                await stub.RegisterAgent(ppb.RegisterAgentRequest(agent_id="a1", model_id=MODEL, model_digest="w1",
                                                                  profile_json=DEVICE_PROFILE), timeout=RPC)
                watch = stub.WatchPlan(ppb.WatchPlanRequest(agent_id="a1"), timeout=RPC)
                await asyncio.wait_for(watch.read(), RPC)
                watch.cancel()

                async def messages():
                    for bw in (1e6, 2e6):
                        yield ppb.Telemetry(agent_id="a1", worker="w1", bandwidth_bytes_per_second=bw,
                                            rtt_seconds=0.005, sent_unix=time.time())

                await stub.ReportTelemetry(messages(), timeout=RPC)
        finally:
            await planner.stop()

    aio.run(scenario())
    finished = spans.get_finished_spans()
    register = [s for s in finished if s.name == "edgesplit.v1.Planner/RegisterAgent"]
    assert sorted(s.kind.name for s in register) == ["CLIENT", "SERVER"]
    client, server = sorted(register, key=lambda s: s.kind.name)
    assert server.context.trace_id == client.context.trace_id and server.parent.span_id == client.context.span_id
    assert server.parent.is_remote  # it came through the gRPC metadata
    assert server.attributes["rpc.method"] == "RegisterAgent"
    assert len([s for s in finished if s.name == "edgesplit.v1.Planner/ReportTelemetry message"]) == 2
    assert len([s for s in finished if s.name == "edgesplit.v1.Planner/WatchPlan send"]) >= 1  # the plan push
    assert not [s for s in finished if "Health" in s.name]


def test_worker_cli_writes_spans_to_a_file_under_the_callers_trace(reaper, tmp_path):
    path, port_file = tmp_path / "spans.jsonl", tmp_path / "port"
    env = {**child_env(), "OTEL_BSP_SCHEDULE_DELAY": "100"}  # export every 0.1 s, not 5 s
    proc = reaper.spawn(cli("worker", "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--torch-threads", "1",
                            "--trace-exporter", "file", "--trace-endpoint", str(path)), env=env)
    wait_for(lambda: port_file.exists() and port_file.read_text().strip(), 60, "worker port file", proc)
    address = f"127.0.0.1:{port_file.read_text().strip()}"

    async def infer():
        loaded = load_model(DIGITS)
        x = loaded.head(SPLIT)(images(1)[0])
        h = pb.FrameHeader(agent_id="a", model_id=DIGITS, split_id=SPLIT, seq=5,
                           trace_context={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
        async with TransportOptions().aio_channel(address) as ch:
            return await pb_grpc.InferenceStub(ch).Infer(pb.InferRequest(header=h, tensor=get_codec("raw").encode(x)),
                                                         timeout=RPC)

    assert asyncio.run(infer()).code == 0

    def frame_span():
        lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return next((s for s in lines if s["name"] == "worker.frame"), None)

    span = wait_for(frame_span, 30, "worker.frame span in the file", proc)
    assert span["context"]["trace_id"] == "0x" + TRACE_ID and span["parent_id"] == "0x" + PARENT_ID
    assert span["attributes"]["edgesplit.frame.seq"] == 5 and span["resource"]["attributes"]["service.name"] == \
        "edgesplit-worker"
    proc.terminate()
    proc.wait(30)


def test_bad_tracing_settings_are_refused_with_the_fix(tmp_path):
    for flags, phrase in ((("--trace-exporter", "jaeger"), "choose one of none, otlp, console, file"),
                          (("--trace-exporter", "file"), "needs --trace-endpoint PATH"),
                          (("--trace-sample-ratio", "2", "--trace-exporter", "console"), "between 0 and 1")):
        out = subprocess.run(cli("worker", "--listen", "127.0.0.1:0", *flags), cwd=REPO, env=child_env(),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and phrase in out.stderr, out.stderr[-2000:]


def test_otlp_exporter_delivers_spans_to_a_collector():
    """--trace-exporter otlp --trace-endpoint http://HOST:PORT: spans reach an OTLP/gRPC collector (a
    real TraceService server here, on loopback), with the service name."""
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tracing.configure(tracing.TracingSettings(trace_exporter="otlp", trace_endpoint=f"http://127.0.0.1:{port}"),
                          "edgesplit-test")
        with tracing.span("test.otlp", **{"edgesplit.frame.seq": 9}):
            pass
        tracing.shutdown()  # flushes the batch
    finally:
        server.stop(0)
    spans_ = [(rs, s) for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert [s.name for _, s in spans_] == ["test.otlp"]
    resource = {a.key: a.value.string_value for a in spans_[0][0].resource.attributes}
    assert resource["service.name"] == "edgesplit-test"


def test_refused_calls_make_no_server_span(aio, spans, tmp_path):
    """The tracing interceptor runs after authentication: an unauthenticated caller creates no span."""
    from runtime.daemon.server import Daemon, DaemonOptions
    from runtime.wire.security import SecurityOptions, token_digest

    good = "g" * 32
    (tmp_path / "tokens").write_text(f"agent a7 {token_digest(good)}\n")
    (tmp_path / "good").write_text(good)
    (tmp_path / "bad").write_text("b" * 32)

    class Prepared(pb_grpc.InferenceServicer):
        async def Prepare(self, request, context):
            return pb.PrepareResult()

    async def scenario():
        daemon = Daemon(DaemonOptions(listen="127.0.0.1:0", reflection=False,
                                      transport=TransportOptions(security=SecurityOptions(
                                          tokens_file=str(tmp_path / "tokens")))))
        await daemon.start(lambda server: pb_grpc.add_InferenceServicer_to_server(Prepared(), server))
        codes = []
        try:
            for token in ("good", "bad"):
                transport = TransportOptions(security=SecurityOptions(token_file=str(tmp_path / token)))
                async with transport.aio_channel(f"127.0.0.1:{daemon.port}") as ch:
                    try:
                        await pb_grpc.InferenceStub(ch).Prepare(pb.PrepareRequest(), timeout=RPC)
                        codes.append("OK")
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code().name)
        finally:
            await daemon.drain(0.5)
        return codes

    assert aio.run(scenario()) == ["OK", "UNAUTHENTICATED"]
    prepares = [s for s in spans.get_finished_spans() if s.name == "edgesplit.v1.Inference/Prepare"]
    assert sorted(s.kind.name for s in prepares) == ["CLIENT", "CLIENT", "SERVER"]
    refused = next(s for s in prepares if s.attributes.get("rpc.grpc.status_code") == 16)
    assert refused.kind.name == "CLIENT" and refused.status.status_code.name == "ERROR"


def test_settings_come_from_toml_environment_and_flags_like_every_other(tmp_path):
    from runtime.agent.config import AgentConfig
    from runtime.contracts.config import load_config
    from runtime.worker.config import WorkerConfig as Worker

    toml = tmp_path / "agent.toml"
    toml.write_text('[agent]\ntrace_exporter = "otlp"\ntrace_endpoint = "http://collector:4317"\n'
                    "trace_sample_ratio = 0.25\n")
    agent = load_config(AgentConfig, "agent", config_file=toml, env={"EDGESPLIT_AGENT_TRACE_SAMPLE_RATIO": "0.5"})
    assert (agent.trace_exporter, agent.trace_endpoint, agent.trace_sample_ratio) == \
        ("otlp", "http://collector:4317", 0.5)  # environment over TOML
    worker = load_config(Worker, "worker", env={"EDGESPLIT_WORKER_TRACE_EXPORTER": "console"},
                         overrides={"trace_exporter": "file", "trace_endpoint": str(tmp_path / "s.jsonl")})
    assert worker.trace_exporter == "file"  # flags over environment
    out = subprocess.run(cli("print-config", "planner", "--trace-exporter", "console"), cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and 'trace_exporter = "console"' in out.stdout, out.stderr


def test_a_parallel_stage_frame_is_one_trace_with_its_tiles(aio, spans):
    """agent --parallel-plan: each frame's agent.frame holds its tiles' InferTile calls (CLIENT spans),
    and each worker's InferTile SERVER span is their child, through the gRPC metadata."""
    from runtime.agent.parallel import CoordinatorOptions, ParallelCoordinator
    from runtime.parallel.plan import ParallelStage, TiledBlock

    loaded = load_model(DIGITS)

    async def scenario():
        workers = [await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1)) for _ in range(2)]
        stage = ParallelStage(tuple(f"127.0.0.1:{w.port}" for w in workers), (TiledBlock("pool1", "pool2", (1, 1)),))
        coord = ParallelCoordinator(loaded, stage, CoordinatorOptions(codec="raw", transport=TransportOptions()))
        try:
            await coord.prepare(30.0)
            with tracing.span("agent.frame", **{"edgesplit.frame.seq": 0}):  # as runtime.agent.parallel_run does
                y, reports = await coord.run_frame(images(1)[0])
            return y, reports
        finally:
            await coord.close()
            for w in workers:
                await w.drain_and_stop(1.0)

    _, reports = aio.run(scenario())
    assert len(reports) == 2 and all(r.ran_on != "local" for r in reports), reports
    finished = spans.get_finished_spans()
    root = one(finished, "agent.frame")
    tiles = [s for s in finished if s.name == "edgesplit.v1.Tiles/InferTile"]
    clients = [s for s in tiles if s.kind.name == "CLIENT"]
    servers = [s for s in tiles if s.kind.name == "SERVER"]
    assert len(clients) == len(servers) == 2
    assert all(s.context.trace_id == root.context.trace_id for s in tiles)
    assert all(c.parent.span_id == root.context.span_id for c in clients)
    assert {s.parent.span_id for s in servers} == {c.context.span_id for c in clients}
