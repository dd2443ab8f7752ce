"""runtime.wire.eventloop: the daemons' and the agent's loop is uvloop where installed, asyncio's on request."""

from __future__ import annotations

import asyncio

import pytest

from runtime.wire import eventloop

pytestmark = pytest.mark.timeout(30)


async def _loop_module() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_uvloop_by_default_and_asyncio_on_request(monkeypatch):
    pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.loop_name() == "uvloop"
    assert eventloop.run(_loop_module()) == "uvloop"
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.loop_name() == "asyncio"
    assert eventloop.run(_loop_module()) == "asyncio"


def test_a_real_worker_and_agent_exchange_frames_on_uvloop(monkeypatch):
    """grpc.aio on uvloop: a worker and an agent in one uvloop-run process, frames answered on the edge."""
    pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloop.ENV, raising=False)
    import torch

    from runtime.agent.client import Agent
    from runtime.agent.config import AgentOptions, InitialPlan
    from runtime.models.loader import load_model
    from runtime.wire.codec import get_codec
    from runtime.worker.config import WorkerConfig
    from runtime.worker.server import serve

    torch.set_num_threads(1)
    loaded = load_model("digits_cnn")
    x = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))

    async def go():
        ws = await serve(WorkerConfig(listen="127.0.0.1:0", torch_threads=1))
        agent = Agent(loaded, InitialPlan(loaded.split("pool1"), get_codec("raw"), worker=f"127.0.0.1:{ws.port}"),
                      AgentOptions(deadline_seconds=30.0))
        try:
            await agent.start()
            results = [await agent.infer(x) for _ in range(3)]
            return await _loop_module(), results
        finally:
            await agent.close()
            await ws.drain_and_stop(0.5)

    loop, results = eventloop.run(go())
    assert loop == "uvloop"
    assert [r.where for r in results] == ["edge"] * 3, [r.fallback_reason for r in results]
    with torch.inference_mode():
        assert torch.allclose(results[0].output, loaded.full(x))


_FAULTS = """
import resource, sys
from runtime.wire import eventloop
tuned = eventloop.tune_malloc()
n = 802_847  # a frame's size in the overhead benchmark
def frame_copies():
    a, b, c = b"\\x01" * n, b"\\x02" * n, b"\\x03" * n  # the copies a frame's bytes make on one side
    del a, b, c
for _ in range(3):
    frame_copies()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    frame_copies()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env: dict[str, str]) -> tuple[str, int]:
    import os
    import subprocess
    import sys

    run_env = {k: v for k, v in os.environ.items() if k not in (eventloop.MALLOC_ENV, *eventloop._USER_SETTINGS)}
    out = subprocess.run([sys.executable, "-c", _FAULTS], env={**run_env, **env}, capture_output=True, text=True,
                         timeout=60, check=True)
    tuned, faults = out.stdout.split()
    return tuned, int(faults)


def test_tune_malloc_reuses_frame_buffers_instead_of_faulting_new_pages():
    """After tune_malloc, a frame's three 803 KB copies reuse the heap: no new pages per frame; with glibc's
    defaults each round gives the memory back and faults ~600 pages in again."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    tuned, faults = _faults({})
    assert tuned == "True"
    assert faults < 100, faults  # 20 rounds x 3 x 196 pages without it
    default, faults_default = _faults({eventloop.MALLOC_ENV: "default"})
    assert default == "False"
    assert faults_default > 20 * 196, faults_default  # the case it exists for (the test measures something)
    mine, _ = _faults({"MALLOC_TRIM_THRESHOLD_": "131072"})  # the user's own setting is left alone
    assert mine == "False"


def test_every_cli_command_and_the_board_child_tune_the_allocator_before_their_work(monkeypatch):
    """A profile, a local baseline or a bench's own compute must allocate as the daemons do: the headline
    benchmark's board child timed its calibration, local run and profile with glibc's defaults (MobileNetV2's full
    model 1.4x slower) while its strategies ran tuned. Both entries call tune_malloc before anything else."""
    import runtime.cli.main as cli
    import runtime.measure.scenarios.device as device

    calls: list[str] = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append("cli") or True)
    assert cli.main(["models"]) == 0
    assert calls == ["cli"]

    class Stop(Exception):
        pass

    def no_model(name):
        calls.append("load")
        raise Stop

    monkeypatch.setattr(device.eventloop, "tune_malloc", lambda: calls.append("device") or True)
    monkeypatch.setattr(device, "load_model", no_model)
    monkeypatch.setattr(device.torch, "set_num_threads", lambda n: None)  # this process keeps its threads
    with pytest.raises(Stop):
        device.main(['{"model": "mobilenet_v2", "testbed": {"threads": 1}}'])
    assert calls == ["cli", "device", "load"]


def test_a_loop_runs_jobs_one_after_another_on_one_loop_and_cancels_what_each_left():
    """eventloop.Loop: a benchmark's jobs share one event loop (a closed loop per job made grpc.aio's poller print
    'Event loop is closed' for an earlier job's late events), and a task a job leaves running is cancelled before the
    next job starts, as asyncio.run would (it must not take the next job's CPU)."""
    seen: list[object] = []
    left: list[asyncio.Task[None]] = []

    async def job(leave: bool) -> int:
        seen.append(asyncio.get_running_loop())
        if leave:
            left.append(asyncio.get_running_loop().create_task(asyncio.sleep(3600)))
        else:
            assert left[0].cancelled()  # cancelled when the first job ended, before this one started
        await asyncio.sleep(0)
        return len(seen)

    with eventloop.Loop() as loop:
        assert loop.run(job(True)) == 1
        assert loop.run(job(False)) == 2
        with pytest.raises(ZeroDivisionError):
            loop.run(_fails())
    assert seen[0] is seen[1]
    assert seen[0].is_closed()


async def _fails() -> None:
    raise ZeroDivisionError
