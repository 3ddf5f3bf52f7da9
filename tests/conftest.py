"""Suite-wide settings: offline, single-threaded math, quiet libp2p."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


import pytest  # noqa: E402
import structlog  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_structlog():
    """Each test starts from structlog's defaults: in-process CLI runs configure a level
    filter (``configure_logging``) that would otherwise hide events from later tests'
    ``capture_logs``."""
    structlog.reset_defaults()
    _plain_tracebacks()
    yield
    structlog.reset_defaults()


def _plain_tracebacks() -> None:
    """structlog's default console renderer draws rich tracebacks with locals, which takes
    seconds on a loaded 2-core machine and made exception-path tests time out; plain
    tracebacks carry the same information."""
    structlog.configure(processors=[
        *structlog.get_config()["processors"][:-1],
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
    ])
