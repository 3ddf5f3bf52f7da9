"""structlog setup shared by every binary: console on a TTY, JSON otherwise.

Event names are dotted (``cpm.profile.accepted``) with stable keys (``peer``, ``round``,
``directive``, ``bytes``, ``duration_ms``, ``error``). py-libp2p's own stdlib loggers are
routed into the same output at WARNING and above so its failures are not silent — but
rate-limited per message template, because py-libp2p repeats the same warning in bursts
(e.g. redials to a peer that left), which buried the events an operator needs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

LOG_FORMATS = ("auto", "console", "json")


def configure_logging(fmt: str = "auto", level: str = "info", stream=None) -> None:
    stream = stream or sys.stderr
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}")
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    numeric = getattr(logging, level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    lib = logging.getLogger("libp2p")
    lib.handlers[:] = []
    forward = _ToStructlog()
    forward.setLevel(logging.WARNING)  # child loggers bypass the parent's level
    lib.addHandler(forward)
    lib.setLevel(logging.WARNING)
    lib.propagate = False


class _ToStructlog(logging.Handler):
    """Forward py-libp2p's stdlib records into structlog (one format for all output).

    Each (logger, message template) is forwarded at most once per ``window_s``; the
    next forwarded record says how many were ``suppressed`` in between, so counts are
    never lost, only the repetition. The table is bounded (oldest keys dropped).
    """

    MAX_KEYS = 1024

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = (record.name, str(record.msg))
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.window_s:
            self._last[key] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        self._last.pop(key, None)
        self._last[key] = (now, 0)
        if len(self._last) > self.MAX_KEYS:
            del self._last[next(iter(self._last))]
        extra = {"suppressed": suppressed} if suppressed else {}
        structlog.get_logger("libp2p").warning(
            "libp2p.log", logger=record.name, level_name=record.levelname, message=record.getMessage(), **extra
        )


def log_events(text: str, name: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines (this module's JSON renderer) in ``text`` — a process's captured
    stderr — as dicts, optionally only the events called ``name``; other lines are
    skipped. One parser for the benchmarks and tests that read a child's log."""
    out = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict) and (name is None or doc.get("event") == name):
            out.append(doc)
    return out
