"""JSON logs carry the frame, plan and agent ids wherever they are known (runtime.daemon.logcontext,
runtime.cli.logs): set once by a frame's hooks on the worker and the agent, seen by every line logged
while that frame is handled, never by another frame's lines; the authenticated caller inside an RPC
handler; trace and span ids when tracing is on."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import torch

from runtime.agent.client import Agent
from runtime.agent.config import AgentOptions, InitialPlan
from runtime.cli.logs import JsonFormatter
from runtime.daemon import auth, tracing
from runtime.daemon.logcontext import bind, current, log_scope
from runtime.models.loader import load_model
from runtime.proto.edgesplit.v1 import inference_pb2 as pb
from runtime.proto.edgesplit.v1 import inference_pb2_grpc as pb_grpc
from runtime.wire.codec import get_codec
from runtime.wire.transport import TransportOptions
from runtime.worker.config import WorkerConfig
from runtime.worker.server import serve

pytestmark = pytest.mark.timeout(120)


class Lines(logging.Handler):
    """Every record formatted as the JSON format would write it."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record):
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def lines():
    root = logging.getLogger()
    handler, level = Lines(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler.lines
    root.removeHandler(handler)
    root.setLevel(level)


def test_concurrent_frames_keep_their_own_ids(lines):
    log = logging.getLogger("test.frames")

    async def frame(seq: int) -> None:
        with log_scope(frame=seq, plan=2, agent=f"board-{seq}"):
            await asyncio.sleep(0.01 * (3 - seq))  # interleave: later frames log first
            log.info("frame %d", seq)
            with log_scope(split="pool1"):  # nested: adds, keeps the rest
                log.info("inner %d", seq)
        log.info("after %d", seq)

    async def run() -> None:
        await asyncio.gather(*(frame(i) for i in range(3)))

    asyncio.run(run())
    for line in (line for line in lines if line["logger"] == "test.frames"):
        seq = int(line["msg"].split()[-1])
        if line["msg"].startswith("after"):
            assert "frame" not in line and "agent" not in line  # the scope ended
        else:
            assert line["frame"] == seq and line["agent"] == f"board-{seq}" and line["plan"] == 2, line
            assert ("split" in line) == line["msg"].startswith("inner")
    assert current() == {}


def test_extra_wins_over_the_context_and_unknown_fields_are_refused(lines):
    with log_scope(frame=1, plan=1):
        logging.getLogger("t").warning("x", extra={"frame": 9})
    assert lines[-1]["frame"] == 9 and lines[-1]["plan"] == 1
    with pytest.raises(TypeError, match="unknown field"), log_scope(seq=1):
        pass
    with pytest.raises(TypeError, match="unknown field"):
        bind(frame_id=1)


def test_the_authenticated_caller_is_named_in_handler_lines(lines):
    async def handler() -> None:  # what the auth interceptor sets for the RPC's task
        auth._current.set(auth.Identity("agent", "board-3", "cert"))
        logging.getLogger("t").info("handled")

    asyncio.run(handler())
    assert lines[-1]["agent"] == "board-3"
    logging.getLogger("t").info("outside")
    assert "agent" not in lines[-1]


def test_trace_ids_on_lines_inside_a_span(lines):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mem = InMemorySpanExporter()
    tracing.configure(tracing.TracingSettings(), "edgesplit-test", exporter=mem)
    try:
        with tracing.span("test.span"):
            logging.getLogger("t").info("inside")
        logging.getLogger("t").info("outside")
    finally:
        tracing.shutdown()
    (span,) = mem.get_finished_spans()
    inside, outside = lines[-2], lines[-1]
    assert inside["trace_id"] == format(span.context.trace_id, "032x")
    assert inside["span_id"] == format(span.context.span_id, "016x")
    assert "trace_id" not in outside


def test_worker_lines_name_the_frame_that_caused_them(lines, one_torch_thread):
    """The worker loads a tail on a frame's first use: that line says which frame, agent and plan."""

    async def scenario() -> pb.InferResult:
        worker = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        try:
            loaded = load_model("digits_cnn")
            x = loaded.head("pool1")(torch.zeros(1, 3, 28, 28))
            h = pb.FrameHeader(agent_id="board-7", model_id="digits_cnn", split_id="pool1", seq=42, plan_version=3)
            async with TransportOptions().aio_channel(f"127.0.0.1:{worker.port}") as ch:
                return await pb_grpc.InferenceStub(ch).Infer(pb.InferRequest(header=h, tensor=get_codec("raw").encode(x)),
                                                             timeout=30)
        finally:
            await worker.drain_and_stop(1.0)

    assert asyncio.run(scenario()).code == 0
    loaded_tail = [line for line in lines if line["msg"].startswith("loaded tail digits_cnn@pool1")]
    assert loaded_tail, [line["msg"] for line in lines]
    line = loaded_tail[0]
    assert (line["frame"], line["agent"], line["plan"], line["model"], line["split"]) == \
        (42, "board-7", 3, "digits_cnn", "pool1")


def test_agent_lines_name_frame_plan_and_agent(lines, one_torch_thread):
    """A frame the agent runs locally logs why at DEBUG; the agent id comes from the frame's context."""
    loaded = load_model("digits_cnn")

    async def scenario():
        agent = Agent(loaded, InitialPlan(loaded.split("pool1"), get_codec("raw"), worker="", version=5),
                      AgentOptions(agent_id="board-9"))
        try:
            return await agent.infer(torch.zeros(1, 3, 28, 28))
        finally:
            await agent.close()

    result = asyncio.run(scenario())
    assert result.where == "local"
    local = [line for line in lines if "runs locally" in line["msg"]]
    assert local and local[0]["agent"] == "board-9" and local[0]["frame"] == result.seq and local[0]["plan"] == 5


def test_agent_cli_json_lines_name_the_agent_from_its_start():
    import subprocess

    from conftest import REPO, child_env, cli

    out = subprocess.run(cli("agent", "--worker", "", "--model", "digits_cnn", "--frames", "2", "--agent-id", "board-5",
                             "--log-format", "json", "--log-level", "DEBUG", "--no-summary"),
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    after = lines[next(i for i, line in enumerate(lines) if line["logger"] == "runtime.agent.run"):]
    assert after and all(line.get("agent") == "board-5" for line in after), after
    frames = [line for line in after if "runs locally" in line["msg"]]
    assert [line["frame"] for line in frames] == [0, 1]
