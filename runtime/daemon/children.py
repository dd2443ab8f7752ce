"""Child processes the tools and benchmarks start (relays, workers): a line of their stdout within a time, and a stop
that cannot hang. One copy for ``runtime.tools`` and ``runtime.measure``, which may not import each other."""

from __future__ import annotations

import selectors
import subprocess


def readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the child's stdout, or "" after ``timeout`` seconds (select on the pipe; the child must write
    whole lines and flush them)."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def stop(proc: subprocess.Popen[str], grace: float = 10.0) -> None:
    """SIGTERM, ``grace`` seconds to exit, then SIGKILL; a child that already exited is only reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
