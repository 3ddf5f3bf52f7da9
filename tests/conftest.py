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
    yield
    structlog.reset_defaults()
