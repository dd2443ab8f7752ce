"""``python -m runtime.tools.abuse_check`` reports the worker's InferStream caps (runtime.tools.abuse_streams,
review): against a real worker under mTLS, an agent's streams beyond --max-streams-per-caller end its oldest
RESOURCE_EXHAUSTED, the rest still answer, and past --max-streams a new stream is refused, ending none."""

from __future__ import annotations

import asyncio
import re

import pytest

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(120)]


def test_abuse_check_reports_the_stream_caps_on_a_real_worker(tmp_path, capsys):
    from runtime.tools import abuse_check
    from runtime.tools.abuse_streams import streams

    assert "abuse_streams" in abuse_check.__doc__  # abuse_check runs it (its main imports it)
    asyncio.run(streams(tmp_path))
    per_caller, total = capsys.readouterr().out.splitlines()
    assert "a1 opened 6 InferStream calls (--max-streams-per-caller 4): its oldest 2 ended" in per_caller
    assert "'RESOURCE_EXHAUSTED: agent/a1 (cert) opened another InferStream stream: at most 4" in per_caller
    assert "held 4 of a1's and 5 in all" in per_caller and "answered a frame: 5 of 5" in per_caller
    assert "(4 of a1's, 4 of a2's), a2's next stream -> 'RESOURCE_EXHAUSTED: this worker has 8" in total
    assert "streams ended for it: 0;" in total
    shed = dict(re.findall(r"reason=(\w+)\}? (\d+)", total))
    assert shed == {"oldest_ended": "2", "total_refused": "1"}
