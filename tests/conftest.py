"""Suite-wide settings: offline, single-threaded math, quiet libp2p."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


import pytest  # noqa: E402
import structlog  # noqa: E402

from tests.pg import pg_server, pg_url  # noqa: E402,F401 — fixtures: a throwaway PostgreSQL (tests/pg.py)


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


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Signing while pytest *collects* is an error, not a latent flake: such an envelope
    is used minutes later on a slow machine and is then ``Expired`` (±120 s). Every
    envelope in the suite must be signed inside the test (or fixture) that uses it.
    ``Identity.sign`` is patched on the class, so modules imported meanwhile keep no
    reference to the stand-in."""
    from protocol.envelope import Identity

    def refuse(self, data: bytes) -> bytes:
        raise RuntimeError("signed at collection time: sign inside the test (or a fixture)")

    saved = Identity.sign
    Identity.sign = refuse
    try:
        return (yield)
    finally:
        Identity.sign = saved
