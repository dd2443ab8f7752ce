"""The dynamic trace: the link's rate steps down and up while an agent streams, and the planner re-plans.

It runs the adaptivity recorder (``python -m runtime.tools.adapt_run``, issue 11: planner, worker and
agent as separate processes on loopback, the agent's link through a relay whose rate follows the
steps) with the board at the CPU share calibrated for this model in the same run, and reads back per
step: the time to the first frame under the new plan, frames past their deadline (they ran on the
board instead), frames lost or duplicated. Its files (JSON, markdown, the timeline PNG) land beside
the scenario results.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from runtime.measure.scenarios.spec import RunSpec, Scenario
from runtime.measure.scenarios.testbed import Cleanup

WARMUP_S = 30.0  # seconds before the first step: the agent starts (unrestricted; it enters the board's quota once
# up: torch's import at 1/18 of a core takes minutes), probes, then takes the first plan
START_S = 300.0  # the planner, the worker and the agent start


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT first: the recorder's own clean-up (its processes, its cgroup) runs on KeyboardInterrupt."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def trace(model: str, sc: Scenario, cal: dict, spec: RunSpec, links: dict, profiles: tuple[Path, Path],
          cl: Cleanup) -> dict:
    """Record the trace for ``model`` with the board's and the edge's profiles of this run (``profiles``);
    the summary the report shows (files named in ``files``)."""
    share = cal["quota_us"] / cal["period_us"]
    phases = ",".join(f"{m:g}:{s:g}" for m, s in sc.steps)
    out_dir = Path(spec.out_dir)
    stem = f"{spec.name}_{sc.name}_{model}"
    prefix = out_dir / stem
    cmd = [sys.executable, "-m", "runtime.tools.adapt_run", "--out", str(prefix), "--model", model,
           "--phases", phases, "--jitter", "0", "--delay-ms", f"{sc.rtt_ms / 2:g}", "--board-share", f"{share:.4f}",
           "--board-period-us", str(cal["period_us"]), "--fps", f"{spec.trace_fps:g}",
           "--deadline", f"{spec.trace_deadline_s:g}", "--warmup", f"{WARMUP_S:g}",
           "--device-profile", str(profiles[0]), "--edge-profile", str(profiles[1]), "--board-join-after-start",
           "--worker-threads", str(spec.testbed.threads),  # the agent's count: random BatchNorm weights depend on it
           # noise frames, as in the earlier records: their JPEG (about 24 KB at q75) cannot cross 0.1 Mbit/s at 1 fps, so
           # every model must leave the JPEG at the step; the bundled photos' JPEG (3-6 KB at q40) still beats the board
           "--source", "synthetic"]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        cl.add(lambda: _stop(proc))
        try:
            code = proc.wait(START_S + WARMUP_S + sum(s for _, s in sc.steps) + 120)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise RuntimeError(f"the dynamic trace of {model} did not finish in time") from None
        if code != 0:
            log.seek(0)
            raise RuntimeError(f"the dynamic trace of {model} failed (exit {code}): {log.read()[-2000:]}")
    data = json.loads(prefix.with_suffix(".json").read_text())
    return summary(data, sc, share, cal, links, cmd, stem)


def summary(data: dict, sc: Scenario, share: float, cal: dict, links: dict, cmd: list[str], stem: str) -> dict:
    """What the report shows of a recorded trace."""
    a, frames = data["analysis"], data["frames"]
    past = [r for r in frames if (r.get("fallback_reason") or "").startswith("deadline")]
    for ph in a["phases"]:  # what ran in each step: split:codec and where, with counts
        inside = [r for r in frames if ph["start_s"] <= r.get("t", -1.0) < ph["start_s"] + ph["seconds"]]
        ph["ran"] = dict(Counter(f"{r.get('split')}:{r.get('codec')} ({r.get('where')})" for r in inside).most_common())
    return {"dynamic": True, "steps": [list(s) for s in sc.steps], "rtt_ms": sc.rtt_ms,
            "links": {k: v for k, v in links.items() if k.startswith(f"{sc.name}@")},
            "board_share": share, "board_period_us": cal["period_us"], "frames": a["frames"], "lost": a["lost"],
            "duplicated": a["duplicated"], "past_deadline": len(past),
            "fallbacks": sum(1 for r in frames if r.get("where") == "local" and r.get("split") != "output"),
            "phases": a["phases"], "command": " ".join(["python", "-m", *cmd[2:]]),
            "files": [f"{stem}.json", f"{stem}.md", f"{stem}.png"]}
