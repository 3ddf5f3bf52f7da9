"""structlog setup shared by every binary: console on a TTY, JSON otherwise.

Event names are dotted (``cpm.profile.accepted``) with stable keys (``peer``, ``round``,
``directive``, ``bytes``, ``duration_ms``, ``error``). py-libp2p's own stdlib loggers are
routed into the same output at WARNING and above so its failures are not silent.
"""

from __future__ import annotations

import logging
import sys

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
    """Forward py-libp2p's stdlib records into structlog (one format for all output)."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger("libp2p").warning(
            "libp2p.log", logger=record.name, level_name=record.levelname, message=record.getMessage()
        )
