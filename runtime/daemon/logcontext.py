"""Ids every log line carries while they are known: frame, plan, agent, worker, model, split.

A frame's code path sets them once (:func:`log_scope` in the worker's and the agent's frame hooks,
runtime.daemon.tracing) and every ``logger.*`` call below it, in the same task or the tasks it
starts, gets them: the JSON log format (runtime.cli.logs) writes them as fields. They live in a
:mod:`contextvars` variable, so concurrent frames on one event loop never see each other's ids.
Work handed to an executor thread with ``run_in_executor`` does not inherit them (asyncio copies
the context into tasks, not into executor jobs).

Usage::

    with log_scope(frame=seq, plan=version, agent=agent_id):
        logger.info("...")  # {"msg": "...", "frame": 7, "plan": 3, "agent": "board-1", ...}
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping

FIELDS = ("frame", "plan", "agent", "worker", "model", "split")  # the keys a scope may set
_KNOWN = frozenset(FIELDS)

_EMPTY: Mapping[str, object] = {}
_context: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar("edgesplit_log_context",
                                                                                default=_EMPTY)


def current() -> Mapping[str, object]:
    """The ids set for this task (empty when none)."""
    return _context.get()


class log_scope:  # lower case: used like a function, ``with log_scope(frame=...)``
    """Add ``ids`` (keys from :data:`FIELDS`; empty strings are left out) for the ``with`` block.
    A class, not a generator: it runs once per frame on the worker and the agent (about 1 us)."""

    __slots__ = ("_ids", "_token")

    def __init__(self, **ids: object):
        if not _KNOWN.issuperset(ids):
            raise TypeError(f"log_scope: unknown field(s) {', '.join(sorted(set(ids) - _KNOWN))}; "
                            f"known: {', '.join(FIELDS)}")
        self._ids = ids
        self._token: contextvars.Token[Mapping[str, object]] | None = None

    def __enter__(self) -> None:
        merged = dict(_context.get())
        for k, v in self._ids.items():
            if v != "":
                merged[k] = v
        self._token = _context.set(merged)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _context.reset(self._token)
            self._token = None


def bind(**ids: object) -> None:
    """Set ``ids`` for the rest of this task (a daemon's own id at start: ``bind(worker=worker_id)``)."""
    unknown = set(ids) - set(FIELDS)
    if unknown:
        raise TypeError(f"bind: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(FIELDS)}")
    _context.set({**_context.get(), **{k: v for k, v in ids.items() if v != ""}})
