"""Log set-up for every command: ``--log-level`` and ``--log-format`` (text for people, JSON lines
for log shippers), accepted before or after the subcommand.

A JSON line carries ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``msg``, ``exc`` (a traceback,
when there is one), and any of these ids where they are known: ``frame`` (sequence number), ``plan``
(plan version), ``agent``, ``worker``, ``model``, ``split``. They come from the log context of the
code path (runtime.daemon.logcontext: a frame's hooks on the worker and the agent set them for every
line logged while that frame is handled), from the call's ``extra=`` (which wins), or, in a daemon's
RPC handler, from the authenticated caller (``agent`` or ``worker``: its certificate's or token's id). With tracing on
(runtime.daemon.tracing), a line logged inside a span also carries ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from runtime.daemon import logcontext

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
CONTEXT_FIELDS = logcontext.FIELDS  # ids a JSON line keeps: frame, plan, agent, worker, model, split
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(logcontext.current())
        for key in CONTEXT_FIELDS:
            if key in record.__dict__:
                line[key] = record.__dict__[key]
        caller = _caller()
        if caller is not None:
            line.setdefault(caller[0], caller[1])
        ids = _trace_ids()
        if ids is not None:
            line["trace_id"], line["span_id"] = ids
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _caller() -> tuple[str, str] | None:
    """("agent"|"worker", id) of the authenticated caller of the RPC being handled (runtime.daemon.auth)."""
    auth = sys.modules.get("runtime.daemon.auth")  # loaded in daemons only
    if auth is None:
        return None
    ident = auth.current_identity()
    return (ident.role, ident.id) if ident.authenticated and ident.role in ("agent", "worker") and ident.id else None


def _trace_ids() -> tuple[str, str] | None:
    tracing = sys.modules.get("runtime.daemon.tracing")  # never imported for this: off costs nothing
    return tracing.current_ids() if tracing is not None else None


def add_log_flags(parser: argparse.ArgumentParser, root: bool) -> None:
    """The root parser gets the defaults; a subcommand's copy leaves the attribute alone unless given."""
    level_default = "INFO" if root else argparse.SUPPRESS
    format_default = os.environ.get("EDGESPLIT_LOG_FORMAT", "text") if root else argparse.SUPPRESS
    parser.add_argument("--log-level", default=level_default, choices=LEVELS, help="log level (default: INFO)")
    parser.add_argument("--log-format", default=format_default, choices=FORMATS,
                        help="text, or json: one JSON object per line for log shippers (default: text, or "
                             "$EDGESPLIT_LOG_FORMAT)")


def add_log_flags_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """``edgesplit worker --log-level DEBUG`` and ``edgesplit planner serve --log-format json`` too."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any(a.dest == "log_level" for a in sub._actions):
                    add_log_flags(sub, root=False)
                add_log_flags_to_subcommands(sub)


def setup_logging(level: str, fmt: str) -> None:
    if fmt not in FORMATS:  # from $EDGESPLIT_LOG_FORMAT: argparse checks only the flag
        raise SystemExit(f"edgesplit: error: EDGESPLIT_LOG_FORMAT={fmt!r}: choose one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
